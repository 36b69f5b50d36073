"""Dataset builder speed: 300 and 20,000 samples from a store of ~30k real events.

Targets (issue 3): 300 samples in under 10 s and 20,000 in under 60 s on the 2-core machine.

    .venv/bin/python benchmarks/builder_benchmark.py [--db finance_analysis.db] [--data ../shared/data] [--json out.json]

Without --db the store is built first (not timed) from ../shared/data by the store's own code:
CLS flashes 2026-05..07 (~30k events), XAUUSD 1-minute bars, impacts for 5 post windows and
the 120-minute pre window. Each build is timed in wall-clock and CPU seconds (the machine is
shared, so CPU time is the steadier number); the build is the same as

    finqlora build --db STORE --output OUT.jsonl --num-samples N

Baselines measured in the same run:
- `read floor`: only `db.read_events` + `db.read_impacts` on the same store, which any builder
  must pay; the ratio says what dedup, splitting, labelling, text and writing cost on top.
- `brute-force dedup`: greedy near-duplicate removal with exact Jaccard against every kept
  text (the obvious O(n^2) method) on the first 3,000 events, against `textdedup.deduplicate`
  (MinHash/LSH + exact verification) on the same texts: the speed ratio, and the LSH method's
  recall (share of the brute-force duplicates it also finds).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from finqlora.store import db as store  # noqa: E402
from finqlora.core import textdedup  # noqa: E402
from finqlora.dataset.build_config import BuildConfig  # noqa: E402
from finqlora.dataset.builder import build_dataset  # noqa: E402
from finqlora.dataset.store_reader import news_text  # noqa: E402

TARGETS = {300: 10.0, 20_000: 60.0}


def build_store(data: Path, folder: Path) -> Path:
    from finqlora.store.impacts import compute_impacts
    from finqlora.store.ingest import ingest_news, ingest_prices

    db = folder / "finance_analysis.db"
    ingest_news(db, sorted((data / "news").glob("cls_2026-0*.slim.jsonl.gz")), fmt="cls")
    ingest_prices(db, "XAUUSD", sorted((data / "prices").glob("XAUUSD_1min_UTC_*.csv")), tz="UTC")
    compute_impacts(db)
    return db


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def read_floor(db: Path) -> tuple[float, float, int]:
    def read():
        conn = store.connect(db, readonly=True)
        try:
            return store.read_events(conn), store.read_impacts(conn)
        finally:
            conn.close()

    (events, _), wall, cpu = timed(read)
    return wall, cpu, len(events)


def brute_force_dedup(texts: list[str], threshold: float) -> set[int]:
    shingled = textdedup.shingle_all(texts)
    sets = [shingled.set_of(i) for i in range(len(texts))]
    kept: list[int] = []
    dropped: set[int] = set()
    for i, s in enumerate(sets):
        if any(textdedup.jaccard(s, sets[k]) >= threshold for k in kept):
            dropped.add(i)
        else:
            kept.append(i)
    return dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, help="existing store (default: build one from --data)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--sizes", default="300,20000")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="finqlora-builder-bench-") as tmp:
        folder = Path(tmp)
        if args.db:
            db = args.db
        else:
            if not (args.data / "README.md").exists():
                sys.exit(f"no data at {args.data}: pass --data or --db")
            print(f"building the store from {args.data} (not timed) ...", flush=True)
            db = build_store(args.data, folder)

        floor_wall, floor_cpu, events = read_floor(db)
        print(f"store: {events} events; read floor {floor_wall:.2f} s wall, {floor_cpu:.2f} s CPU")

        conn = store.connect(db, readonly=True)
        sample = sorted((e for e in store.read_events(conn, primaries_only=True) if e.ts_utc is not None),
                        key=lambda e: (e.ts_utc, e.event_id))[:3000]
        conn.close()
        texts = [news_text(e) for e in sample]
        brute, brute_wall, _ = timed(lambda: brute_force_dedup(texts, textdedup.DEFAULT_THRESHOLD))
        lsh, lsh_wall, _ = timed(lambda: textdedup.deduplicate(texts))
        recall = len(brute & set(lsh.duplicate_of)) / len(brute) if brute else 1.0
        print(f"dedup of {len(texts)} texts: brute force {brute_wall:.2f} s ({len(brute)} duplicates), "
              f"LSH {lsh_wall:.2f} s ({len(lsh.duplicate_of)} duplicates): {brute_wall / lsh_wall:.1f}x faster, recall {recall:.3f}")

        results = {
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
            "events": events,
            "read_floor_s": round(floor_wall, 2),
            "dedup": {"texts": len(texts), "brute_force_s": round(brute_wall, 2), "lsh_s": round(lsh_wall, 2),
                      "speedup": round(brute_wall / lsh_wall, 1), "recall": round(recall, 4)},
            "builds": [],
        }
        print(f"{'samples':>8} {'wall s':>7} {'cpu s':>6} {'x floor':>8} {'target':>7}  ok")
        for size in (int(s) for s in args.sizes.split(",")):
            out = folder / f"build-{size}" / "instructions.jsonl"
            result, wall, cpu = timed(lambda: build_dataset(BuildConfig(output=out, db=db, num_samples=size, progress=False)))
            target = TARGETS.get(size)
            ok = "yes" if target is None or wall < target else "NO"
            print(f"{size:>8} {wall:>7.2f} {cpu:>6.2f} {wall / floor_wall:>8.1f} {target or '-':>7}  {ok}")
            results["builds"].append({"samples": size, "records": len(result.records), "wall_s": round(wall, 2),
                                      "cpu_s": round(cpu, 2), "ratio_to_read_floor": round(wall / floor_wall, 1),
                                      "target_s": target, "met": ok == "yes"})
        if args.json:
            args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
