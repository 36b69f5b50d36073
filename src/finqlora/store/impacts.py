"""Event-study returns: how a ticker moved before and after each news event.

Conventions (docs/store.md):

- t0 = the last bar at or before the event time t, and at most `t0_tolerance_min` minutes
  before it (default 5); otherwise the market was closed or the feed had a gap and no return
  is known (status `no_t0_bar`).
- Post-event return over w minutes: close(t0 + w) / close(t0) - 1, stored with
  `window_min = w` (5, 10, 15, 30, 120 by default).
- Pre-event return over w minutes: close(t0) / close(t0 - w) - 1, stored with
  `window_min = -w` (-120 by default), so users' queries on 5..120 keep meaning post-event.
- The bar at a window end must be at exactly t0 ± w, or the last bar before it no more than
  `end_tolerance_min` minutes earlier (default 1): a price is never carried across a longer
  gap. Otherwise `ret` is NULL with status `no_end_bar` - never zero.
- `ret` is a fraction (0.0012 = +0.12%).
- Where a window ends after the last stored bar the row is `pending`; it is recomputed on the
  next run (e.g. after new bars were ingested). Bars ingested later inside or before the stored
  range (e.g. the previous month, loaded after this one) are logged in `price_batches`; a rerun
  recomputes every event whose windows reach into such a batch (`stale_event_mask`). Everything
  else is computed once: a rerun only computes events (or windows) it has not seen.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finqlora.store.db import DEFAULT_PRE_WINDOWS, DEFAULT_WINDOWS, get_meta, meta_int, open_store, set_meta, table_columns, transaction
from finqlora.core.errors import FinqloraError

DEFAULT_T0_TOLERANCE_MIN = 5
DEFAULT_END_TOLERANCE_MIN = 1

STATUS_OK = "ok"
STATUS_NO_T0 = "no_t0_bar"
STATUS_NO_END = "no_end_bar"
STATUS_PENDING = "pending"
STATUS_CODES = (STATUS_OK, STATUS_NO_T0, STATUS_NO_END, STATUS_PENDING)


@dataclass
class WindowReturns:
    """Per-event results of one window, aligned with the event array."""

    window_min: int  # negative for pre-event windows
    ret: np.ndarray  # float64, NaN where unknown
    status: np.ndarray  # int8 index into STATUS_CODES
    t0_ts: np.ndarray  # int64, -1 where none
    end_ts: np.ndarray  # int64, -1 where none
    close_t0: np.ndarray
    close_end: np.ndarray


def event_returns(
    bar_ts: np.ndarray,
    bar_close: np.ndarray,
    event_ts: np.ndarray,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    pre_windows: Sequence[int] = DEFAULT_PRE_WINDOWS,
    *,
    t0_tolerance_min: float = DEFAULT_T0_TOLERANCE_MIN,
    end_tolerance_min: float = DEFAULT_END_TOLERANCE_MIN,
) -> list[WindowReturns]:
    """Vectorised returns of every event for every window (searchsorted over sorted bars)."""
    bar_ts = np.asarray(bar_ts, dtype=np.int64)
    bar_close = np.asarray(bar_close, dtype=np.float64)
    event_ts = np.asarray(event_ts, dtype=np.int64)
    if len(bar_ts) > 1 and np.any(np.diff(bar_ts) <= 0):
        raise FinqloraError("price bars are not strictly increasing in time", hint="re-ingest them with `finqlora db ingest-prices`")
    n = len(event_ts)
    if len(bar_ts) == 0:
        empty = np.full(n, np.nan)
        return [
            WindowReturns(w, empty.copy(), np.full(n, 3, np.int8), np.full(n, -1), np.full(n, -1), empty.copy(), empty.copy())
            for w in [*windows, *(-abs(p) for p in pre_windows)]
        ]
    last_bar = bar_ts[-1]
    t0_tol = int(round(t0_tolerance_min * 60))
    end_tol = int(round(end_tolerance_min * 60))

    i0 = np.searchsorted(bar_ts, event_ts, side="right") - 1
    has_t0 = i0 >= 0
    i0c = np.clip(i0, 0, None)
    t0 = np.where(has_t0, bar_ts[i0c], -1)
    has_t0 &= (event_ts - t0) <= t0_tol
    # An event after the last bar may still get a t0 bar once newer bars are ingested.
    t0_pending = ~has_t0 & (event_ts > last_bar)
    close0 = np.where(has_t0, bar_close[i0c], np.nan)

    results = []
    for signed in [*(abs(w) for w in windows), *(-abs(p) for p in pre_windows)]:
        target = t0 + signed * 60
        ie = np.searchsorted(bar_ts, target, side="right") - 1
        iec = np.clip(ie, 0, None)
        end_ts = np.where(ie >= 0, bar_ts[iec], -1)
        has_end = has_t0 & (ie >= 0) & (target - end_ts <= end_tol)
        pending = (has_t0 & (target > last_bar)) | t0_pending
        close_end = np.where(has_end & ~pending, bar_close[iec], np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            ret = close_end / close0 - 1.0 if signed > 0 else close0 / close_end - 1.0
        ok = has_end & ~pending & np.isfinite(ret)
        status = np.where(ok, 0, np.where(pending, 3, np.where(has_t0, 2, 1))).astype(np.int8)
        results.append(
            WindowReturns(
                window_min=signed,
                ret=np.where(ok, ret, np.nan),
                status=status,
                t0_ts=np.where(has_t0, t0, -1),
                end_ts=np.where(ok, end_ts, -1),
                close_t0=close0,
                close_end=np.where(ok, close_end, np.nan),
            )
        )
    return results


def stale_event_mask(
    event_ts: np.ndarray,
    batches: Sequence[tuple[int, int]],
    signed_windows: Sequence[int],
    *,
    t0_tolerance_min: float,
    end_tolerance_min: float,
) -> np.ndarray:
    """Events whose returns could use a bar in one of `batches` ((first_ts, last_ts) ranges).

    An event at t reads bars from t0 - max pre window - end tolerance (t0 is at most the t0
    tolerance before t) up to t + the longest post window.
    """
    longest_post = max([w for w in signed_windows if w > 0], default=0) * 60
    longest_pre = max([-w for w in signed_windows if w < 0], default=0) * 60
    reach_back = longest_pre + int(round((t0_tolerance_min + end_tolerance_min) * 60))
    stale = np.zeros(len(event_ts), dtype=bool)
    for first, last in batches:
        stale |= (event_ts + longest_post >= first) & (event_ts - reach_back <= last)
    return stale


def _batch_key(ticker: str) -> str:
    return f"impacts_price_batch:{ticker}"


@dataclass
class ImpactReport:
    tickers: list[str]
    windows: list[int]
    computed_events: dict[str, int] = field(default_factory=dict)  # ticker -> events computed this run
    skipped_events: dict[str, int] = field(default_factory=dict)  # ticker -> already done, not recomputed
    refreshed_events: dict[str, int] = field(default_factory=dict)  # ticker -> done, redone for newer bars in their windows
    rows_written: int = 0
    known_returns: dict[str, dict[int, int]] = field(default_factory=dict)  # ticker -> window -> rows with ret
    seconds: float = 0.0


def _parse_windows(windows: Sequence[int], pre_windows: Sequence[int]) -> list[int]:
    signed = [int(w) for w in windows] + [-abs(int(p)) for p in pre_windows]
    if any(w <= 0 for w in windows) or any(p == 0 for p in pre_windows):
        raise FinqloraError("windows must be positive minutes", hint="e.g. --windows 5,10,15,30,120 --pre-windows 120")
    if len(set(signed)) != len(signed):
        raise FinqloraError("a window is listed twice", hint="list each window once")
    return signed


@dataclass(frozen=True)
class _Settings:
    signed: list[int]
    t0_tolerance_min: float
    end_tolerance_min: float
    recompute: bool


def compute_impacts(
    db_path: str | Path | None = None,
    *,
    conn: sqlite3.Connection | None = None,
    tickers: Sequence[str] | None = None,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    pre_windows: Sequence[int] = DEFAULT_PRE_WINDOWS,
    t0_tolerance_min: float = DEFAULT_T0_TOLERANCE_MIN,
    end_tolerance_min: float = DEFAULT_END_TOLERANCE_MIN,
    recompute: bool = False,
    progress: bool = False,
) -> ImpactReport:
    """Compute and store returns for every event x ticker x window not stored yet.

    One transaction per ticker; events whose rows for these windows all exist with a final
    status are skipped unless `recompute`, or unless bars ingested since they were computed
    reach into their windows (then our rows of those events are redone). A user's own rows
    (status NULL, e.g. in a migrated database) are never overwritten without `recompute`;
    `pending` rows are redone.
    """
    from finqlora.store.ingest import _progress

    started = time.perf_counter()
    settings = _Settings(_parse_windows(windows, pre_windows), t0_tolerance_min, end_tolerance_min, recompute)
    own_conn = conn is None
    if conn is None:
        if db_path is None:
            raise ValueError("pass db_path or conn")
        conn = open_store(db_path)
    try:
        stored_tickers = [row[0] for row in conn.execute("SELECT DISTINCT ticker FROM prices ORDER BY ticker")]
        if tickers:
            missing = [t for t in tickers if t not in stored_tickers]
            if missing:
                raise FinqloraError(
                    f"no price bars stored for {', '.join(missing)}",
                    hint=f"stored tickers: {', '.join(stored_tickers) or 'none'}; add bars with `finqlora db ingest-prices --ticker T FILE`",
                )
            chosen = list(tickers)
        else:
            chosen = stored_tickers
        if not chosen:
            raise FinqloraError("the database has no price bars", hint="add some with `finqlora db ingest-prices --ticker XAUUSD --tz UTC FILE.csv`")
        report = ImpactReport(tickers=chosen, windows=settings.signed)
        events = conn.execute("SELECT event_id, ts_utc FROM events WHERE ts_utc IS NOT NULL ORDER BY ts_utc").fetchall()
        all_ids = np.array([e[0] for e in events], dtype=object)
        all_ts = np.array([e[1] for e in events], dtype=np.int64)
        with _progress(progress) as bar:
            task = bar.add_task("computing impacts", total=len(chosen))
            for ticker in chosen:
                _compute_ticker(conn, ticker, all_ids, all_ts, settings, report)
                report.known_returns[ticker] = {
                    w: conn.execute(
                        "SELECT COUNT(*) FROM event_impacts WHERE ticker = ? AND window_min = ? AND ret IS NOT NULL", (ticker, w)
                    ).fetchone()[0]
                    for w in settings.signed
                }
                bar.advance(task)
    finally:
        if own_conn:
            conn.close()
    report.seconds = time.perf_counter() - started
    return report


def _compute_ticker(
    conn: sqlite3.Connection, ticker: str, all_ids: np.ndarray, all_ts: np.ndarray, settings: _Settings, report: ImpactReport
) -> None:
    """Compute and store one ticker's rows for the events that need them (one transaction)."""
    signed = settings.signed
    seen_batch = meta_int(get_meta(conn).get(_batch_key(ticker))) or 0
    new_batches = (
        conn.execute(
            "SELECT batch_id, first_ts, last_ts FROM price_batches WHERE ticker = ? AND batch_id > ? ORDER BY batch_id", (ticker, seen_batch)
        ).fetchall()
        if table_columns(conn, "price_batches")  # a connection to a database not migrated yet has none
        else []
    )
    latest_batch = new_batches[-1][0] if new_batches else seen_batch
    stale = np.zeros(len(all_ids), dtype=bool)
    # Windows of our stored rows that this call does not compute (an earlier call's -120 when
    # this one asks for 5 only): the batches are marked seen below, so rows of those windows
    # that the new bars reach must be redone now, or they would stay stale for good.
    stored_windows = sorted(
        {row[0] for row in conn.execute(
            "SELECT DISTINCT window_min FROM event_impacts WHERE ticker = ? AND status IS NOT NULL AND status != ?",
            (ticker, STATUS_PENDING),
        )} - set(signed)
    ) if new_batches and not settings.recompute else []
    if settings.recompute:
        todo = np.ones(len(all_ids), dtype=bool)
    else:
        marks = ",".join("?" * len(signed))
        done = {
            row[0]
            for row in conn.execute(
                f"SELECT event_id FROM event_impacts WHERE ticker = ? AND window_min IN ({marks}) "
                "AND status IS NOT ? GROUP BY event_id HAVING COUNT(*) = ?",
                (ticker, *signed, STATUS_PENDING, len(signed)),
            )
        }
        is_done = np.array([event_id in done for event_id in all_ids], dtype=bool)
        if stored_windows:
            marks_other = ",".join("?" * len(stored_windows))
            has_other = {
                row[0]
                for row in conn.execute(
                    f"SELECT DISTINCT event_id FROM event_impacts WHERE ticker = ? AND window_min IN ({marks_other}) "
                    "AND status IS NOT NULL AND status != ?",
                    (ticker, *stored_windows, STATUS_PENDING),
                )
            }
            is_stored = is_done | np.array([event_id in has_other for event_id in all_ids], dtype=bool)
        else:
            is_stored = is_done
        stale = is_stored & stale_event_mask(
            all_ts, [(first, last) for _, first, last in new_batches], [*signed, *stored_windows],
            t0_tolerance_min=settings.t0_tolerance_min, end_tolerance_min=settings.end_tolerance_min,
        )
        todo = ~is_done | stale
    ids, ts = all_ids[todo], all_ts[todo]
    report.skipped_events[ticker] = int(len(all_ids) - len(ids))
    report.computed_events[ticker] = int(len(ids))
    report.refreshed_events[ticker] = int(stale.sum())
    if not len(ids) and latest_batch == seen_batch:
        return
    with transaction(conn):
        if len(ids):
            _store_rows(conn, ticker, ids, ts, all_ids[stale], all_ts[stale], stored_windows, settings, report)
        if latest_batch != seen_batch:
            set_meta(conn, _batch_key(ticker), str(latest_batch))


def _store_rows(
    conn: sqlite3.Connection,
    ticker: str,
    ids: np.ndarray,
    ts: np.ndarray,
    stale_ids: np.ndarray,
    stale_ts: np.ndarray,
    other_windows: Sequence[int],
    settings: _Settings,
    report: ImpactReport,
) -> None:
    bars = np.array(conn.execute("SELECT ts, close FROM prices WHERE ticker = ? ORDER BY ts", (ticker,)).fetchall(), dtype=np.float64).reshape(-1, 2)

    def returns(event_ts: np.ndarray, signed: Sequence[int]) -> list[WindowReturns]:
        return event_returns(
            bars[:, 0].astype(np.int64),
            bars[:, 1],
            event_ts,
            [w for w in signed if w > 0],
            [-w for w in signed if w < 0],
            t0_tolerance_min=settings.t0_tolerance_min,
            end_tolerance_min=settings.end_tolerance_min,
        )

    # This call's windows for every event to do; the stale events' rows of other stored windows
    # are redone as well (their old rows are deleted below).
    groups = [(ids, returns(ts, settings.signed))]
    if len(other_windows) and len(stale_ids):
        groups.append((stale_ids, returns(stale_ts, other_windows)))
    # Without --recompute, rows that already exist (a user's own, or final rows of other
    # windows) are kept; only our own `pending` rows, and our rows of events that newer bars
    # reach, are replaced.
    verb = "INSERT OR REPLACE" if settings.recompute else "INSERT OR IGNORE"
    if not settings.recompute:
        conn.execute("DELETE FROM event_impacts WHERE ticker = ? AND status = ?", (ticker, STATUS_PENDING))
        conn.executemany(
            "DELETE FROM event_impacts WHERE ticker = ? AND event_id = ? AND status IS NOT NULL",
            [(ticker, event_id) for event_id in stale_ids.tolist()],
        )
    for group_ids, results in groups:
        _insert_rows(conn, verb, ticker, group_ids, results, report)


def _insert_rows(
    conn: sqlite3.Connection, verb: str, ticker: str, ids: np.ndarray, results: list[WindowReturns], report: ImpactReport
) -> None:
    for result in results:
        rows = zip(
            ids.tolist(),
            [ticker] * len(ids),
            [result.window_min] * len(ids),
            [None if np.isnan(r) else r for r in result.ret.tolist()],
            [STATUS_CODES[s] for s in result.status.tolist()],
            [None if t < 0 else t for t in result.t0_ts.tolist()],
            [None if t < 0 else t for t in result.end_ts.tolist()],
            [None if np.isnan(c) else c for c in result.close_t0.tolist()],
            [None if np.isnan(c) else c for c in result.close_end.tolist()],
        )
        before = conn.total_changes
        conn.executemany(
            f"{verb} INTO event_impacts (event_id, ticker, window_min, ret, status, t0_ts, end_ts, close_t0, close_end) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            rows,
        )
        report.rows_written += conn.total_changes - before
