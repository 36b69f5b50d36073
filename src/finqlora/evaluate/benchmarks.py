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

Every label is mapped to the canonical direction classes of `finqlora.dataset.answer_parser`
(利好 = positive, 中性 = neutral, 利空 = negative) so that the same answer parser scores
every benchmark. `--label-map "0=利空,1=中性,2=利好"` (or a JSON object file) overrides the
defaults. Malformed files raise `FinqloraError` naming the file and the line/row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class BenchmarkItem:
    id: str
    instruction: str
    input: str
    label: str  # canonical class
    raw_label: str

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
    items = []
    for number, row in enumerate(loaded):
        where = f"{path}: row {number}"
        response = str(row["response"] or "").strip()
        items.append(BenchmarkItem(f"cfb-{number}", str(row["instruction"] or ""), str(row["input"] or ""), _map_label(response, mapping, where), response))
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


def load_benchmark(
    path: str | Path,
    fmt: str,
    *,
    label_map: dict[str, str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> Benchmark:
    """Load a benchmark; with `limit`, a seeded random sample of that many items (stratification
    is not attempted: the sample keeps the file's class mix in expectation)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise FinqloraError(f"unknown benchmark format {fmt!r}", hint=f"use one of: {', '.join(FORMATS)}")
    if not path.exists():
        raise FinqloraError(f"benchmark not found: {path}")
    mapping = dict(FINFE_LABEL_MAP) if fmt == "finfe" else dict(DEFAULT_LABEL_MAP)
    mapping.update(label_map or {})
    if fmt == "finfe":
        items = _load_finfe(path, mapping)
    elif fmt == "cfbenchmark":
        items = _load_cfbenchmark(path, mapping, split)
    elif fmt == "fpb":
        items = _load_fpb(path, mapping)
    else:
        items = _load_jsonl(path, mapping)
    if not items:
        raise FinqloraError(f"{path}: no benchmark rows found")
    if limit is not None and limit < len(items):
        import random

        chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in chosen]
    labels = [label for label in DIRECTIONS if any(item.label == label for item in items)]
    return Benchmark(path.stem if path.is_file() else path.name, fmt, str(path), items, labels, DISPLAY_NAMES.get(fmt, {}))
