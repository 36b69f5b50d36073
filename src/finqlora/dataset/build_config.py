"""The options of one dataset build, checked, and their one mapping from a run config.

`BuildConfig.from_run` is how `finqlora build` and the pipeline's build stage turn the run
config's `data` section (and the train settings it needs) into a build; `validate` refuses
what no build can use, with the flag named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from finqlora.core import textdedup
from finqlora.core.config import MIN_MAX_LENGTH, RunConfig
from finqlora.core.errors import FinqloraError
from finqlora.core.records import RECORD_FORMATS
from finqlora.dataset import labels as lab
from finqlora.dataset import mixture


@dataclass(frozen=True)
class BuildConfig:
    output: Path
    db: Path | None = None
    num_samples: int = 300
    mix: tuple[float, float, float] = (60.0, 20.0, 20.0)  # news_impact, market_analysis, report_qa
    split: tuple[float, float, float] = (80.0, 10.0, 10.0)
    seed: int = 0
    format: str = "alpaca"  # or "messages" or "sharegpt"
    templates_only: bool = False
    tokenizer: str | None = None
    max_length: int = 512
    rules: lab.LabelRules = field(default_factory=lab.LabelRules)
    primary_ticker: str | None = None
    dedup_threshold: float = textdedup.DEFAULT_THRESHOLD
    embargo_min: int = 120
    naive_tz: str | None = None
    progress: bool = True
    add: tuple[mixture.AddSource, ...] = ()  # public data mixed in, on top of num_samples
    decontaminate: tuple[Path, ...] = ()  # evaluation files no record may duplicate

    @classmethod
    def from_run(cls, cfg: RunConfig, *, db: Path | None, output: Path) -> BuildConfig:
        """The one mapping from a run config's `data` section (and the train settings it needs).

        Every field has the key's name, except where the builder's object says more: `rules`
        holds the label keys, `naive_tz` is `data.tz`. Lengths are counted with the tokenizer
        that will train (`data.tokenizer`, else `train.model`; 'chars' = a character estimate)
        against `train.max_length`, so trimming matches what training sees.
        """
        data = cfg.data
        return cls(
            output=Path(output),
            db=Path(db) if db is not None else None,
            num_samples=data.num_samples,
            mix=data.mix,
            split=data.split,
            seed=data.seed,
            format=data.format,
            templates_only=data.templates_only,
            tokenizer=None if data.tokenizer == "chars" else data.tokenizer or cfg.train.model,
            max_length=cfg.train.max_length,
            rules=lab.LabelRules(primary_window=data.primary_window, threshold_k=data.threshold_k),
            primary_ticker=data.primary_ticker,
            dedup_threshold=data.dedup_threshold,
            embargo_min=data.embargo_min,
            naive_tz=data.tz,
            add=tuple(mixture.AddSource(Path(a.path), a.format, a.samples) for a in data.add),
            decontaminate=tuple(Path(p) for p in (*data.decontaminate, *_benchmark_paths(cfg))),
        )

    def validate(self) -> None:
        if self.num_samples < 1:
            raise FinqloraError(f"--num-samples must be at least 1, got {self.num_samples}")
        for name, parts in (("--mix", self.mix), ("--split", self.split)):
            if len(parts) != 3 or any(p < 0 or not math.isfinite(p) for p in parts) or sum(parts) <= 0:
                raise FinqloraError(f"{name} needs three non-negative numbers with a positive sum, got {parts}",
                                    hint=f"e.g. {name} 60,20,20")
        if self.split[0] <= 0:
            raise FinqloraError("the train share of --split must be positive", hint="e.g. --split 80,10,10")
        if self.format not in RECORD_FORMATS:
            raise FinqloraError(f"unknown --format {self.format!r}", hint=f"use one of {', '.join(RECORD_FORMATS)}")
        if self.max_length < MIN_MAX_LENGTH:  # the bound of train.max_length, so a config training accepts builds
            raise FinqloraError(f"--max-length {self.max_length} is too small for any record", hint="use 256 or more (default 512)")
        if not 0 < self.dedup_threshold <= 1:
            raise FinqloraError(f"--dedup-threshold must be in (0, 1], got {self.dedup_threshold}")
        for source in self.add:
            source.validate()
        for path in self.decontaminate:
            if not Path(path).exists():
                raise FinqloraError(f"--decontaminate {path} does not exist", hint="pass the evaluation files the model will be scored on")


def _benchmark_paths(cfg: RunConfig) -> list[str]:
    """The files of `eval.benchmarks` (plain paths, or entries with a `path`) and the local sets
    of `eval.suite`, for decontamination."""
    paths = []
    for entry in cfg.eval.benchmarks:
        path = entry if isinstance(entry, str) else getattr(entry, "path", None)
        if path:
            paths.append(str(path))
    if cfg.eval.suite is not None:
        paths += [location for location in cfg.eval.suite.sets.values() if not location.startswith("hf:")]
    return paths
