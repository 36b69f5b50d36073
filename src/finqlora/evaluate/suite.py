"""Evaluation suites: named groups of public finance sets scored together, one table.

`finqlora eval --suite finance-zh --suite-set fineval=PATH ...` (or `eval.suite` in a run
config) scores every set the user points at, by choice (`finqlora.evaluate.choice`), base
against fine-tuned on the same items. metrics.json gets a `suite` block: per set n, the
accuracies with 95% bootstrap intervals, the difference in points with its paired interval,
McNemar's exact p and the majority baseline; and the average over the sets (each set weighs
the same, its interval from a bootstrap that resamples within every set).

A set's location is a local copy in the set's published format, or `hf:DATASET_ID` (with
`@SPLIT`) read with `datasets.load_dataset` where the network is there. Sets of the suite
that are not given are listed as not evaluated, so a table never hides what it lacks.

Multiple-choice exams (FinEval, CFLUE, C-Eval) are scored in two formulations, each its own
row: the published one (options shown, the letter scored) and the cloze one (`<set>-cloze`:
the question alone, each option's text scored; `benchmarks.cloze_form`). A model at chance on
the letters may still know the answers; the cloze row says whether it does. The average over
the sets takes each set once, in its published formulation, comparable with published scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finqlora.core.config import SUITE_NAMES
from finqlora.core.errors import FinqloraError
from finqlora.core import statistics as S
from finqlora.evaluate.benchmarks import (CLOZE, LETTER, Benchmark, _mcq_csv_items, _read_csv_rows, _subject, cloze_form, items_from_rows,
                                          load_benchmark, make_benchmark)

HUB_PREFIX = "hf:"

# C-Eval's finance and economics subjects (of its 52; the published subject names).
CEVAL_FINANCE_SUBJECTS = ("accountant", "tax_accountant", "college_economics", "business_administration")


@dataclass(frozen=True)
class SuiteSet:
    name: str
    format: str
    what: str
    hub_split: str = "test"
    subjects: tuple[str, ...] = ()  # multiple-choice exams: only these subjects (hub configs / file names)
    multiple_choice: bool = False  # also scored in the cloze formulation, as the set `<name>-cloze`

    @property
    def cloze_name(self) -> str:
        return f"{self.name}-{CLOZE}"


SUITES: dict[str, tuple[SuiteSet, ...]] = {
    "finance-zh": (
        SuiteSet("finfe", "finfe", "BBT-FinCUGE FinFE: financial social-media sentiment (JSON list of [text, label])"),
        SuiteSet("cfbenchmark-sentiment", "cfbenchmark", "CFBenchmark-Basic sentiment (datasets folder, {instruction,input,response})"),
        SuiteSet("cfbenchmark-event", "cfbenchmark", "CFBenchmark-Basic event detection"),
        SuiteSet("cfbenchmark-industry", "cfbenchmark", "CFBenchmark-Basic industry identification"),
        SuiteSet("fpb", "fpb", "Financial PhraseBank (sentence@label lines)"),
        SuiteSet("fineval", "fineval", "FinEval knowledge exams (CSV per subject: id,question,A,B,C,D,answer)", hub_split="val", multiple_choice=True),
        SuiteSet("cflue", "cflue", "CFLUE knowledge (JSON list; single-answer and true/false questions)", multiple_choice=True),
        SuiteSet("ceval-finance", "ceval", "C-Eval finance and economics subjects (CSV per subject)", hub_split="val", subjects=CEVAL_FINANCE_SUBJECTS,
                 multiple_choice=True),
    ),
}
assert tuple(SUITES) == SUITE_NAMES  # the run config's schema names the same suites


def suite_sets(name: str) -> tuple[SuiteSet, ...]:
    if name not in SUITES:
        raise FinqloraError(f"unknown suite {name!r}", hint=f"use one of: {', '.join(SUITES)}")
    return SUITES[name]


def parse_set_arguments(values: Sequence[str]) -> dict[str, str]:
    """`--suite-set NAME=PATH` values -> {name: location}."""
    sets: dict[str, str] = {}
    for value in values:
        name, equals, location = value.partition("=")
        if not equals or not name.strip() or not location.strip():
            raise FinqloraError(f"--suite-set {value!r} is not NAME=PATH", hint="e.g. --suite-set fineval=../shared/data/benchmarks/fineval/val")
        sets[name.strip()] = location.strip()
    return sets


def check_sets(name: str, sets: dict[str, str]) -> None:
    known = {entry.name for entry in suite_sets(name)}
    unknown = sorted(set(sets) - known)
    if unknown:
        raise FinqloraError(f"suite {name} has no set {', '.join(unknown)}", hint=f"its sets: {', '.join(sorted(known))}")
    if not sets:
        raise FinqloraError(f"suite {name}: no set given", hint="point at local copies with --suite-set NAME=PATH (or hf:DATASET_ID); sets: " + ", ".join(sorted(known)))


def _hub_rows(dataset_id: str, config: str | None, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise FinqloraError(f"{HUB_PREFIX}{dataset_id}: reading from the hub needs the datasets package", hint="pip install datasets") from exc
    try:
        loaded = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as exc:  # the hub client raises many kinds (network, missing config, auth)
        raise FinqloraError(f"{HUB_PREFIX}{dataset_id}{f' ({config})' if config else ''}: could not load split {split!r}: {exc}",
                            hint="check the id and the network, or download the set and pass its local path") from exc
    return [dict(row) for row in loaded]


def _load_from_hub(entry: SuiteSet, location: str, limit: int | None, seed: int) -> Benchmark:
    dataset_id, _, split = location[len(HUB_PREFIX):].partition("@")
    split = split or entry.hub_split
    skipped: dict[str, int] = {}
    if entry.subjects:  # one hub config per exam subject (C-Eval's layout)
        items = [item for subject in entry.subjects
                 for item in items_from_rows(entry.format, f"{location} {subject}", _hub_rows(dataset_id, subject, split), subject=subject)]
    else:
        items = items_from_rows(entry.format, location, _hub_rows(dataset_id, None, split), skipped=skipped)
    return make_benchmark(entry.name, entry.format, location, items, limit=limit, seed=seed, skipped=skipped)


def load_set(entry: SuiteSet, location: str, *, limit: int | None = None, seed: int = 0, label_map: dict[str, str] | None = None) -> Benchmark:
    """One suite set from a local copy in its published format, or from the hub."""
    if location.startswith(HUB_PREFIX):
        return _load_from_hub(entry, location, limit, seed)
    path = Path(location)
    if entry.subjects and path.is_dir():
        files = [file for file in sorted(path.glob("*.csv")) if _subject(file) in entry.subjects]
        if not files:
            raise FinqloraError(f"{path}: none of the subjects {', '.join(entry.subjects)} (files SUBJECT_val.csv)",
                                hint="point at C-Eval's val (or test) folder")
        items = [item for file in files for item in _mcq_csv_items(file, _read_csv_rows(file), f"{entry.format}-")]
        return make_benchmark(entry.name, entry.format, str(path), items, limit=limit, seed=seed)
    return load_benchmark(path, entry.format, label_map=label_map, limit=limit, seed=seed, name=entry.name)


def load_suite(name: str, sets: dict[str, str], *, limit: int | None = None, seed: int = 0) -> list[Benchmark]:
    """Every given set; a multiple-choice set also in its cloze formulation (the same items)."""
    check_sets(name, sets)
    benchmarks = []
    for entry in suite_sets(name):
        if entry.name in sets:
            benchmarks.append(load_set(entry, sets[entry.name], limit=limit, seed=seed))
            if entry.multiple_choice:
                benchmarks.append(cloze_form(benchmarks[-1]))
    return benchmarks


def scored_names(meta_suite: dict[str, Any]) -> list[str]:
    """The benchmark names a suite run scores: each given set, and its cloze form where it has one."""
    names = []
    for entry in suite_sets(meta_suite["name"]):
        if entry.name in meta_suite["sets"]:
            names += [entry.name, entry.cloze_name] if entry.multiple_choice else [entry.name]
    return names


# ---------------------------------------------------------------------------------------------
# The suite's table in metrics.json


def _set_row(name: str, table: dict[str, dict[str, Any]], blocks: dict[str, Any]) -> dict[str, Any] | None:
    for key, block_key in ((f"benchmark.{name}.choice_accuracy", f"benchmark.{name}"), (f"benchmark.{name}.accuracy", None)):
        row = table.get(key)
        if row is None:
            continue
        block = blocks.get("choice", {}).get(block_key) if block_key else blocks.get("benchmarks", {}).get(name)
        majority = (block or {}).get("baselines", {}).get("majority", {})
        return {"set": name, "evaluated": True, "scoring": "choice" if block_key else "generate", "n": row["n"],
                "base": row["base"], "base_ci": row["base_ci"], "finetuned": row["finetuned"], "finetuned_ci": row["finetuned_ci"],
                "delta": row["delta"], "delta_ci": row["delta_ci"], "p_value": row.get("p_value"), "verdict": row["verdict"],
                "majority": majority.get("accuracy"), "majority_class": majority.get("class")}
    return None


def suite_block(meta_suite: dict[str, Any], table: list[dict[str, Any]], tasks: dict[str, Any],
                correct: dict[str, dict[str, np.ndarray]], resamples: int, seed: int) -> dict[str, Any]:
    """The `suite` key of metrics.json: a line per set of the suite (evaluated or not) and the average.

    `correct[set][variant]` holds each item's right/wrong (the same items for both variants).
    """
    by_key = {row["key"]: row for row in table}
    sets = []
    for entry in suite_sets(meta_suite["name"]):
        given = entry.name in meta_suite["sets"]
        row = _set_row(entry.name, by_key, tasks) if given else None
        sets.append(row or {"set": entry.name, "evaluated": False})
        sets[-1].update(format=entry.format, what=entry.what, location=meta_suite["sets"].get(entry.name),
                        formulation=LETTER if entry.multiple_choice else None)
        cloze = _set_row(entry.cloze_name, by_key, tasks) if entry.multiple_choice and given else None
        if cloze:  # right below its set (not part of the average); absent when it was not scored (generate-only runs)
            sets.append(cloze)
            sets[-1].update(format=entry.format, what=f"{entry.what}; cloze: each option's text scored", location=meta_suite["sets"][entry.name],
                            formulation=CLOZE)
    evaluated = [row["set"] for row in sets if row["evaluated"] and row["set"] in correct and row["formulation"] != CLOZE]
    block: dict[str, Any] = {"name": meta_suite["name"], "sets": sets, "average": None}
    if evaluated:
        block["average"] = _average(evaluated, correct, resamples, seed)
    return block


def _average(names: list[str], correct: dict[str, dict[str, np.ndarray]], resamples: int, seed: int) -> dict[str, Any]:
    """Mean accuracy over the sets (each set weighs the same), with stratified bootstrap intervals."""
    offsets = np.cumsum([0] + [len(correct[name]["base"]) for name in names])
    strata = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(names))]
    pooled = {v: np.concatenate([correct[name][v] for name in names]).astype(float) for v in ("base", "finetuned")}

    def mean_of_sets(variant: str) -> Callable[[np.ndarray], float]:
        # `indices` concatenates one resample per set (the bootstrap's strata), in set order
        return lambda indices: float(np.mean([pooled[variant][indices[(indices >= s[0]) & (indices <= s[-1])]].mean() for s in strata]))

    everything = np.arange(int(offsets[-1]))
    boot = S.paired_bootstrap(mean_of_sets("base"), mean_of_sets("finetuned"), len(everything), n_resamples=resamples, seed=seed, strata=strata)
    base, tuned = mean_of_sets("base")(everything), mean_of_sets("finetuned")(everything)
    return {"sets": names, "n": int(offsets[-1]), "weighting": "each set weighs the same",
            "base": base, "base_ci": [boot.first.low, boot.first.high],
            "finetuned": tuned, "finetuned_ci": [boot.second.low, boot.second.high],
            "delta": tuned - base, "delta_ci": [boot.difference.low, boot.difference.high]}
