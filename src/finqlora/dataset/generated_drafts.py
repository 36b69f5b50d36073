"""Drafts the builder generates rather than reads from the store: report_qa (simulated
statements, `finqlora.dataset.report_qa`) and the built-in templates (`finqlora.dataset.templates`),
each divided over the splits by the split shares; a template's records stay in one split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from finqlora.dataset import report_qa, templates
from finqlora.dataset.drafts import SPLITS, Draft, allocate, seeded_rng


def template_drafts(count: int, shares: Sequence[float], seed: int, reason: str) -> list[Draft]:
    """Template records, each template wholly inside one split (no cross-split near-duplicates)."""
    records = templates.generate_template_records(count, seeded_rng(seed, f"templates-{reason}"))
    by_template: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_template.setdefault(record["label"]["template_id"], []).append(record)
    targets = dict(zip(SPLITS, allocate(count, shares)))
    filled = {s: 0 for s in SPLITS}
    order = sorted(by_template)
    seeded_rng(seed, f"template-split-{reason}").shuffle(order)
    drafts = []
    for template_id in order:
        group = by_template[template_id]
        # The split furthest below its target (relative) takes the next template.
        split = max(SPLITS, key=lambda s: ((targets[s] - filled[s]) / max(targets[s], 1), -SPLITS.index(s)))
        filled[split] += len(group)
        for record in group:
            drafts.append(Draft("template", split, "", record["instruction"], record["output"], record["label"], input_prefix=record["input"]))
    return drafts


def report_drafts(count: int, shares: Sequence[float], seed: int) -> list[Draft]:
    rng = seeded_rng(seed, "report_qa")
    records = report_qa.generate_records(count, rng)
    splits = [s for s, n in zip(SPLITS, allocate(count, shares)) for _ in range(n)]
    drafts = []
    for record, split in zip(records, splits):
        drafts.append(
            Draft("report_qa", split, "", record["instruction"], record["output"], record["label"],
                  input_prefix=record["input"], compact_input=record["compact_input"])
        )
    return drafts
