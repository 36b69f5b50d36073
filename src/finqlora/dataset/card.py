"""The dataset's stats (`.stats.json`: counts by type, split and label, lengths, the rules, the
source and the config) and its card (`.card.md`: the same in readable markdown)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from finqlora.dataset import predictability
from finqlora.dataset.build_config import BuildConfig
from finqlora.dataset.drafts import PUBLIC, SPLITS, Draft
from finqlora.dataset.lengths import LengthCounter
from finqlora.dataset.split import SPLIT_RULE


def _distribution(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def q(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * (len(ordered) - 1) + 0.5))]

    return {"min": ordered[0], "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": ordered[-1], "mean": round(sum(ordered) / len(ordered), 1)}


def dataset_stats(config: BuildConfig, drafts: Sequence[Draft], lengths: Sequence[tuple[int, int]], counter: LengthCounter, trimmed: int, dropped: int,
                  counts_wanted: dict[str, int], source_info: dict[str, Any], notices: list[str], partial: dict[str, Any]) -> dict[str, Any]:
    """The stats file: what was built, against what was asked for; `partial` holds what the steps
    recorded on the way (dedup, split plan, thresholds, relevance, ...), kept in that order."""
    by_label: dict[str, Counter[str]] = {}
    by_ticker: Counter[str] = Counter()
    for d in drafts:
        if d.type == "news_impact":
            by_label.setdefault("news_impact.direction", Counter())[d.label["direction"]] += 1
            for ticker, direction in d.label["directions"].items():
                by_ticker[ticker] += 1
                by_label.setdefault(f"news_impact.direction.{ticker}", Counter())[direction] += 1
        elif d.type == "market_analysis":
            by_label.setdefault("market_analysis.case", Counter())[d.label["case"]] += 1
            by_ticker[d.label["ticker"]] += 1
        elif d.type == "report_qa":
            by_label.setdefault("report_qa.metric", Counter())[d.label["metric"]] += 1
        elif d.type == PUBLIC:
            by_label.setdefault(f"public_data.{d.label['source']}", Counter())[d.label.get("class", "instruction")] += 1
        else:
            by_label.setdefault("template.category", Counter())[d.label["category"]] += 1
    by_split_type: dict[str, dict[str, int]] = {}
    for d in drafts:
        by_split_type.setdefault(d.split, {}).setdefault(d.type, 0)
        by_split_type[d.split][d.type] += 1
    event_times: dict[str, list[str]] = {}
    for d in drafts:
        if d.event_time:
            event_times.setdefault(d.split, []).append(d.event_time)
    totals = [p + a for p, a in lengths]
    return {
        "records": len(drafts),
        "requested": {"num_samples": config.num_samples, "by_type": counts_wanted},
        "by_type": dict(sorted(Counter(d.type for d in drafts).items())),
        "by_split": {s: sum(1 for d in drafts if d.split == s) for s in SPLITS},
        "by_split_and_type": {s: dict(sorted(by_split_type.get(s, {}).items())) for s in SPLITS},
        "by_label": {k: dict(sorted(v.items())) for k, v in sorted(by_label.items())},
        "by_ticker": dict(sorted(by_ticker.items())),
        "event_time_range_by_split": {s: [min(v), max(v)] for s, v in ((s, event_times.get(s)) for s in SPLITS) if v},
        "length_tokens": {
            "counted_with": counter.name,
            "max_length": config.max_length,
            "prompt": _distribution([p for p, _ in lengths]),
            "answer": _distribution([a for _, a in lengths]),
            "total": _distribution(totals),
            "trimmed": trimmed,
            "dropped_too_long": dropped,
        },
        "rules": config.rules.describe() | {
            "split": SPLIT_RULE,
            "dedup": "3-gram MinHash/LSH candidates verified by exact Jaccard >= threshold, earliest kept",
        },
        **partial,
        "source": source_info,
        "config": {
            "seed": config.seed,
            "mix": list(config.mix),
            "split": list(config.split),
            "format": config.format,
            "tokenizer": config.tokenizer,
            "max_length": config.max_length,
            "templates_only": config.templates_only,
            "primary_ticker": config.primary_ticker,
            "add": [{"path": str(a.path), "format": a.format, "samples": a.samples} for a in config.add],
            "decontaminate": [str(p) for p in config.decontaminate],
        },
        "notices": list(notices),
    }


def render_card(stats: dict[str, Any], dataset_name: str) -> str:
    """A markdown dataset card from the stats (what is in the file and how it was made)."""
    lines = [f"# Dataset card: {dataset_name}", ""]
    source = stats["source"].get("database")
    if source:
        lines += [f"Built by `finqlora build` from `{source['path']}` (sha256 `{source['sha256'][:16]}…`, "
                  f"{source['events']} events, {source['events_with_returns']} with stored returns).", ""]
    else:
        lines += ["Built by `finqlora build` from the built-in instruction templates only (no database).", ""]
    lines += ["## Contents", "", "| type | train | val | test | total |", "| --- | --- | --- | --- | --- |"]
    for record_type in sorted(stats["by_type"]):
        row = [str(stats["by_split_and_type"][s].get(record_type, 0)) for s in SPLITS]
        lines.append(f"| {record_type} | {' | '.join(row)} | {stats['by_type'][record_type]} |")
    lines.append(f"| all | {' | '.join(str(stats['by_split'][s]) for s in SPLITS)} | {stats['records']} |")
    lines += ["", "## Labels", ""]
    for key, counts in stats["by_label"].items():
        lines.append(f"- {key}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if stats.get("split_plan"):
        plan = stats["split_plan"]
        lines += ["", "## Split (by event time)", "",
                  f"- train ends {plan['train_end']}, val ends {plan['val_end']}; every later split's events are later.",
                  f"- {plan['embargoed_events']} events within {plan['embargo_min']} min after a boundary were left out (embargo).",
                  f"- near-duplicates dropped before sampling: {stats['dedup']['near_duplicates_dropped']} "
                  f"(threshold {stats['dedup']['threshold']}); linked cross-source duplicates skipped: "
                  f"{stats['dedup']['linked_cross_source_duplicates_skipped']}."]
    lines.append(f"- cross-split near-duplicates removed after building: {stats['cross_split_near_duplicates_removed']}.")
    if stats.get("thresholds"):
        lines += ["", "## Direction thresholds (estimated on the train period)", "", "| ticker@window | sigma | threshold |", "| --- | --- | --- |"]
        for key, value in stats["thresholds"].items():
            lines.append(f"| {key} | {value['sigma'] * 100:.4f}% | {value['threshold'] * 100:.4f}% |")
    rules = stats["rules"]
    lines += ["", "## Rules", "", f"- direction: {rules['direction']}", f"- sigma: {rules['sigma']}", f"- magnitude: {rules['magnitude']}"]
    lines += [f"- {key}: {rules[key]}" for key in ("z", "hold_adjacent") if key in rules]
    lines.append("- news_impact answers are ex-ante: direction per relevant ticker, channel, precedent, what would change the view "
                 "and a confidence word, never the realized move (that is the record's label); market_analysis cases are ex-post "
                 "and carry the realized returns in their input.")
    lines += [f"- {case}: {rule}" for case, rule in rules["cases"].items()]
    lines += _card_relevance(stats) + predictability.card_lines(stats.get("predictability")) + _card_public(stats)
    lengths = stats["length_tokens"]
    lines += ["", "## Lengths (tokens)", "", f"Counted with {lengths['counted_with']}; max length {lengths['max_length']}; "
              f"trimmed {lengths['trimmed']}, dropped {lengths['dropped_too_long']}.", ""]
    for part in ("prompt", "answer", "total"):
        dist = lengths[part]
        if dist:
            lines.append(f"- {part}: min {dist['min']}, median {dist['p50']}, p90 {dist['p90']}, p99 {dist['p99']}, max {dist['max']}")
    if stats["notices"]:
        lines += ["", "## Notices", ""] + [f"- {n}" for n in stats["notices"]]
    lines += ["", "## Caveats", "",
              "- Labels describe the realized price reaction after publication (event study), not a forecast; other news in the same window also moves prices.",
              "- report_qa statements are simulated (fictional companies); every answer was recomputed from the statement text by the builder.",
              "- News text belongs to its publishers; use the dataset for research and education.", ""]
    return "\n".join(lines)


def _card_relevance(stats: dict[str, Any]) -> list[str]:
    relevance = stats.get("relevance")
    if not relevance:
        return []
    lines = ["", "## Relevance (which tickers an event may be labelled by)", "",
             "Rule: `finqlora.dataset.relevance` (CLS subjects tags and keyword lists per channel for gold/silver, "
             "`stocks` links for equities). Events relevant to no labelled ticker are left out of news_impact.", "",
             "| ticker | " + " | ".join(("subject", "keyword", "stocks", "none")) + " |", "| --- | --- | --- | --- | --- |"]
    for ticker, counts in relevance["by_ticker"].items():
        lines.append(f"| {ticker} | " + " | ".join(str(counts.get(k, 0)) for k in ("subject", "keyword", "stocks", "none")) + " |")
    for ticker, channels in relevance["by_channel"].items():
        lines.append(f"- {ticker} channels: " + ", ".join(f"{k} {v}" for k, v in channels.items()))
    for group, value in relevance["primary_ticker_signal"].items():
        lines.append(f"- {group} events: {value['events']}, median |z| {value['median_abs_z']}, "
                     f"share labelled 利好/利空 {value['directional_share']}")
    for decision, examples in relevance["examples"].items():
        lines += ["", f"Examples, {decision}:", ""]
        lines += [f"- `{e['event_id']}` {e['channel'] or '-'} ({e['evidence'] or 'no match'}): {e['text'][:60]}" for e in examples]
    return lines


def _card_public(stats: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if stats.get("public_data"):
        lines += ["", "## Public data mixed in", "", "| source | format | rows | train/val/test | licence |", "| --- | --- | --- | --- | --- |"]
        for src in stats["public_data"]:
            parts = "/".join(str(src["by_split"].get(s, 0)) for s in SPLITS)
            lines.append(f"| {src['name']} | {src['format']} | {src['rows_taken']} | {parts} | {src['licence']} |")
    decon = stats.get("decontamination")
    if decon:
        lines += ["", "## Decontamination", "",
                  f"Records whose text equals or near-duplicates (3-gram Jaccard >= {decon['threshold']}) an evaluation item "
                  f"were dropped: {decon['dropped']} ({', '.join(f'{k} {v}' for k, v in decon['dropped_by_type'].items()) or 'none'})."]
        lines += [f"- {name}: {count} items" for name, count in decon["eval_sets"].items()]
    return lines
