"""Reading the event store into what the builder needs: the primary events with a time and
text (sorted), their stored returns, the price tickers and a fingerprint of the file; and the
news text of an event as every record shows it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import sha256_file
from finqlora.store import db as store


def news_text(event: store.Event) -> str:
    content = (event.content or "").strip()
    title = (event.title or "").strip()
    if title and title not in content:
        content = f"【{title}】{content}"
    return content


@dataclass
class StoreData:
    events: list[store.Event]  # primaries with a time and text, sorted by (ts, event_id)
    impacts: dict[str, dict[tuple[str, int], float]]
    without_time: int
    linked_duplicates: int
    price_tickers: list[str]
    fingerprint: dict[str, Any]


def read_store(path: Path, naive_tz: str | None) -> StoreData:
    if not path.exists():
        raise FinqloraError(
            f"database {path} does not exist",
            hint="check the path (data.db, `finqlora build --db`); data.db: sample uses the built-in synthetic store, "
            "data.templates_only: true (--templates-only) the built-in templates",
        )
    conn = store.connect(path, readonly=True)
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "events" not in tables:
            raise FinqloraError(
                f"{path} has no events table, so there is no news to build from",
                hint=f"run `finqlora db check --db {path}`; ingest news with `finqlora db ingest-news`",
            )
        all_events = store.read_events(conn, naive_tz=naive_tz)
        impacts = store.read_impacts(conn) if "event_impacts" in tables else {}
        price_tickers = (
            [row[0] for row in conn.execute("SELECT DISTINCT ticker FROM prices ORDER BY ticker")] if "prices" in tables else []
        )
    finally:
        conn.close()
    linked = sum(1 for e in all_events if e.primary_event_id)
    usable = [e for e in all_events if not e.primary_event_id and (e.content or "").strip()]
    timed = sorted((e for e in usable if e.ts_utc is not None), key=lambda e: (e.ts_utc, e.event_id))
    fingerprint = {
        "path": str(path),
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "events": len(all_events),
        "events_with_returns": len(impacts),
    }
    return StoreData(timed, impacts, len(usable) - len(timed), linked, price_tickers, fingerprint)
