"""The instruction dataset builder, as a recipe: event store -> leakage-safe, labelled JSONL dataset.

Each step is a module of its own (and documented in docs/dataset.md):
1. read the store's primary events (cross-source duplicates linked by ingest are skipped) and
   their stored returns (`finqlora.dataset.store_reader`);
2. drop near-duplicate texts (`finqlora.core.textdedup`), keeping the earliest of each group;
3. split the remaining events with a primary-window return by time into train/val/test
   (default 80/10/10 of the events); events within `embargo_min` after a split boundary are
   left out, so a train event's return windows never reach into the next split
   (`finqlora.dataset.split`);
4. estimate each (ticker, window) volatility on the train period only and label with
   `finqlora.dataset.labels` (z = r / sigma, neutral band, direction held at the adjacent
   windows), only the tickers `finqlora.dataset.relevance` allows for the event
   (`finqlora.dataset.labelling`);
5. sample per split: news_impact (one ex-ante record per relevant event: the answer is
   `finqlora.dataset.rationales`, never the realized move) and market_analysis (ex-post,
   balanced over the case types, preferring events not used by news_impact) in
   `finqlora.dataset.event_drafts`; report_qa (simulated, checked) and, where a part cannot be
   built from the store, built-in templates grouped by template so no template appears in two
   splits (`finqlora.dataset.generated_drafts`); then public data sets (`--add-dataset`,
   `finqlora.dataset.mixture`), each split on its own;
6. trim over-long inputs token-aware so the output and its end are kept
   (`finqlora.dataset.lengths`); drop records that near-duplicate one of an earlier split or an
   evaluation item (`--decontaminate`; `finqlora.dataset.leakage`);
7. write the JSONL (Alpaca fields, OpenAI messages or ShareGPT; `finqlora.dataset.dataset_file`),
   a dataset card and stats JSON (`finqlora.dataset.card`).

The options are `finqlora.dataset.build_config.BuildConfig`. Every random choice comes from
`random.Random` seeded with the seed and a fixed tag (`finqlora.dataset.drafts.seeded_rng`), and
all collections are sorted before sampling, so the same seed and database give byte-identical files.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finqlora.core import textdedup
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json, atomic_write_text
from finqlora.core.lock import lock_enclosing_run
from finqlora.core.records import write_dataset_info
from finqlora.dataset import labels as lab
from finqlora.dataset import mixture, report_qa, templates
from finqlora.dataset.build_config import BuildConfig
from finqlora.dataset.card import dataset_stats, render_card
from finqlora.dataset.dataset_file import to_record
from finqlora.dataset.drafts import PUBLIC, RECORD_ORDER, SPLITS, TYPES, Draft, allocate
from finqlora.dataset.event_drafts import sample_event_drafts
from finqlora.dataset.generated_drafts import report_drafts, template_drafts
from finqlora.dataset.labelling import LabelContext, build_label_context, label_predictability, relevance_decisions, relevance_stats
from finqlora.dataset.leakage import decontaminate, drop_cross_split_duplicates
from finqlora.dataset.lengths import load_length_counter, trim_drafts
from finqlora.dataset.split import SplitPlan, split_by_time
from finqlora.dataset.store_reader import StoreData, news_text, read_store
from finqlora.store import db as store


@dataclass
class BuildResult:
    output: Path
    card: Path
    stats_path: Path
    records: list[dict[str, Any]]
    stats: dict[str, Any]
    notices: list[str]


@contextmanager
def _stages(enabled: bool) -> Iterator[Any]:
    """A spinner on stderr naming the current stage (reading, deduplicating, ...)."""
    if not enabled:
        yield lambda _text: None
        return
    from rich.console import Console
    from rich.text import Text

    with Console(stderr=True).status("building the dataset") as status:
        yield lambda text: status.update(Text(text))  # Text: stage names quote paths, never markup


def build_dataset(config: BuildConfig) -> BuildResult:
    """Build the dataset described by `config` and write JSONL, card and stats.

    Refused while another process holds the run folder the output lies in (finqlora.core.lock).
    """
    config.validate()
    with lock_enclosing_run(Path(config.output).parent), _stages(config.progress) as stage:
        return _build(config, stage)


def _build(config: BuildConfig, stage: Any) -> BuildResult:
    notices: list[str] = []
    counts_wanted = dict(zip(TYPES, allocate(config.num_samples, config.mix)))
    if config.tokenizer:
        stage(f"loading the tokenizer {config.tokenizer}")
    counter = load_length_counter(config.tokenizer)
    stats: dict[str, Any] = {}
    drafts: list[Draft] = []

    if config.db is None or config.templates_only:
        why = "--templates-only was given" if config.templates_only else "no --db was given"
        notices.append(
            f"{why}: the dataset is built ONLY from the {len(templates.TEMPLATES)} built-in Chinese finance "
            f"instruction templates ({config.num_samples} records); no news, labels or market data are used"
        )
        drafts = template_drafts(config.num_samples, config.split, config.seed, "fallback")
        source_info: dict[str, Any] = {"database": None}
    else:
        stage(f"reading {config.db}")
        data = read_store(Path(config.db), config.naive_tz)
        drafts, source_info = _store_drafts(config, data, counts_wanted, notices, stats, stage)

    if config.add:
        stage(f"reading {len(config.add)} public data set(s)")
        public, stats["public_data"] = mixture.public_drafts(config.add, config.split, config.seed)
        drafts += public
    stage(f"measuring {len(drafts)} records in tokens ({counter.name})")
    drafts, trimmed, dropped = trim_drafts(drafts, counter, config.max_length)
    if trimmed:
        notices.append(f"{trimmed} record(s) were longer than --max-length {config.max_length} tokens and had their input trimmed (outputs kept whole)")
    if dropped:
        notices.append(f"{dropped} record(s) could not fit in {config.max_length} tokens even with a minimal input and were left out")

    stage("checking for near-duplicates across splits")
    drafts = drop_cross_split_duplicates(drafts, config.dedup_threshold, notices, stats)
    drafts = decontaminate(drafts, config.decontaminate, config.dedup_threshold, notices, stats)
    drafts.sort(key=lambda d: (SPLITS.index(d.split), RECORD_ORDER.index(d.type), d.ts, d.record_id, d.instruction))
    _number_records(drafts, config.seed)

    if not drafts:
        raise FinqloraError(
            f"no record could be built: {'; '.join(notices) or 'nothing to sample from'}",
            hint=f"raise train.max_length (now {config.max_length}; `finqlora build --max-length`) or check the database with `finqlora db check`",
        )
    records = [to_record(d, config.format) for d in drafts]
    if len(records) < config.num_samples:
        notices.append(f"asked for {config.num_samples} samples, made {len(records)}")
    lengths = counter.record_lengths(drafts)
    stats = dataset_stats(config, drafts, lengths, counter, trimmed, dropped, counts_wanted, source_info, notices, stats)
    stage(f"writing {config.output}")
    return _write(Path(config.output), records, stats, notices, config.format)


def _number_records(drafts: list[Draft], seed: int) -> None:
    """Give every draft without an id the next number of its type (in the final order), and
    check every report_qa answer against its statement once more under its final id."""
    prefix = {"news_impact": "ni", "market_analysis": "ma", "report_qa": "rq", "template": "tp", PUBLIC: "pd"}
    numbers: Counter[str] = Counter()
    for draft in drafts:
        if not draft.record_id:
            numbers[draft.type] += 1
            draft.record_id = f"{prefix[draft.type]}-{seed}-{numbers[draft.type]:06d}"
    for draft in drafts:
        if draft.type == "report_qa":
            report_qa.check_record({"id": draft.record_id, "input": draft.input, "output": draft.output, "label": draft.label})


def _write(output: Path, records: list[dict[str, Any]], stats: dict[str, Any], notices: list[str], record_format: str) -> BuildResult:
    """The JSONL (and dataset_info.json beside it), then the stats and the card."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(output, text)
    write_dataset_info(output, records, record_format)
    stats_path = output.with_name(output.stem + ".stats.json")
    card_path = output.with_name(output.stem + ".card.md")
    atomic_write_json(stats_path, stats)
    atomic_write_text(card_path, render_card(stats, output.name))
    return BuildResult(output, card_path, stats_path, records, stats, notices)


def _missing_store_parts(config: BuildConfig, data: StoreData, candidates: list[store.Event]) -> tuple[str, str] | None:
    """(what is missing, how to add it) when the store cannot give news/market records."""
    p = config.rules.primary_window
    if not data.impacts:
        if not data.price_tickers:
            return ("the database has no price bars and no event impacts (market reactions)",
                    f"run `finqlora db ingest-prices --db {config.db} --ticker T FILE` and then `finqlora db impacts --db {config.db}`")
        return (f"the database has price bars ({', '.join(data.price_tickers)}) but no event impacts",
                f"run `finqlora db impacts --db {config.db}`")
    if not candidates:
        return (f"no event has a stored return at the primary window ({p} min)",
                f"compute it with `finqlora db impacts --db {config.db} --windows 5,10,15,30,120`, or choose --primary-window from the stored windows")
    return None


def _dedup_pool(config: BuildConfig, data: StoreData, candidates: list[store.Event], stats: dict[str, Any]) -> list[store.Event]:
    dedup = textdedup.deduplicate([news_text(e) for e in candidates], config.dedup_threshold)
    stats["dedup"] = {
        "events_read": len(data.events) + data.without_time + data.linked_duplicates,
        "linked_cross_source_duplicates_skipped": data.linked_duplicates,
        "without_time_skipped": data.without_time,
        "with_primary_window_return": len(candidates),
        "near_duplicates_dropped": len(dedup.duplicate_of),
        "threshold": config.dedup_threshold,
        "events_after_dedup": len(pool := [candidates[i] for i in dedup.keep]),
    }
    return pool


def _label_setup(config: BuildConfig, data: StoreData, pool: list[store.Event], stats: dict[str, Any]) -> tuple[SplitPlan, LabelContext]:
    """Split the pool by time and estimate the label scales on the train part (into stats)."""
    rules, p = config.rules, config.rules.primary_window
    plan = split_by_time(pool, config.split, config.embargo_min)
    ctx = build_label_context(plan.pools["train"], data.impacts, rules, config.primary_ticker)
    if (ctx.primary_ticker, p) not in ctx.sigmas:
        raise FinqloraError(
            f"too few training-period returns to estimate the volatility of {ctx.primary_ticker or 'any ticker'} at {p} min "
            f"(need {rules.min_estimation_samples})",
            hint="use a database with more events, or set data.primary_ticker (--primary-ticker) to a ticker that has impacts",
        )
    stats["split_plan"] = {
        "events_in_pool": len(pool),
        "by_split": {s: len(plan.pools[s]) for s in SPLITS},
        "train_end": plan.boundaries["train_end"],
        "val_end": plan.boundaries["val_end"],
        "embargo_min": config.embargo_min,
        "embargoed_events": plan.embargoed,
    }
    stats["thresholds"] = {
        f"{t}@{w}": {"sigma": s, "threshold": lab.threshold_for(s, rules)} for (t, w), s in sorted(ctx.sigmas.items())
    }
    stats["primary_ticker"] = ctx.primary_ticker
    stats["typical_abs_return_primary_window"] = ctx.typical_abs
    return plan, ctx


def _store_drafts(config: BuildConfig, data: StoreData, counts_wanted: dict[str, int], notices: list[str], stats: dict[str, Any], stage: Any) -> tuple[list[Draft], dict[str, Any]]:
    p = config.rules.primary_window
    source_info = {"database": data.fingerprint}
    if counts_wanted["news_impact"] + counts_wanted["market_analysis"] == 0:
        # --mix 0,0,N: nothing is taken from the store's events.
        return report_drafts(counts_wanted["report_qa"], config.split, config.seed), source_info
    if data.without_time:
        notices.append(f"{data.without_time} event(s) have no readable publication time and were left out (a time-based split needs one)")
    if not data.events:
        raise FinqloraError(
            f"{config.db} has no usable events (primary events with text and a publication time)",
            hint=f"check it with `finqlora db check --db {config.db}` and `finqlora db stats --db {config.db}`",
        )
    # Only events with a primary-window return can be sampled, so only they are deduplicated.
    candidates = [e for e in data.events if any(w == p for (_, w) in data.impacts.get(e.event_id, {}))]
    missing = _missing_store_parts(config, data, candidates)
    if missing:
        missing_count = counts_wanted["news_impact"] + counts_wanted["market_analysis"]
        notices.append(f"{missing[0]}: news_impact and market_analysis records need them, so "
                       f"{missing_count} built-in template records were built in their place ({missing[1]})")
        drafts = report_drafts(counts_wanted["report_qa"], config.split, config.seed)
        drafts += template_drafts(missing_count, config.split, config.seed, "missing-store-parts")
        return drafts, source_info

    stage(f"removing near-duplicates among {len(candidates)} events")
    pool = _dedup_pool(config, data, candidates, stats)
    stage(f"splitting {len(pool)} events by time and labelling")
    plan, ctx = _label_setup(config, data, pool, stats)
    decisions = relevance_decisions(pool, data.impacts, ctx)
    stats["relevance"] = relevance_stats(pool, decisions, data.impacts, ctx, config.seed)
    stage("checking whether the direction labels are predictable from the news")
    stats["predictability"] = {**label_predictability(plan.pools, data.impacts, ctx, decisions, config.seed),
                               "news_share": config.mix[0] / sum(config.mix)}
    drafts, shortfalls = sample_event_drafts(plan.pools, data, ctx, decisions, counts_wanted, config.split, config.seed)
    if shortfalls:
        notices.append("the database has fewer qualifying events than asked for (each event is used at most once per type, "
                       "and never in two splits): " + "; ".join(shortfalls))
    drafts += report_drafts(counts_wanted["report_qa"], config.split, config.seed)
    return drafts, source_info
