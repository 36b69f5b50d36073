"""Public finance instruction data mixed into the build, and decontamination against eval sets.

`finqlora build --add-dataset PATH --add-format FORMAT --add-samples N` (repeatable; or
`data.add` in a run config) turns a public set, in its published format, into records of
type `public_data`:

| format | file | record |
| --- | --- | --- |
| `finfe` | BBT-FinCUGE FinFE: JSON list of `[text, label]`, 0 消极 / 1 中性 / 2 积极 | `FINFE_INSTRUCTION`, the text, one word 积极/中性/消极 |
| `finfe-choice` | the same file | a four-option question (积极/中性/消极/无法判断 in a seeded order per text, the options in the instruction), the text, the answer's letter |
| `cfbenchmark` | CFBenchmark: Hugging Face `datasets` folder, rows `{instruction, input, response}` | its own instruction, input and response |
| `fpb` | Financial PhraseBank: `sentence@label` lines (positive/neutral/negative) | `FPB_INSTRUCTION` (Chinese), the sentence, the English label |
| `disc` | DISC-Fin-SFT: JSON list of `{instruction, input, output, history}` | as given; `history` turns are prepended to the input as 对话历史 |
| `alpaca` | JSONL, one `{instruction, input, output}` a line | as given |

`finfe-choice` teaches the answer-letter format of multiple-choice exams (FinEval, C-Eval) on
sentiment, never on exam questions: a small model that knows an answer but maps it to a letter
at chance (docs/quality.md) is what it is for. Its fourth option is never right, so that the
right letter is spread over A-D as in a four-option exam.

N records are a seeded sample of the file (all of it when N is omitted); each source is
split train/val/test by the build's split shares on its own, after a seeded shuffle.

Decontamination (`--decontaminate PATH...`, plus every benchmark of the run config's
`eval.benchmarks`): any built or added record whose main text (news, sentence, input) is an
exact or near duplicate (`finqlora.core.textdedup`, 3-gram Jaccard >= threshold) of an
evaluation item's text is dropped. The evaluation file's layout is read from its shape: a
folder is a `datasets` folder, or a folder of FinEval / C-Eval `.csv` files, `.csv` one such
file (the `question` column), `.json` a list of `[text, label]` pairs or of objects (CFLUE's
`question`), `.jsonl` objects, any other file `sentence@label` lines (a line without `@` is
taken whole).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finqlora.core import textdedup
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import iter_jsonl, load_datasets_folder
from finqlora.core.records import iter_records, normalize
from finqlora.dataset.drafts import PUBLIC, SPLITS, Draft, allocate, seeded_rng

FORMATS = ("finfe", "finfe-choice", "cfbenchmark", "fpb", "disc", "alpaca", "sharegpt")
FINFE_WORDS = {0: "消极", 1: "中性", 2: "积极"}
FPB_LABELS = ("positive", "neutral", "negative")
# The FinFE form is the benchmark's own wording, so a model trained on it is asked the same way.
FINFE_INSTRUCTION = "判断下面这条金融社交媒体文本的情绪倾向。只回答一个词：积极、中性或消极。"
FPB_INSTRUCTION = "判断下面这条英文财经新闻句子对投资者的情绪倾向。只回答一个英文词：positive、neutral 或 negative。"
FINFE_CHOICE_INSTRUCTION = "判断下面这条金融社交媒体文本的情绪倾向，从以下选项中选出正确的一项。只回答选项字母。"
FINFE_CHOICE_OPTIONS = ("积极", "中性", "消极", "无法判断")  # 无法判断 is never the answer
LICENCE_NOTES = {
    "finfe": "BBT-FinCUGE FinFE (github ssymmetry/BBT-FinCUGE-Applications): no licence file, research use",
    "finfe-choice": "BBT-FinCUGE FinFE (github ssymmetry/BBT-FinCUGE-Applications): no licence file, research use",
    "cfbenchmark": "CFBenchmark (TongjiFinLab): see the licence of the copy you use",
    "fpb": "Financial PhraseBank (Malo et al. 2014): CC BY-NC-SA 3.0",
    "disc": "DISC-Fin-SFT (FudanDISC/DISC-FinLLM): Apache-2.0",
    "alpaca": "user-supplied Alpaca file (JSONL or a JSON array): the licence of its source",
    "sharegpt": "user-supplied ShareGPT file (JSONL or a JSON array): the licence of its source",
}


@dataclass(frozen=True)
class AddSource:
    path: Path
    format: str
    samples: int | None = None  # None = every row

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise FinqloraError(f"unknown --add-format {self.format!r} for {self.path}", hint=f"use one of: {', '.join(FORMATS)}")
        if self.samples is not None and self.samples < 1:
            raise FinqloraError(f"--add-samples for {self.path} must be at least 1, got {self.samples}")
        if not self.path.exists():
            raise FinqloraError(f"--add-dataset {self.path} does not exist", hint="check the path of the public data set")


@dataclass(frozen=True)
class MixItem:
    instruction: str
    input: str
    output: str
    label: dict[str, Any]


def _bad(path: Path, line: int | None, what: str, fix: str) -> FinqloraError:
    where = f"{path}:{line}" if line is not None else str(path)
    return FinqloraError(f"{where}: {what}", hint=fix)


def json_list_rows(path: Path, layout: str) -> Iterator[tuple[int, Any]]:
    """(line, element) for each element of a JSON list file, with the line each element starts on."""
    text = path.read_text(encoding="utf-8-sig")
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text[pos:pos + 1] == "[":
        raise _bad(path, text.count("\n", 0, pos) + 1, "expected a JSON list", f"a {layout} file is one JSON list: [ ... ]")
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise _bad(path, text.count("\n") + 1, "the JSON list is not closed with ]", "the file may be cut short; re-download it")
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            element, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise _bad(path, exc.lineno, f"not valid JSON ({exc.msg} at column {exc.colno})",
                       f"fix that line so the file is one JSON list of {layout} rows") from None
        yield line, element


def _finfe(path: Path) -> Iterator[MixItem]:
    for line, row in json_list_rows(path, "[text, label]"):
        label = row[1] if isinstance(row, list) and len(row) == 2 else None
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str) and str(label) in ("0", "1", "2")):
            raise _bad(path, line, f"expected [text, label] with label 0, 1 or 2, found {json.dumps(row, ensure_ascii=False)[:60]}",
                       "FinFE rows are [text, 0|1|2] (0 消极, 1 中性, 2 积极); fix or delete that row")
        word = FINFE_WORDS[int(label)]
        yield MixItem(FINFE_INSTRUCTION, row[0].strip(), word, {"class": word})


def _finfe_choice(path: Path) -> Iterator[MixItem]:
    """FinFE rows as four-option questions; the option order is seeded by the text, so a row is
    always asked the same way. The options go in the instruction, the text stays the input that
    decontamination and the near-duplicate checks compare."""
    letters = "ABCD"
    for item in _finfe(path):
        order = random.Random(f"finfe-choice-{item.input}").sample(FINFE_CHOICE_OPTIONS, len(FINFE_CHOICE_OPTIONS))
        options = "\n".join(f"{letter}. {word}" for letter, word in zip(letters, order))
        answer = letters[order.index(item.output)]
        yield MixItem(f"{FINFE_CHOICE_INSTRUCTION}\n{options}", item.input, answer, {"class": answer})


def _fpb(path: Path) -> Iterator[MixItem]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # the original PhraseBank files are ISO-8859-1
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        sentence, at, label = raw.rpartition("@")
        label = label.strip().lower()
        if not at or not sentence.strip() or label not in FPB_LABELS:
            raise _bad(path, line, f"expected 'sentence@positive|neutral|negative', found {raw[:60]!r}",
                       "each line of a Financial PhraseBank file is sentence@label; fix or delete that line")
        yield MixItem(FPB_INSTRUCTION, sentence.strip(), label, {"class": label})


def _instruction_row(path: Path, line: int, row: Any, answer_key: str) -> MixItem:
    if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not isinstance(row.get(answer_key), str) \
            or not row["instruction"].strip() or not row[answer_key].strip():
        found = json.dumps(row, ensure_ascii=False)[:60]
        raise _bad(path, line, f"expected an object with non-empty 'instruction' and '{answer_key}', found {found}",
                   f"each row needs instruction, input (may be empty) and {answer_key}; fix or delete that row")
    return MixItem(row["instruction"].strip(), str(row.get("input") or "").strip(), row[answer_key].strip(), {})


def _disc(path: Path) -> Iterator[MixItem]:
    for line, row in json_list_rows(path, "DISC-Fin-SFT"):
        item = _instruction_row(path, line, row, "output")
        history = row.get("history") or []
        if not isinstance(history, list) or any(not (isinstance(t, list) and len(t) == 2) for t in history):
            raise _bad(path, line, "'history' must be a list of [question, answer] pairs", "fix or empty that row's history")
        yield _history_item(item, history)


def _history_item(item: MixItem, history: list) -> MixItem:
    """Earlier turns go into the input (a mixed-in record is one question and its answer), as for DISC."""
    if not history:
        return item
    turns = "\n".join(f"问：{q}\n答：{a}" for q, a in history)
    return MixItem(item.instruction, f"对话历史：\n{turns}\n\n{item.input}".strip(), item.output, {})


def _alpaca(path: Path) -> Iterator[MixItem]:
    """Alpaca rows (JSONL or LLaMA-Factory's JSON array), `history` folded into the input."""
    for line, row in iter_records(path, what="Alpaca file"):
        item = _instruction_row(path, line, row, "output")
        history = row.get("history") or []
        if not isinstance(history, list) or any(not (isinstance(t, list) and len(t) == 2) for t in history):
            raise _bad(path, line, "'history' must be a list of [question, answer] pairs", "fix or empty that row's history")
        yield _history_item(item, history)


def _sharegpt(path: Path) -> Iterator[MixItem]:
    """ShareGPT rows: the last human turn and the gpt answer; earlier turns folded into the input."""
    for line, row in iter_records(path, what="ShareGPT file"):
        try:
            messages = normalize(row, "sharegpt")["messages"]
        except ValueError as exc:
            raise _bad(path, line, str(exc), "each row needs conversations of human/gpt turns ending with gpt") from None
        system = [m["content"] for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user" or not turns[-1]["content"].strip():
            raise _bad(path, line, "the conversation must end with a human turn and a non-empty gpt answer", "fix or delete that row")
        pairs = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 2, 2)]
        item = MixItem(turns[-2]["content"].strip(), "\n".join(system).strip(), turns[-1]["content"].strip(), {})
        yield _history_item(item, pairs)


def _cfbenchmark(path: Path) -> Iterator[MixItem]:
    loaded = load_datasets_folder(path, "--add-dataset")
    if isinstance(loaded, dict):  # a DatasetDict of splits
        if "train" not in loaded and len(loaded) != 1:
            raise _bad(path, None, f"several splits ({', '.join(loaded)}) and none is train", "pass the folder of one split")
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    for row_number, row in enumerate(loaded):
        # A datasets folder has no lines: the error names the row instead.
        try:
            yield _instruction_row(path, row_number, row, "response")
        except FinqloraError as exc:
            raise FinqloraError(str(exc).replace(f"{path}:{row_number}:", f"{path}: row {row_number}:"), hint=exc.hint) from None


_LOADERS = {"finfe": _finfe, "finfe-choice": _finfe_choice, "cfbenchmark": _cfbenchmark, "fpb": _fpb, "disc": _disc, "alpaca": _alpaca, "sharegpt": _sharegpt}


def load_source(source: AddSource, seed: int) -> list[MixItem]:
    """Every valid row of a source (a malformed row stops with its file and line), then a
    seeded sample of `samples` rows in file order."""
    source.validate()
    items = list(_LOADERS[source.format](source.path))
    if not items:
        raise _bad(source.path, None, "holds no rows", "check that it is the right file for --add-format " + source.format)
    if source.samples is not None and source.samples < len(items):
        chosen = sorted(seeded_rng(seed, f"add-{source.path.name}").sample(range(len(items)), source.samples))
        items = [items[i] for i in chosen]
    return items


def public_drafts(sources: Sequence[AddSource], shares: Sequence[float], seed: int) -> tuple[list[Draft], list[dict[str, Any]]]:
    """Drafts of every --add-dataset source, each source split by the split shares on its own,
    and what was taken from each source (the stats' `public_data`)."""
    drafts: list[Draft] = []
    taken = []
    for number, source in enumerate(sources):
        items = load_source(source, seed)
        order = list(range(len(items)))
        seeded_rng(seed, f"add-split-{number}-{source.path.name}").shuffle(order)
        splits = [s for s, n in zip(SPLITS, allocate(len(items), shares)) for _ in range(n)]
        name = source.path.name
        for index, split in zip(order, splits):
            item = items[index]
            label = {"source": name, "format": source.format, **item.label}
            drafts.append(Draft(PUBLIC, split, "", item.instruction, item.output, label, news=item.input, ts=index))
        taken.append({"name": name, "path": str(source.path), "format": source.format, "licence": LICENCE_NOTES[source.format],
                      "rows_taken": len(items), "by_split": dict(Counter(splits))})
    return drafts, taken


# ---------------------------------------------------------------------------------------
# Decontamination


def _text_of_row(row: Any) -> str | None:
    if isinstance(row, str):
        return row
    if isinstance(row, list) and row and isinstance(row[0], str):
        return row[0]
    if isinstance(row, dict):
        for key in ("text", "input", "sentence", "question", "instruction"):
            if isinstance(row.get(key), str) and row[key].strip():
                return row[key]
    return None


def eval_texts(path: Path) -> list[str]:
    """The item texts of an evaluation file or folder (layout from its shape, see the module doc)."""
    path = Path(path)
    if not path.exists():
        raise FinqloraError(f"--decontaminate {path} does not exist", hint="pass the evaluation files the model will be scored on")
    csv_files = sorted(path.glob("*.csv")) if path.is_dir() else [path] if path.suffix == ".csv" else []
    if csv_files:  # multiple-choice exams: the question is the text a trained record must not repeat
        import csv
        import io

        rows = [row for file in csv_files for row in csv.DictReader(io.StringIO(file.read_text(encoding="utf-8-sig")))]
    elif path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        splits = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
        rows: list[Any] = [row for split in splits for row in split]
    elif path.suffix == ".json":
        rows = [row for _, row in json_list_rows(path, "evaluation")]
    elif path.suffix == ".jsonl":
        rows = [row for _, row in iter_jsonl(path, what="evaluation file")]
    else:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
        rows = [line.rpartition("@")[0] or line for line in lines if line.strip()]
    return [t for t in (_text_of_row(r) for r in rows) if t and t.strip()]


def contaminated(texts: Sequence[str], eval_sets: dict[str, list[str]], threshold: float) -> dict[int, str]:
    """Index of each text that duplicates (exactly or nearly) an item of an evaluation set -> that set's name."""
    hits: dict[int, str] = {}
    exact = {textdedup.normalize(t): name for name, items in eval_sets.items() for t in items}
    for i, text in enumerate(texts):
        if textdedup.normalize(text) in exact:
            hits[i] = exact[textdedup.normalize(text)]
    for name, items in eval_sets.items():
        for group_a, _, _, index_b in textdedup.cross_group_duplicates([items, list(texts)], threshold):
            if group_a == 0:
                hits.setdefault(index_b, name)
    return hits
