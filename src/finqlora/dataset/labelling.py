"""Labelling the store's events with the rules of `finqlora.dataset.labels`, against scales
estimated on the train period only (`LabelContext`): the news-impact label of an event (only
for the tickers `finqlora.dataset.relevance` allows), its market-analysis case, whether the
importance question applies; and two checks of the labels written into the stats (what the
relevance rule kept, and whether the directions can be predicted from the news)."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finqlora.dataset import labels as lab
from finqlora.dataset import predictability
from finqlora.dataset import relevance as rel
from finqlora.dataset.drafts import SPLITS, seeded_rng
from finqlora.dataset.store_reader import news_text
from finqlora.store import db as store

DEFAULT_PRIMARY_TICKER = "XAUUSD"


@dataclass
class LabelContext:
    rules: lab.LabelRules
    sigmas: dict[tuple[str, int], float]
    primary_ticker: str | None
    typical_abs: dict[str, float]  # "all" and str(star) -> median |r_p| of the primary ticker

    def threshold(self, ticker: str, window: int) -> float:
        return lab.threshold_for(self.sigmas[(ticker, window)], self.rules)


def _labelled_tickers(impact: dict[tuple[str, int], float], ctx: LabelContext) -> list[str]:
    p = ctx.rules.primary_window
    return sorted(t for (t, w) in impact if w == p and (t, p) in ctx.sigmas)


def _primary_for(tickers: list[str], ctx: LabelContext) -> str:
    return ctx.primary_ticker if ctx.primary_ticker in tickers else tickers[0]


def _ticker_returns(impact: dict[tuple[str, int], float], ticker: str) -> dict[int, float]:
    return {w: r for (t, w), r in sorted(impact.items()) if t == ticker}


def adjacent_windows(impact: dict[tuple[str, int], float], ticker: str, p: int) -> list[int]:
    """The stored post-event windows right before and after the primary one (e.g. 10 and 30 around 15)."""
    post = sorted(w for (t, w) in impact if t == ticker and w > 0)
    if p not in post:
        return []
    i = post.index(p)
    return [w for w in (post[i - 1] if i > 0 else None, post[i + 1] if i + 1 < len(post) else None) if w is not None]


def ticker_direction(impact: dict[tuple[str, int], float], ticker: str, ctx: LabelContext) -> tuple[str, float, bool]:
    """(direction, z, held) of one ticker: z = r_p / sigma; outside the neutral band the sign
    must hold at the adjacent windows too (`LabelRules.hold_adjacent`), else 中性 with held False."""
    p = ctx.rules.primary_window
    ret = impact[(ticker, p)]
    z = ret / ctx.sigmas[(ticker, p)]
    found = lab.direction(ret, ctx.threshold(ticker, p))
    if found == lab.NEUTRAL or not ctx.rules.hold_adjacent:
        return found, z, True
    sign = 1 if ret > 0 else -1
    held = all(impact[(ticker, w)] * sign > 0 for w in adjacent_windows(impact, ticker, p))
    return (found if held else lab.NEUTRAL), z, held


def news_impact_label(impact: dict[tuple[str, int], float], ctx: LabelContext,
                      decisions: dict[str, rel.Decision] | None = None) -> dict[str, Any] | None:
    """The label of one event: only tickers the relevance rule allows (None when there is none).

    `decisions` maps ticker -> relevance decision; None means every labelled ticker counts
    (used by tests of the direction rule alone).
    """
    tickers = _labelled_tickers(impact, ctx)
    if decisions is not None:
        tickers = [t for t in tickers if t in decisions and decisions[t].relevant]
    if not tickers:
        return None
    p = ctx.rules.primary_window
    primary = _primary_for(tickers, ctx)
    found = {t: ticker_direction(impact, t, ctx) for t in tickers}
    returns = {t: {str(w): r for w, r in _ticker_returns(impact, t).items()} for t in tickers}
    label = {
        "direction": found[primary][0],
        "ticker": primary,
        "window_min": p,
        "directions": {t: v[0] for t, v in found.items()},
        "z": round(found[primary][1], 4),
        "zs": {t: round(v[1], 4) for t, v in found.items()},
        "held_adjacent": {t: v[2] for t, v in found.items()},
        "magnitude": lab.magnitude(impact[(primary, p)], ctx.sigmas[(primary, p)]),
        "returns": returns,
        "threshold": ctx.threshold(primary, p),
        "thresholds": {t: ctx.threshold(t, p) for t in tickers},
    }
    if decisions is not None:
        label["relevance"] = {t: decisions[t].as_dict() for t in tickers}
    return label


def case_inputs(impact: dict[tuple[str, int], float], ctx: LabelContext) -> tuple[str, dict[int, float], dict[int, float]] | None:
    tickers = _labelled_tickers(impact, ctx)
    if not tickers:
        return None
    ticker = _primary_for(tickers, ctx)
    returns = {w: r for w, r in _ticker_returns(impact, ticker).items() if (ticker, w) in ctx.sigmas}
    return ticker, returns, {w: ctx.sigmas[(ticker, w)] for w in returns}


def classify_market(impact: dict[tuple[str, int], float], ctx: LabelContext) -> str | None:
    """The market-analysis case of an event's primary ticker (None when not applicable)."""
    inputs = case_inputs(impact, ctx)
    return lab.market_case(inputs[1], inputs[2], ctx.rules) if inputs else None


def importance_applies(impact: dict[tuple[str, int], float], ctx: LabelContext) -> bool:
    """The importance question needs the primary ticker's primary-window return and its typical size."""
    return "all" in ctx.typical_abs and (ctx.primary_ticker, ctx.rules.primary_window) in impact


def relevance_decisions(pool: Sequence[store.Event], impacts: dict[str, dict[tuple[str, int], float]],
                        ctx: LabelContext) -> dict[str, dict[str, rel.Decision]]:
    """event_id -> ticker -> relevance decision, for the tickers each event could be labelled by."""
    return {e.event_id: rel.event_decisions(e, _labelled_tickers(impacts.get(e.event_id, {}), ctx)) for e in pool}


def relevance_stats(pool: Sequence[store.Event], decisions: dict[str, dict[str, rel.Decision]],
                    impacts: dict[str, dict[tuple[str, int], float]], ctx: LabelContext, seed: int) -> dict[str, Any]:
    """What the relevance rule kept, per ticker and rule, with 10 examples of each decision, and
    how the labelled move differs between relevant and irrelevant events (the signal the rule buys)."""
    by_ticker: dict[str, Counter[str]] = {}
    by_channel: dict[str, Counter[str]] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    moves: dict[str, list[tuple[float, bool]]] = {"relevant": [], "irrelevant": []}
    order = list(pool)
    seeded_rng(seed, "relevance-examples").shuffle(order)
    for event in order:
        for ticker, decision in decisions[event.event_id].items():
            by_ticker.setdefault(ticker, Counter())[decision.rule] += 1
            if decision.channel:
                by_channel.setdefault(ticker, Counter())[decision.channel] += 1
            key = f"kept_by_{decision.rule}" if decision.relevant else "left_out"
            if ticker == ctx.primary_ticker and len(examples.setdefault(key, [])) < 10:
                examples[key].append({"event_id": event.event_id, "published_at": event.published_at,
                                      "text": news_text(event)[:80], "channel": decision.channel, "evidence": decision.evidence})
            if ticker == ctx.primary_ticker:
                direction, z, _ = ticker_direction(impacts[event.event_id], ticker, ctx)
                moves["relevant" if decision.relevant else "irrelevant"].append((abs(z), direction != lab.NEUTRAL))
    signal = {
        group: {"events": len(values),
                "median_abs_z": round(statistics.median(v for v, _ in values), 3) if values else None,
                "directional_share": round(sum(d for _, d in values) / len(values), 3) if values else None}
        for group, values in moves.items()
    }
    return {
        "rule": rel.describe(),
        "by_ticker": {t: dict(sorted(c.items())) for t, c in sorted(by_ticker.items())},
        "by_channel": {t: dict(sorted(c.items(), key=lambda kv: -kv[1])) for t, c in sorted(by_channel.items())},
        "primary_ticker_signal": signal,
        "examples": {k: examples[k] for k in sorted(examples)},
    }


def build_label_context(train_events: Sequence[store.Event], impacts: dict[str, dict[tuple[str, int], float]], rules: lab.LabelRules, primary_ticker: str | None) -> LabelContext:
    ids = [e.event_id for e in train_events]
    sigmas = {k: v for k, v in lab.volatility_table(impacts, ids, rules).items() if v > 0}
    p = rules.primary_window
    tickers = Counter(t for (t, w) in sigmas if w == p)
    if primary_ticker is None and tickers:
        # Gold is what finqlora's guide studies; otherwise the ticker with the most returns.
        counts = Counter(t for e in ids for (t, w) in impacts.get(e, {}) if w == p)
        primary_ticker = DEFAULT_PRIMARY_TICKER if DEFAULT_PRIMARY_TICKER in tickers else sorted(counts, key=lambda t: (-counts[t], t))[0]
    typical: dict[str, float] = {}
    if primary_ticker and (primary_ticker, p) in sigmas:
        groups: dict[str, list[float]] = {"all": []}
        for event in train_events:
            ret = impacts.get(event.event_id, {}).get((primary_ticker, p))
            if ret is not None:
                groups["all"].append(abs(ret))
                if event.star is not None:
                    groups.setdefault(str(event.star), []).append(abs(ret))
        typical = {k: statistics.median(v) for k, v in groups.items() if len(v) >= rules.min_estimation_samples}
    return LabelContext(rules, sigmas, primary_ticker, typical)


def label_predictability(pools: dict[str, list[store.Event]], impacts: dict[str, dict[tuple[str, int], float]], ctx: LabelContext,
                         decisions: dict[str, dict[str, rel.Decision]], seed: int) -> dict[str, Any]:
    """dataset/predictability.py on every labelled event of the train, validation and test pools
    (not only the sampled records: the check needs numbers), each capped at MAX_EVENTS by a seeded sample."""
    texts: dict[str, list[str]] = {}
    labels: dict[str, list[str]] = {}
    for split in SPLITS:
        events = list(pools[split])
        if len(events) > predictability.MAX_EVENTS:
            events = seeded_rng(seed, f"predictability-{split}").sample(events, predictability.MAX_EVENTS)
        texts[split], labels[split] = [], []
        for event in events:
            label = news_impact_label(impacts[event.event_id], ctx, decisions[event.event_id])
            if label is not None:
                texts[split].append(news_text(event))
                labels[split].append(label["direction"])
    return predictability.check(texts["train"], labels["train"], texts["val"], labels["val"], texts["test"], labels["test"], seed=seed)
