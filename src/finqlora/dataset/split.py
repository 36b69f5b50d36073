"""The time split: events ordered by publication time are cut into train/val/test by count,
never splitting one timestamp, with an embargo after each boundary so a train event's return
windows never reach into the next split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from finqlora.dataset.drafts import SPLITS, allocate
from finqlora.store import db as store

# How the split is made, as the stats file's `rules.split` says it.
SPLIT_RULE = ("by event time: the first share of the time-ordered events is train, then val, then test; "
              "ties stay together; events within embargo_min after a boundary are dropped")


@dataclass
class SplitPlan:
    pools: dict[str, list[store.Event]]
    boundaries: dict[str, str | None]  # last event time of train / val
    embargoed: int


def split_by_time(events: Sequence[store.Event], shares: Sequence[float], embargo_min: int) -> SplitPlan:
    """Cut time-sorted events into train/val/test by count, never splitting one timestamp.

    Events within `embargo_min` minutes after the previous split's last event are dropped.
    """
    counts = allocate(len(events), shares)
    pools: dict[str, list[store.Event]] = {s: [] for s in SPLITS}
    boundaries: dict[str, str | None] = {"train_end": None, "val_end": None}
    cut_ts: list[int] = []
    start = 0
    for count in counts[:-1]:
        end = min(start + count, len(events))
        if end > start:
            # Events sharing the boundary's timestamp stay with it (a strict time order).
            while end < len(events) and events[end].ts_utc == events[end - 1].ts_utc:
                end += 1
            cut_ts.append(events[end - 1].ts_utc)
        else:
            cut_ts.append(cut_ts[-1] if cut_ts else events[0].ts_utc - 1 if events else -1)
        start = end
    embargoed = 0
    for event in events:
        ts = event.ts_utc
        if ts <= cut_ts[0]:
            pools["train"].append(event)
        elif ts <= cut_ts[1]:
            if ts - cut_ts[0] < embargo_min * 60:
                embargoed += 1
            else:
                pools["val"].append(event)
        elif ts - cut_ts[1] < embargo_min * 60:
            embargoed += 1
        else:
            pools["test"].append(event)
    for key, split in (("train_end", "train"), ("val_end", "val")):
        if pools[split]:
            boundaries[key] = pools[split][-1].published_at
    return SplitPlan(pools, boundaries, embargoed)
