"""External classification benchmarks that users bring: load, map labels, make prompts.

Formats (`--benchmark-format`):

* `finfe` -- BBT-FinCUGE FinFE: a JSON list of `[text, label]`, label 0 = 消极, 1 = 中性,
  2 = 积极.
* `cfbenchmark` -- a Hugging Face `datasets` folder (`save_to_disk`) whose rows are
  `{instruction, input, response}`; the response is the class word (积极/中性/消极, ...).
* `fpb` -- Financial PhraseBank: one `sentence@label` a line, label positive/neutral/negative
  (the original files are Latin-1; UTF-8 is tried first).
* `jsonl` -- one JSON object a line with `text` (or `input`/`sentence`), `label`, and
  optionally `instruction`.
* `fineval`, `ceval` -- multiple-choice exams as published (FinEval, C-Eval): one CSV per
  subject, `id,question,A,B,C,D,answer` (C-Eval's dev files add `explanation`), the subject
  from the file name (`accounting_val.csv` -> accounting); a file or a folder of them.
* `cflue` -- CFLUE's knowledge set: a JSON list of objects with `question`, `choices` (a
  Python dict literal as a string, `"{'A': ..., 'B': ...}"`, or an object), `answer` (the
  letter(s)), `task` (单项选择题 / 多项选择题 / 判断题) and `名称` (the exam). Questions with
  more than one correct letter are left out (choice scoring picks one option), and counted.

Sentiment labels are mapped to the canonical direction classes of
`finqlora.dataset.answer_parser` (利好 = positive, 中性 = neutral, 利空 = negative) so that
the same answer parser scores every sentiment benchmark. `--label-map "0=利空,1=中性,2=利好"`
(or a JSON object file) overrides the defaults. A CFBenchmark set whose responses are not
sentiment words (event detection, industry identification, ...) keeps its own classes. A
multiple-choice item's classes are its option letters, each item with its own. Malformed files
raise `FinqloraError` naming the file and the line/row.

A multiple-choice exam has two formulations (`cloze_form`): the published one shows the
options and asks for the letter; the cloze one asks the question alone and scores each option's
own text as the answer (lm-evaluation-harness and OLMES call it the cloze formulation). A small
model can know the answer and still fail to map it to a letter: the letter form then measures
the format, the cloze form the knowledge.
"""

from __future__ import annotations

import ast
import csv
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from finqlora.dataset.answer_parser import DIRECTIONS, NEGATIVE, NEUTRAL, POSITIVE
from finqlora.core.config import BENCHMARK_FORMATS
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import iter_jsonl, load_datasets_folder

FORMATS = BENCHMARK_FORMATS  # written once, in the run config's schema

# Words a benchmark may use for its classes, mapped to the canonical classes.
DEFAULT_LABEL_MAP: dict[str, str] = {
    **{word: POSITIVE for word in ("积极", "正面", "利好", "看涨", "positive", "pos", "bullish")},
    **{word: NEUTRAL for word in ("中性", "中立", "neutral", "neu")},
    **{word: NEGATIVE for word in ("消极", "负面", "利空", "看跌", "negative", "neg", "bearish")},
}
FINFE_LABEL_MAP = {"0": NEGATIVE, "1": NEUTRAL, "2": POSITIVE}

# The class names shown in reports, per format (the benchmark's own words).
DISPLAY_NAMES = {
    "finfe": {POSITIVE: "积极", NEUTRAL: "中性", NEGATIVE: "消极"},
    "fpb": {POSITIVE: "positive", NEUTRAL: "neutral", NEGATIVE: "negative"},
}

FINFE_INSTRUCTION = "判断下面这条金融社交媒体文本的情绪倾向。只回答一个词：积极、中性或消极。"
FPB_INSTRUCTION = (
    "Classify the sentiment of this financial news sentence from an investor's point of view. "
    "Answer with one word: positive, neutral or negative."
)
JSONL_INSTRUCTION = "判断下面这段金融文本的情绪倾向（利好、中性或利空），只回答一个词。"
# C-Eval's own zero-shot prompt ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。"),
# with the answer format said, since choice scoring compares the option letters.
CHOICE_INSTRUCTION = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。只回答选项字母。"
JUDGE_INSTRUCTION = "以下是中国关于{subject}考试的判断题，请判断对错。只回答选项字母。"
# The cloze formulation: the question alone, the answer is an option's own text.
CLOZE_CHOICE_INSTRUCTION = "以下是中国关于{subject}考试的单项选择题，请直接写出正确答案。"
CLOZE_JUDGE_INSTRUCTION = "以下是中国关于{subject}考试的判断题，请判断对错。"
LETTER, CLOZE = "letter", "cloze"  # the formulations of a multiple-choice benchmark
LETTERS = ("A", "B", "C", "D", "E", "F")

# What kind of classes a benchmark has: sentiment (mapped to 利好/中性/利空), its own class
# words, or option letters of multiple-choice questions.
SENTIMENT, CLASSES, MULTIPLE_CHOICE = "sentiment", "classes", "multiple_choice"


@dataclass(frozen=True)
class ClozeForm:
    """A multiple-choice question asked without its options: the option texts are the answers scored."""

    instruction: str
    question: str
    options: tuple[str, ...]  # the texts of the item's option letters, in the same order


@dataclass(frozen=True)
class BenchmarkItem:
    id: str
    instruction: str
    input: str
    label: str  # canonical class (a letter for multiple choice)
    raw_label: str
    options: tuple[str, ...] = ()  # a multiple-choice item's own option letters
    cloze: ClozeForm | None = None  # a multiple-choice item's cloze formulation

    def to_record(self) -> dict[str, Any]:
        """A dataset-style record, so prompts go through `chat_format.record_to_chat`."""
        return {"id": self.id, "instruction": self.instruction, "input": self.input, "output": self.raw_label}


@dataclass
class Benchmark:
    name: str
    format: str
    path: str
    items: list[BenchmarkItem]
    labels: list[str] = field(default_factory=lambda: list(DIRECTIONS))
    display_names: dict[str, str] = field(default_factory=dict)
    kind: str = SENTIMENT
    skipped: dict[str, int] = field(default_factory=dict)  # rows left out, by reason
    formulation: str = LETTER  # multiple choice: scored on the letters (published) or on the option texts (cloze)


def parse_label_map(spec: str | None) -> dict[str, str] | None:
    """`"0=利空,1=中性,2=利好"` or a path to a JSON object file -> {raw label: canonical class}."""
    if not spec:
        return None
    path = Path(spec)
    if path.suffix == ".json" and path.exists():
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise FinqloraError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        if not isinstance(mapping, dict):
            raise FinqloraError(f"{path}: a label map must be a JSON object like {{\"0\": \"利空\"}}")
    else:
        mapping = {}
        for part in spec.split(","):
            if "=" not in part:
                raise FinqloraError(
                    f"label map entry {part!r} has no '='", hint='write it as "0=利空,1=中性,2=利好" (raw label = class)'
                )
            raw, _, target = part.partition("=")
            mapping[raw.strip()] = target.strip()
    normalized = {}
    for raw, target in mapping.items():
        canonical = DEFAULT_LABEL_MAP.get(str(target).strip().lower(), str(target).strip())
        if canonical not in DIRECTIONS:
            raise FinqloraError(
                f"label map sends {raw!r} to {target!r}, which is not a known class",
                hint="map each raw label to 利好/中性/利空 (or positive/neutral/negative, 积极/中性/消极)",
            )
        normalized[str(raw).strip().lower()] = canonical
    return normalized


def _map_label(raw: Any, mapping: dict[str, str], where: str) -> str:
    key = str(raw).strip().lower()
    if key in mapping:
        return mapping[key]
    raise FinqloraError(
        f"{where}: label {raw!r} is not in the label map ({', '.join(sorted(mapping)) or 'empty'})",
        hint='pass --label-map "RAW=利好,RAW=中性,RAW=利空" to say which class each label means',
    )


def _load_finfe(path: Path, mapping: dict[str, str]) -> list[BenchmarkItem]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FinqloraError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
            hint="a FinFE file is one JSON list of [text, label] pairs",
        ) from exc
    if not isinstance(rows, list):
        raise FinqloraError(f"{path}: expected a JSON list of [text, label] pairs, found {type(rows).__name__}")
    items = []
    for number, row in enumerate(rows):
        where = f"{path}: row {number}"
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str)):
            raise FinqloraError(f"{where}: expected [text, label], found {json.dumps(row, ensure_ascii=False)[:80]}")
        items.append(BenchmarkItem(f"finfe-{number}", FINFE_INSTRUCTION, row[0], _map_label(row[1], mapping, where), str(row[1])))
    return items


def _load_cfbenchmark(path: Path, mapping: dict[str, str], split: str | None) -> list[BenchmarkItem]:
    loaded = load_datasets_folder(path, "--benchmark")
    if isinstance(loaded, dict):  # a DatasetDict of splits
        names = list(loaded)
        chosen = split or ("test" if "test" in loaded else names[0] if len(names) == 1 else None)
        if chosen not in loaded:
            raise FinqloraError(f"{path}: choose a split with --split ({', '.join(names)})")
        loaded = loaded[chosen]
    missing = {"instruction", "input", "response"} - set(loaded.column_names)
    if missing:
        raise FinqloraError(
            f"{path}: rows need instruction, input and response; missing {', '.join(sorted(missing))} "
            f"(columns: {', '.join(loaded.column_names)})"
        )
    return _cfbenchmark_items(path, list(loaded), mapping)


def _cfbenchmark_items(path: Path | str, rows: list[dict[str, Any]], mapping: dict[str, str]) -> list[BenchmarkItem]:
    """Sentiment rows map to 利好/中性/利空; a task whose responses are not all sentiment words
    (event detection, industry identification, ...) keeps its responses as its classes."""
    responses = [str(row.get("response") or "").strip() for row in rows]
    sentiment = all(response.lower() in mapping for response in responses)
    items = []
    for number, (row, response) in enumerate(zip(rows, responses)):
        where = f"{path}: row {number}"
        if not response:
            raise FinqloraError(f"{where}: empty response", hint="every CFBenchmark row needs its reference class in `response`")
        label = _map_label(response, mapping, where) if sentiment else response
        items.append(BenchmarkItem(f"cfb-{number}", str(row.get("instruction") or ""), str(row.get("input") or ""), label, response))
    return items


def _read_text_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # the original Financial PhraseBank files are ISO-8859-1
    return text.splitlines()


def _load_fpb(path: Path, mapping: dict[str, str]) -> list[BenchmarkItem]:
    items = []
    for number, line in enumerate(_read_text_lines(path), start=1):
        if not line.strip():
            continue
        sentence, at, label = line.rpartition("@")
        where = f"{path}: line {number}"
        if not at or not sentence.strip():
            raise FinqloraError(f"{where}: expected 'sentence@label', found {line[:80]!r}")
        items.append(BenchmarkItem(f"fpb-{number}", FPB_INSTRUCTION, sentence.strip(), _map_label(label, mapping, where), label.strip()))
    return items


def _load_jsonl(path: Path, mapping: dict[str, str]) -> list[BenchmarkItem]:
    items = []
    for number, row in iter_jsonl(path, what="benchmark", hint='one JSON object a line: {"text": ..., "label": ...}'):
        where = f"{path}: line {number}"
        text = next((row[key] for key in ("text", "input", "sentence") if key in row), None)
        if text is None or "label" not in row:
            raise FinqloraError(f"{where}: needs 'text' (or 'input'/'sentence') and 'label'; has {', '.join(row) or 'nothing'}")
        instruction = str(row.get("instruction") or JSONL_INSTRUCTION)
        items.append(BenchmarkItem(str(row.get("id", f"jsonl-{number}")), instruction, str(text), _map_label(row["label"], mapping, where), str(row["label"])))
    return items


def _read_csv_rows(path: Path) -> list[dict[str, str]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")  # FinEval's dev files start with a byte-order mark
    except UnicodeDecodeError as exc:
        raise FinqloraError(f"{path}: not UTF-8 text (byte {exc.start})", hint="FinEval and C-Eval CSVs are UTF-8") from exc
    return list(csv.DictReader(io.StringIO(text)))


def _subject(path: Path) -> str:
    """`accounting_val.csv` -> accounting (FinEval and C-Eval name files SUBJECT_SPLIT.csv)."""
    stem = path.stem
    for split in ("_val", "_dev", "_test"):
        if stem.endswith(split):
            return stem[: -len(split)]
    return stem


def _choice_item(item_id: str, subject: str, question: str, options: dict[str, str], answer: str, where: str,
                 instruction: str = CHOICE_INSTRUCTION) -> BenchmarkItem:
    letters = tuple(letter for letter in LETTERS if letter in options)
    if len(letters) < 2:
        raise FinqloraError(f"{where}: a multiple-choice question needs at least two options A, B, ...; found {', '.join(options) or 'none'}")
    if answer not in letters:
        raise FinqloraError(f"{where}: answer {answer!r} is not one of the options {', '.join(letters)}")
    texts = tuple(str(options[letter]).strip() for letter in letters)
    body = question.strip() + "\n" + "\n".join(f"{letter}. {text}" for letter, text in zip(letters, texts))
    subject = subject.replace("_", " ")
    cloze_instruction = CLOZE_JUDGE_INSTRUCTION if instruction == JUDGE_INSTRUCTION else CLOZE_CHOICE_INSTRUCTION
    return BenchmarkItem(item_id, instruction.format(subject=subject), body, answer, answer, letters,
                         ClozeForm(cloze_instruction.format(subject=subject), question.strip(), texts))


def cloze_form(benchmark: Benchmark) -> Benchmark:
    """The cloze formulation of a multiple-choice benchmark, named `<name>-cloze`: each item asks
    its question without the options, and its options are scored by their own text. An item
    whose option texts are blank or repeated cannot be told apart this way: it is left out and
    counted in `skipped`."""
    items, skipped = [], dict(benchmark.skipped)
    for item in benchmark.items:
        form = item.cloze
        if form is None:
            raise FinqloraError(f"{benchmark.path}: {item.id} is not a multiple-choice item", hint="only multiple-choice exams have a cloze form")
        if not all(form.options) or len(set(form.options)) < len(form.options):
            skipped["option texts blank or repeated (cloze)"] = skipped.get("option texts blank or repeated (cloze)", 0) + 1
            continue
        items.append(replace(item, instruction=form.instruction, input=form.question))
    if not items:
        raise FinqloraError(f"{benchmark.path}: no item of {benchmark.name} has distinct option texts for the cloze form")
    return replace(benchmark, name=f"{benchmark.name}-{CLOZE}", items=items, skipped=skipped, formulation=CLOZE)


def _mcq_csv_items(path: Path, rows: list[dict[str, Any]], prefix: str) -> list[BenchmarkItem]:
    """FinEval / C-Eval rows (`id,question,A,B,C,D,answer[,explanation]`)."""
    missing = {"question", "A", "B", "answer"} - set(rows[0] if rows else {})
    if rows and missing:
        raise FinqloraError(f"{path}: columns id,question,A,B,C,D,answer expected; missing {', '.join(sorted(missing))} "
                            f"(found: {', '.join(str(k) for k in rows[0])})", hint="FinEval and C-Eval CSVs have a header line id,question,A,B,C,D,answer")
    subject = _subject(path)
    items = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path}: line {number}"
        if not (row.get("question") or "").strip():
            raise FinqloraError(f"{where}: empty question")
        options = {letter: row[letter] for letter in LETTERS if row.get(letter) not in (None, "")}
        answer = str(row.get("answer") or "").strip().upper()
        items.append(_choice_item(f"{prefix}{subject}-{row.get('id') or number}", subject, row["question"], options, answer, where))
    return items


def _load_mcq_csv(path: Path, prefix: str) -> list[BenchmarkItem]:
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files:
        raise FinqloraError(f"{path}: no .csv files in this folder", hint="point it at a FinEval/C-Eval split folder (e.g. fineval/val) or one subject's CSV")
    return [item for file in files for item in _mcq_csv_items(file, _read_csv_rows(file), prefix)]


CFLUE_SINGLE, CFLUE_JUDGE = "单项选择题", "判断题"


def _cflue_items(path: Path | str, rows: list[Any], skipped: dict[str, int]) -> list[BenchmarkItem]:
    items = []
    for number, row in enumerate(rows):
        where = f"{path}: row {number}"
        if not isinstance(row, dict) or not {"question", "choices", "answer"} <= set(row):
            found = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise FinqloraError(f"{where}: a CFLUE row is an object with question, choices and answer; found {found}")
        choices = row["choices"]
        if isinstance(choices, str):
            try:  # CFLUE writes the options as a Python dict literal inside a string
                choices = ast.literal_eval(choices)
            except (ValueError, SyntaxError) as exc:
                raise FinqloraError(f"{where}: choices is not a dict like {{'A': ..., 'B': ...}} ({exc.__class__.__name__})") from exc
        if not isinstance(choices, dict):
            raise FinqloraError(f"{where}: choices must map option letters to texts, found {type(choices).__name__}")
        answer = str(row["answer"] or "").strip().upper()
        if len(answer) != 1:
            skipped["more than one correct option"] = skipped.get("more than one correct option", 0) + 1
            continue
        subject = str(row.get("名称") or "金融")
        instruction = JUDGE_INSTRUCTION if row.get("task") == CFLUE_JUDGE else CHOICE_INSTRUCTION
        items.append(_choice_item(f"cflue-{number}", subject, str(row["question"]), {str(k): v for k, v in choices.items()}, answer, where, instruction))
    return items


def _load_cflue(path: Path, skipped: dict[str, int]) -> list[BenchmarkItem]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FinqloraError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
                            hint="CFLUE's knowledge set is one JSON list of question objects") from exc
    if not isinstance(rows, list):
        raise FinqloraError(f"{path}: expected a JSON list of questions, found {type(rows).__name__}")
    return _cflue_items(path, rows, skipped)


def items_from_rows(fmt: str, where: str, rows: list[dict[str, Any]], *, label_map: dict[str, str] | None = None,
                    subject: str = "", skipped: dict[str, int] | None = None) -> list[BenchmarkItem]:
    """Items of rows already read (e.g. by `datasets.load_dataset` from the hub), in `fmt`'s columns."""
    mapping = dict(FINFE_LABEL_MAP) if fmt == "finfe" else dict(DEFAULT_LABEL_MAP)
    mapping.update(label_map or {})
    if fmt == "cfbenchmark":
        return _cfbenchmark_items(where, rows, mapping)
    if fmt in ("fineval", "ceval"):
        return _mcq_csv_items(Path(f"{subject or 'exam'}.csv"), rows, f"{fmt}-") if rows else []
    if fmt == "cflue":
        return _cflue_items(where, rows, skipped if skipped is not None else {})
    if fmt == "fpb":
        return [BenchmarkItem(f"fpb-{n}", FPB_INSTRUCTION, str(row["sentence"]), _map_label(row["label"], mapping, f"{where}: row {n}"), str(row["label"]))
                for n, row in enumerate(rows)]
    if fmt == "finfe":
        return [BenchmarkItem(f"finfe-{n}", FINFE_INSTRUCTION, str(row["text"]), _map_label(row["label"], mapping, f"{where}: row {n}"), str(row["label"]))
                for n, row in enumerate(rows)]
    raise FinqloraError(f"{where}: format {fmt!r} cannot be read from the hub", hint="download the set and point at the local copy")


def make_benchmark(name: str, fmt: str, path: str, items: list[BenchmarkItem], *, limit: int | None = None, seed: int = 0,
                   skipped: dict[str, int] | None = None) -> Benchmark:
    """A Benchmark of loaded items: its kind, classes and display names; with `limit`, a seeded sample."""
    if not items:
        raise FinqloraError(f"{path}: no benchmark rows found")
    if limit is not None and limit < len(items):
        import random

        chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in chosen]
    if items[0].options:
        kind, labels = MULTIPLE_CHOICE, [letter for letter in LETTERS if any(letter in item.options for item in items)]
    elif all(item.label in DIRECTIONS for item in items):
        kind, labels = SENTIMENT, [label for label in DIRECTIONS if any(item.label == label for item in items)]
    else:
        kind, labels = CLASSES, sorted({item.label for item in items})
    return Benchmark(name, fmt, path, items, labels, DISPLAY_NAMES.get(fmt, {}) if kind == SENTIMENT else {}, kind, dict(skipped or {}))


def load_benchmark(
    path: str | Path,
    fmt: str,
    *,
    label_map: dict[str, str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    name: str | None = None,
) -> Benchmark:
    """Load a benchmark; with `limit`, a seeded random sample of that many items (stratification
    is not attempted: the sample keeps the file's class mix in expectation). `name` defaults to
    the file's stem (the folder's name)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise FinqloraError(f"unknown benchmark format {fmt!r}", hint=f"use one of: {', '.join(FORMATS)}")
    if not path.exists():
        raise FinqloraError(f"benchmark not found: {path}")
    mapping = dict(FINFE_LABEL_MAP) if fmt == "finfe" else dict(DEFAULT_LABEL_MAP)
    mapping.update(label_map or {})
    skipped: dict[str, int] = {}
    if fmt == "finfe":
        items = _load_finfe(path, mapping)
    elif fmt == "cfbenchmark":
        items = _load_cfbenchmark(path, mapping, split)
    elif fmt == "fpb":
        items = _load_fpb(path, mapping)
    elif fmt in ("fineval", "ceval"):
        items = _load_mcq_csv(path, f"{fmt}-")
    elif fmt == "cflue":
        items = _load_cflue(path, skipped)
    else:
        items = _load_jsonl(path, mapping)
    return make_benchmark(name or (path.stem if path.is_file() else path.name), fmt, str(path), items, limit=limit, seed=seed, skipped=skipped)
