"""Event store speed and memory: ingest ~30k CLS events + ~280k 1-minute bars, impacts for 5 windows.

Target (issue 2): the whole job under 30 s on a 2-core machine, peak memory under 1 GB.

    .venv/bin/python benchmarks/store_benchmark.py [--data ../shared/data] [--json results.json]

The job runs in a fresh child process (its peak RSS, from getrusage(RUSAGE_CHILDREN), is the
job's own, not this script's) and is the same as the CLI:

    finqlora db ingest-news --db B.db --format cls news/cls_2026-0*.slim.jsonl.gz
    finqlora db ingest-prices --db B.db --ticker XAUUSD --tz UTC prices/XAUUSD_1min_UTC_*.csv
    finqlora db impacts --db B.db --windows 5,10,15,30,120 --pre-windows 120

Baselines measured in the same run, also in child processes:

- `read floor`: only gunzip + json.loads every news line and csv-split every bar row, storing
  nothing: what any ingest has to pay. The ratio says how much validation, dedup, SQLite and
  indexes cost on top.
- `naive impacts`: the same returns from a per-event, per-window Python loop with bisect over
  the bars (the obvious implementation), against `impacts.event_returns` (numpy searchsorted)
  on the same in-memory arrays. The ratio is the speed-up of the compute step alone (loading
  bars and writing rows to SQLite are the same for both); the benchmark also checks that both
  give identical returns and match the stored rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

WINDOWS = (5, 10, 15, 30, 120)
PRE_WINDOWS = (120,)


def _files(data: Path) -> tuple[list[Path], list[Path]]:
    news = sorted((data / "news").glob("cls_2026-0*.slim.jsonl.gz"))
    prices = sorted((data / "prices").glob("XAUUSD_1min_UTC_*.csv"))
    if not news or not prices:
        raise SystemExit(f"no CLS news or XAUUSD bars under {data} (pass --data)")
    return news, prices


def child_full(data: Path, db: Path) -> dict:
    from finqlora.store import ingest
    from finqlora.store.impacts import compute_impacts

    news, prices = _files(data)
    timings = {}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    news_report = ingest.ingest_news(db, news)
    timings["ingest_news_s"] = time.perf_counter() - start
    mark = time.perf_counter()
    price_report = ingest.ingest_prices(db, "XAUUSD", prices, tz="UTC")
    timings["ingest_prices_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    impact_report = compute_impacts(db, tickers=["XAUUSD"], windows=WINDOWS, pre_windows=PRE_WINDOWS)
    timings["impacts_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds do not grow when other jobs share the cores; wall seconds do.
    timings["total_cpu_s"] = usage.ru_utime + usage.ru_stime - cpu_start
    mark = time.perf_counter()
    rerun = compute_impacts(db, tickers=["XAUUSD"], windows=WINDOWS, pre_windows=PRE_WINDOWS)
    timings["impacts_rerun_s"] = time.perf_counter() - mark
    return {
        **timings,
        "events": news_report.inserted,
        "bars": price_report.inserted,
        "impact_rows": impact_report.rows_written,
        "known_returns": impact_report.known_returns["XAUUSD"],
        "rerun_computed_events": rerun.computed_events["XAUUSD"],
    }


def child_read_floor(data: Path) -> dict:
    import csv
    import gzip

    news, prices = _files(data)
    start = time.perf_counter()
    lines = rows = 0
    for path in news:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                json.loads(line)
                lines += 1
    for path in prices:
        with open(path, newline="", encoding="utf-8") as handle:
            for _ in csv.reader(handle):
                rows += 1
    return {"total_s": time.perf_counter() - start, "news_lines": lines, "csv_rows": rows}


def child_naive_impacts(db: Path) -> dict:
    """Per-event loop with bisect vs `impacts.event_returns`, both on the same in-memory arrays.

    Same conventions (t0 tolerance 5 min, end tolerance 1 min); both results are also compared
    with what `finqlora db impacts` stored.
    """
    import bisect
    import sqlite3

    import numpy as np

    from finqlora.store.impacts import event_returns

    conn = sqlite3.connect(db)
    bars = conn.execute("SELECT ts, close FROM prices WHERE ticker = 'XAUUSD' ORDER BY ts").fetchall()
    events = conn.execute("SELECT event_id, ts_utc FROM events ORDER BY ts_utc").fetchall()
    times = [b[0] for b in bars]
    closes = [b[1] for b in bars]
    signed = (*WINDOWS, *(-p for p in PRE_WINDOWS))
    start = time.perf_counter()
    last = times[-1]
    naive = {}
    for event_id, t in events:
        i0 = bisect.bisect_right(times, t) - 1
        for window in signed:
            value = None
            if i0 >= 0 and t - times[i0] <= 300:
                target = times[i0] + window * 60
                j = bisect.bisect_right(times, target) - 1
                if j >= 0 and target - times[j] <= 60 and target <= last:
                    value = closes[j] / closes[i0] - 1 if window > 0 else closes[i0] / closes[j] - 1
            naive[(event_id, window)] = value
    naive_s = time.perf_counter() - start
    bar_ts, bar_close = np.array(times, dtype=np.int64), np.array(closes)
    event_ts = np.array([e[1] for e in events], dtype=np.int64)
    start = time.perf_counter()
    results = event_returns(bar_ts, bar_close, event_ts, WINDOWS, PRE_WINDOWS, t0_tolerance_min=5, end_tolerance_min=1)
    vector_s = time.perf_counter() - start
    stored = {(e, w): r for e, w, r in conn.execute("SELECT event_id, window_min, ret FROM event_impacts WHERE ticker = 'XAUUSD'")}

    def differs(a, b) -> bool:
        return (a is None) != (b is None) or (a is not None and not np.isclose(a, b, rtol=1e-12, atol=0))

    mismatches = sum(differs(value, stored.get(key)) for key, value in naive.items())
    for result in results:
        for (event_id, _), ret in zip(events, result.ret.tolist()):
            mismatches += differs(None if np.isnan(ret) else ret, naive[(event_id, result.window_min)])
    return {"naive_s": naive_s, "vectorised_s": vector_s, "checked": len(naive), "mismatches": mismatches}


def _run_child(mode: str, *args: str) -> tuple[dict, float]:
    """Run one measurement in a fresh process; returns its result and its peak RSS in MiB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, __file__, "--child", mode, *args], check=True, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all waited-for children; children run one at a time
    # and the full job runs first, so its value is exact and later ones are upper bounds.
    return json.loads(out.stdout.strip().splitlines()[-1]), max(after, before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("FINQLORA_SHARED_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--json", type=Path, help="Also write the results to this JSON file.")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, *rest = args.child
        if mode == "full":
            result = child_full(Path(rest[0]), Path(rest[1]))
        elif mode == "floor":
            result = child_read_floor(Path(rest[0]))
        else:
            result = child_naive_impacts(Path(rest[0]))
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        full, peak_mib = _run_child("full", str(args.data), str(db))
        floor, _ = _run_child("floor", str(args.data))
        naive, _ = _run_child("naive", str(db))
    load = os.getloadavg()[0]
    summary = {
        "load_average_1min": load,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "full": full,
        "peak_rss_mib": round(peak_mib, 1),
        "read_floor": floor,
        "naive_impacts": naive,
        "ratio_total_vs_read_floor": full["total_s"] / floor["total_s"],
        "speedup_vectorised_vs_naive_impacts": naive["naive_s"] / naive["vectorised_s"],
        "target_30s": full["total_s"] < 30,
        "target_1gb": peak_mib < 1024,
    }
    print(f"machine: {summary['machine']}")
    print(f"events {full['events']:,}  bars {full['bars']:,}  impact rows {full['impact_rows']:,}")
    print(
        f"ingest news {full['ingest_news_s']:.2f} s | ingest prices {full['ingest_prices_s']:.2f} s | "
        f"impacts {full['impacts_s']:.2f} s | TOTAL {full['total_s']:.2f} s (target < 30 s: {'PASS' if summary['target_30s'] else 'FAIL'})"
    )
    print(f"CPU time of the job {full['total_cpu_s']:.2f} s (load average {load:.1f} on {os.cpu_count()} cores: other jobs stretch the wall time)")
    print(f"peak RSS {peak_mib:.0f} MiB (target < 1024 MiB: {'PASS' if summary['target_1gb'] else 'FAIL'})")
    print(f"impacts rerun (incremental): {full['impacts_rerun_s']:.2f} s, {full['rerun_computed_events']} events recomputed (pending ones)")
    print(f"baseline read floor {floor['total_s']:.2f} s -> full job = {summary['ratio_total_vs_read_floor']:.2f} x the floor")
    print(
        f"baseline naive impacts loop {naive['naive_s']:.3f} s vs vectorised {naive['vectorised_s']:.3f} s -> "
        f"{summary['speedup_vectorised_vs_naive_impacts']:.1f} x faster ({naive['mismatches']} mismatches in {naive['checked']:,} returns, "
        "both also checked against the stored rows)"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
