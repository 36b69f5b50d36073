"""What every step of the builder shares: the draft record, the record types and splits, and
the two deterministic helpers each sampler uses (shares -> counts, seed + tag -> RNG).

A draft is a record before trimming and numbering; `finqlora.dataset.dataset_file.to_record`
turns it into a line of the JSONL file."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TYPES = ("news_impact", "market_analysis", "report_qa")
PUBLIC = "public_data"  # records from --add-dataset sources
RECORD_ORDER = (*TYPES, PUBLIC, "template")
SPLITS = ("train", "val", "test")


@dataclass
class Draft:
    """A record before trimming: its input is prefix + news + suffix so the news can be cut."""

    type: str
    split: str
    record_id: str
    instruction: str
    output: str
    label: dict[str, Any]
    input_prefix: str = ""
    news: str = ""
    input_suffix: str = ""
    event_id: str | None = None
    event_time: str | None = None
    ts: int = 0
    compact_input: str | None = None  # report_qa: the statement with only the figures asked about

    @property
    def input(self) -> str:
        return self.input_prefix + self.news + self.input_suffix


def allocate(total: int, shares: Sequence[float]) -> list[int]:
    """Split an integer total by shares (largest remainder; ties to the earlier part)."""
    weights = [s / sum(shares) for s in shares]
    raw = [total * w for w in weights]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def seeded_rng(seed: int, tag: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so this is stable across runs/platforms.
    return random.Random(f"finqlora-{seed}-{tag}")
