"""What is in a store: events by source, star and month; impact coverage; return distributions."""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from finqlora.store.db import connect, get_meta, store_error, table_columns


@dataclass
class ReturnDistribution:
    count: int
    mean: float
    std: float
    p05: float
    p25: float
    median: float
    p75: float
    p95: float
    share_up: float  # fraction of returns > 0


@dataclass
class StoreStats:
    path: str
    synthetic: bool
    schema_version: str | None
    events: int
    primaries: int
    linked_duplicates: int
    first_event: str | None
    last_event: str | None
    by_source: dict[str, int] = field(default_factory=dict)
    by_star: dict[str, int] = field(default_factory=dict)
    by_month: dict[str, int] = field(default_factory=dict)
    prices: dict[str, dict[str, object]] = field(default_factory=dict)  # ticker -> bars, first, last
    # ticker -> window_min -> {"known": n, "events": m, "coverage": n/m, "by_status": {...}}
    coverage: dict[str, dict[int, dict[str, object]]] = field(default_factory=dict)
    returns: dict[str, dict[int, ReturnDistribution]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        # JSON keys must be strings; keep windows readable ("5", "-120").
        data["coverage"] = {t: {str(w): v for w, v in by_w.items()} for t, by_w in data["coverage"].items()}
        data["returns"] = {t: {str(w): v for w, v in by_w.items()} for t, by_w in data["returns"].items()}
        return data


def _distribution(values: np.ndarray) -> ReturnDistribution:
    p05, p25, median, p75, p95 = (float(x) for x in np.percentile(values, [5, 25, 50, 75, 95]))
    return ReturnDistribution(
        count=int(len(values)),
        mean=float(values.mean()),
        std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        p05=p05,
        p25=p25,
        median=median,
        p75=p75,
        p95=p95,
        share_up=float((values > 0).mean()),
    )


def store_stats(path: str | Path) -> StoreStats:
    """Read-only summary of a finqlora store (or a user's database with the same tables)."""
    conn = connect(path, readonly=True)
    try:
        return _stats(conn, str(path))
    except sqlite3.DatabaseError as exc:  # a damaged page met while counting
        error = store_error(exc, path)
        if error is None:
            raise
        raise error from exc
    finally:
        conn.close()


def _stats(conn: sqlite3.Connection, path: str) -> StoreStats:
    meta = get_meta(conn)
    event_columns = set(table_columns(conn, "events"))
    has = event_columns.__contains__
    total = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] if event_columns else 0
    linked = conn.execute("SELECT COUNT(*) FROM events WHERE primary_event_id IS NOT NULL").fetchone()[0] if has("primary_event_id") else 0
    first = last = None
    by_month: dict[str, int] = {}
    if has("ts_utc"):
        first, last = conn.execute(
            "SELECT strftime('%Y-%m-%dT%H:%M:%SZ', MIN(ts_utc), 'unixepoch'), strftime('%Y-%m-%dT%H:%M:%SZ', MAX(ts_utc), 'unixepoch') FROM events"
        ).fetchone()
        by_month = dict(
            conn.execute(
                "SELECT COALESCE(strftime('%Y-%m', ts_utc, 'unixepoch'), 'unknown') AS m, COUNT(*) FROM events GROUP BY m ORDER BY m"
            ).fetchall()
        )
    stats = StoreStats(
        path=path,
        synthetic=meta.get("synthetic") == "true",
        schema_version=meta.get("schema_version"),
        events=total,
        primaries=total - linked,
        linked_duplicates=linked,
        first_event=first,
        last_event=last,
        by_month=by_month,
    )
    if has("source"):
        stats.by_source = {str(k): v for k, v in conn.execute("SELECT COALESCE(source, 'unknown'), COUNT(*) FROM events GROUP BY 1 ORDER BY 2 DESC")}
    if has("star"):
        stats.by_star = {str(k): v for k, v in conn.execute("SELECT COALESCE(CAST(star AS TEXT), 'none'), COUNT(*) FROM events GROUP BY 1 ORDER BY 1")}
    if table_columns(conn, "prices"):
        for ticker, bars, lo, hi in conn.execute(
            "SELECT ticker, COUNT(*), strftime('%Y-%m-%dT%H:%M:%SZ', MIN(ts), 'unixepoch'), strftime('%Y-%m-%dT%H:%M:%SZ', MAX(ts), 'unixepoch') FROM prices GROUP BY ticker"
        ):
            stats.prices[ticker] = {"bars": bars, "first": lo, "last": hi}
    impact_columns = set(table_columns(conn, "event_impacts"))
    if impact_columns:
        status = "status" if "status" in impact_columns else "CASE WHEN ret IS NULL THEN 'unknown' ELSE 'ok' END"
        for ticker, window, state, count in conn.execute(f"SELECT ticker, window_min, {status}, COUNT(*) FROM event_impacts GROUP BY 1, 2, 3"):
            entry = stats.coverage.setdefault(ticker, {}).setdefault(int(window), {"known": 0, "events": total, "coverage": 0.0, "by_status": {}})
            entry["by_status"][str(state)] = count
        for ticker, window, known in conn.execute("SELECT ticker, window_min, COUNT(*) FROM event_impacts WHERE ret IS NOT NULL GROUP BY 1, 2"):
            entry = stats.coverage[ticker][int(window)]
            entry["known"] = known
            entry["coverage"] = known / total if total else 0.0
        for ticker, windows in stats.coverage.items():
            stats.coverage[ticker] = dict(sorted(windows.items(), key=lambda kv: (kv[0] < 0, abs(kv[0]))))
            for window in stats.coverage[ticker]:
                values = np.array(
                    [r[0] for r in conn.execute("SELECT ret FROM event_impacts WHERE ticker = ? AND window_min = ? AND ret IS NOT NULL", (ticker, window))],
                    dtype=np.float64,
                )
                if len(values):
                    stats.returns.setdefault(ticker, {})[window] = _distribution(values)
    return stats
