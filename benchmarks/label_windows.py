"""Does a 15-minute direction mean anything? The measurement behind `LabelRules.hold_adjacent`.

For every flash with XAUUSD returns at 10, 15, 30 and 120 minutes: sigma per window from the
first 80% of flashes in time (as the builder does on the train split), z = r / sigma, and for
the flashes outside the neutral band |z15| > 0.5, how often the 15-minute sign is still the
sign at 120 minutes, split by whether the sign held at 10 and 30 minutes.

    python benchmarks/label_windows.py --db finance_analysis.db [--ticker XAUUSD]
"""

from __future__ import annotations

import argparse
import sqlite3
from collections import defaultdict

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--ticker", default="XAUUSD")
    parser.add_argument("--band", type=float, default=0.5)
    args = parser.parse_args()
    conn = sqlite3.connect(args.db)
    rows = conn.execute(
        "SELECT e.event_id, e.ts_utc, i.window_min, i.ret FROM event_impacts i JOIN events e USING (event_id) "
        "WHERE i.ticker = ? AND i.ret IS NOT NULL AND e.primary_event_id IS NULL", (args.ticker,)).fetchall()
    returns: dict[str, dict[int, float]] = defaultdict(dict)
    times = {}
    for event_id, ts, window, ret in rows:
        returns[event_id][window] = ret
        times[event_id] = ts
    ids = sorted((e for e in returns if all(w in returns[e] for w in (10, 15, 30, 120))), key=times.__getitem__)
    train = ids[: int(0.8 * len(ids))]
    sigma = {}
    for w in (10, 15, 30, 120):
        values = np.array([returns[e][w] for e in train])
        sigma[w] = 1.4826 * np.median(np.abs(values - np.median(values)))
    directional = [e for e in ids if abs(returns[e][15] / sigma[15]) > args.band]
    held = [e for e in directional if np.sign(returns[e][10]) == np.sign(returns[e][15]) == np.sign(returns[e][30])]
    flipped = [e for e in directional if e not in set(held)]

    def same_sign_at_120(group: list[str]) -> float:
        return float(np.mean([np.sign(returns[e][120]) == np.sign(returns[e][15]) for e in group])) if group else float("nan")

    def drift_after_30(group: list[str]) -> float:
        return float(np.mean([np.sign(returns[e][120] - returns[e][30]) == np.sign(returns[e][15]) for e in group]))

    print(f"flashes with all windows: {len(ids)}; outside |z15| > {args.band}: {len(directional)} ({len(directional) / len(ids):.1%})")
    print(f"sign held at 10 and 30: {len(held)} ({len(held) / len(directional):.1%})")
    print(f"15-min sign == 120-min sign: all {same_sign_at_120(directional):.1%}, held {same_sign_at_120(held):.1%}, "
          f"not held {same_sign_at_120(flipped):.1%}")
    print(f"sign(r120 - r30) == 15-min sign: all {drift_after_30(directional):.1%}, held {drift_after_30(held):.1%}")


if __name__ == "__main__":
    main()
