"""Reading and encoding the instruction dataset for training.

Train on split "train", validate on split "val"; a file without splits holds out `val_fraction`
of its records, chosen with the run's seed. Tokenizing goes through
`finqlora.core.chat_format.encode_for_training` (the inference chat template, prompt labels -100,
the answer ends with the template's end-of-turn marker).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import sha256_file
from finqlora.core.records import dataset_info_entry, read_dataset, split_dataset_info


@dataclass
class DatasetSplits:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    path: Path
    sha256: str
    total_records: int
    test_records: int
    val_source: str  # "split field" or "held out <fraction> of train"



def read_instruction_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(row number, record) of a dataset in any layout of finqlora.core.records; errors name the file and row.

    `path` is a JSONL file, a JSON array file, or `DIR/dataset_info.json:NAME` (LLaMA-Factory).
    Records come back as Alpaca records or `messages` records.
    """
    file, rows = read_dataset(path)
    for lineno, record in rows:
        _check_record(file, lineno, record)
    if not rows:
        raise FinqloraError(f"{file} has no records", hint="build a dataset first with `finqlora build`")
    return rows


def _check_record(file: Path, lineno: int, record: Mapping[str, Any]) -> None:
    """Refuse a record training cannot use, naming its file and line."""
    if "messages" not in record and "instruction" not in record:
        raise FinqloraError(
            f"{file}:{lineno}: record has neither 'instruction' nor 'messages'",
            hint="records need instruction/input/output (Alpaca) or messages (OpenAI chat) fields",
        )
    answer = _answer_text(record)
    if not answer.strip():
        raise FinqloraError(
            f"{file}:{lineno}: record {record.get('id', '')!s} has an empty answer ('output' or last assistant message)",
            hint="training learns the answer; remove records without one",
        )
    split = record.get("split")
    if split is not None and split not in ("train", "val", "test"):
        raise FinqloraError(
            f"{file}:{lineno}: field 'split' is {split!r}", hint="allowed: 'train', 'val', 'test' (or leave it out)"
        )


def _answer_text(record: Mapping[str, Any]) -> str:
    if "messages" in record:
        messages = record["messages"] or []
        return str(messages[-1].get("content", "")) if messages and messages[-1].get("role") == "assistant" else ""
    return str(record.get("output") or "")


def load_splits(path: str | Path, *, val_fraction: float, seed: int) -> DatasetSplits:
    """Train and validation records of an instruction JSONL (see the module docstring)."""
    rows = read_instruction_jsonl(path)
    records = [record for _, record in rows]  # alpaca or messages records (finqlora.core.records)
    has_split = any("split" in record for record in records)
    test_records = sum(1 for r in records if r.get("split") == "test")
    if has_split:
        train = [r for r in records if r.get("split") == "train"]
        val = [r for r in records if r.get("split") == "val"]
        val_source = "split field"
        if not train:
            raise FinqloraError(
                f"{path}: no record has split 'train'", hint="rebuild the dataset or remove the split fields"
            )
        if not val:
            train, val = _hold_out(train, val_fraction, seed)
            val_source = f"no 'val' records: held out {val_fraction:g} of train (seed {seed})"
    else:
        train, val = _hold_out(records, val_fraction, seed)
        val_source = f"no split field: held out {val_fraction:g} of the records (seed {seed})"
    if not train:
        raise FinqloraError(f"{path}: too few records to train ({len(records)})", hint="build a larger dataset")
    named = split_dataset_info(path)
    file = dataset_info_entry(*named)[0] if named else Path(path)  # the data file, whose content the run records
    return DatasetSplits(train, val, Path(path), sha256_file(file), len(records), test_records, val_source)


def _hold_out(records: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    if len(records) < 2:
        raise FinqloraError("need at least 2 training records to hold one out for validation")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(records) * fraction)), len(records) - 1)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


class EncodedDataset:
    """Tokenized examples (input_ids + labels) as a map-style dataset for the Trainer."""

    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


@dataclass
class EncodingStats:
    examples: int = 0
    trimmed: int = 0
    prompt_tokens: int = 0
    answer_tokens: int = 0
    max_tokens: int = 0


def encode_records(tokenizer: Any, records: Sequence[Mapping[str, Any]], max_length: int) -> tuple[EncodedDataset, EncodingStats]:
    from finqlora.core.chat_format import encode_for_training

    stats = EncodingStats()
    examples = []
    for record in records:
        encoded = encode_for_training(tokenizer, record, max_length)
        examples.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
        stats.examples += 1
        stats.trimmed += int(encoded.trimmed)
        stats.prompt_tokens += encoded.prompt_tokens
        stats.answer_tokens += encoded.answer_tokens
        stats.max_tokens = max(stats.max_tokens, len(encoded.input_ids))
    return EncodedDataset(examples), stats
