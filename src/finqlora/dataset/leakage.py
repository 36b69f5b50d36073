"""Keeping what the model is scored on out of what it trains on, after the drafts are made:
records whose news near-duplicates one of an earlier split, and records that duplicate an
evaluation item (`--decontaminate`), are dropped and counted in the stats."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finqlora.core import textdedup
from finqlora.dataset import mixture
from finqlora.dataset.drafts import PUBLIC, SPLITS, Draft


def drop_cross_split_duplicates(drafts: list[Draft], threshold: float, notices: list[str], stats: dict[str, Any]) -> list[Draft]:
    """Drop any news-based record whose news text near-duplicates one in an earlier split.

    report_qa statements are random (pairwise 3-gram Jaccard about 0.3, at most 0.48 over
    79,800 measured pairs) and templates are split by template, so only records that carry
    news are compared.
    """
    groups = [[d for d in drafts if d.split == s and d.news] for s in SPLITS]
    others = [d for d in drafts if not d.news]
    texts = [[d.news for d in group] for group in groups]
    pairs = textdedup.cross_group_duplicates(texts, threshold)
    drop = {(gb, ib) for _, _, gb, ib in pairs}
    # Two records of the same event in one split are not a leak; only the later split loses.
    stats["cross_split_near_duplicates_removed"] = len(drop)
    if drop:
        notices.append(f"{len(drop)} record(s) near-duplicated a record of an earlier split and were left out")
    return [d for g, group in enumerate(groups) for i, d in enumerate(group) if (g, i) not in drop] + others


def decontaminate(drafts: list[Draft], eval_paths: Sequence[Path], threshold: float, notices: list[str],
                  stats: dict[str, Any]) -> list[Draft]:
    """Drop every record whose main text duplicates (exactly or nearly) an evaluation item."""
    if not eval_paths:
        return drafts
    eval_sets = {str(path): mixture.eval_texts(Path(path)) for path in eval_paths}
    hits = mixture.contaminated([d.news or d.input for d in drafts], eval_sets, threshold)
    # A mixed-in instruction row (DISC-Fin-SFT, Alpaca) often holds its question in the instruction, its input empty.
    public = [i for i, d in enumerate(drafts) if d.type == PUBLIC]
    for index, name in mixture.contaminated([drafts[i].instruction for i in public], eval_sets, threshold).items():
        hits.setdefault(public[index], name)
    by_type = Counter(drafts[i].type for i in hits)
    stats["decontamination"] = {"eval_sets": {k: len(v) for k, v in eval_sets.items()}, "threshold": threshold,
                                "dropped": len(hits), "dropped_by_type": dict(sorted(by_type.items())),
                                "dropped_by_eval_set": dict(sorted(Counter(hits.values()).items()))}
    if hits:
        notices.append(f"{len(hits)} record(s) duplicated an evaluation item and were left out (decontamination)")
    return [d for i, d in enumerate(drafts) if i not in hits]
