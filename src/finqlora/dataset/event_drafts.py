"""The records made from the store's events, sampled per split: news_impact (one ex-ante
record per relevant event, answered by `finqlora.dataset.rationales`, never with the realized
move) and market_analysis (ex-post, balanced over the case types and the importance question,
preferring events news_impact did not use), with their instructions and answers."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from finqlora.dataset import labels as lab
from finqlora.dataset import rationales
from finqlora.dataset import relevance as rel
from finqlora.dataset.drafts import SPLITS, Draft, allocate, seeded_rng
from finqlora.dataset.labelling import LabelContext, case_inputs, classify_market, importance_applies, news_impact_label
from finqlora.dataset.store_reader import StoreData, news_text
from finqlora.store import db as store

# The groups the market_analysis quota is balanced over: the four cases and the importance question.
MARKET_GROUPS = (*lab.MARKET_CASES, lab.IMPORTANCE)

TICKER_NAMES = {
    "XAUUSD": "现货黄金", "XAGUSD": "现货白银", "USDCNH": "离岸人民币", "USDCNY": "在岸人民币", "DXY": "美元指数",
    "WTI": "WTI原油", "BRENT": "布伦特原油", "SPX": "标普500指数", "NDX": "纳斯达克100指数", "HSI": "恒生指数",
}

# Ex-ante questions: what a reader can judge at publication (direction, channel, risks).
_NEWS_INSTRUCTIONS = (
    "分析以下财经快讯对{names}的影响。",
    "请判断这条快讯对{names}的影响方向（利好/利空/中性），并说明传导路径和置信度。",
    "阅读下面的新闻，给出对{names}的结构化影响分析：方向、传导渠道、可能改变判断的因素。",
    "作为金融分析师，这条快讯发布时你会如何判断{names}的走向？",
    "这条消息对{names}意味着什么？请给出方向、依据和风险提示。",
)
_CASE_INSTRUCTIONS = (
    "结合下面的快讯与行情数据，判断市场反应属于哪种情形（预期兑现、观望信号、趋势延续、反应消退），并说明理由。",
    "根据快讯发布前后的价格变化，分析市场对这条消息的反应模式。",
    "下面给出一条快讯和{name}在发布前后的收益率，请判断这是预期兑现、观望、趋势延续还是反应消退。",
)
_IMPORTANCE_INSTRUCTIONS = (
    "这条快讯的重要性与其引发的价格波动是否匹配？请结合数据说明。",
    "结合重要性评级和行情数据，评价这条消息引起的{name}波动是否超出常态。",
)
# One short caveat for the ex-post cases (a long repeated disclaimer teaches the model to loop on it).
_CAVEAT = "同期其他消息与流动性也会影响价格，历史反应不代表未来表现。"


def _pct(ret: float) -> str:
    """A return to the precision of the scale it is compared with (σ, medians: 0.001%), so that the
    label computed from it can be recomputed from the text."""
    return f"{ret * 100:+.3f}%"


def _ticker_label(ticker: str) -> str:
    name = TICKER_NAMES.get(ticker.upper())
    return f"{ticker}（{name}）" if name else ticker


def _window_label(window: int) -> str:
    return f"发布前{-window}分钟" if window < 0 else f"发布后{window}分钟"


def _stars(star: int | None) -> str:
    if star is None:
        return "未标注"
    return "★" * star + "☆" * (5 - star) + f"（{star}/5）"


def _news_prefix(event: store.Event) -> str:
    importance = _stars(event.star)
    if event.importance:
        importance += f"，来源评级{event.importance}"
    return f"重要性：{importance}\n发布时间（UTC）：{event.published_at}\n快讯："


def news_impact_output(label: dict[str, Any], rng: random.Random) -> str:
    """The ex-ante answer (no realized number: the move is the label, see `rationales`)."""
    channels = {t: info["channel"] for t, info in label["relevance"].items()}
    names = {t: _ticker_label(t) for t in label["directions"]}
    return rationales.ex_ante_answer(label, channels, names, rng)


def _case_explanation(case: str, name: str, pre: tuple[int, float, float] | None, post: tuple[int, float, float], longest: tuple[int, float, float]) -> str:
    pre_text = f"发布前{-pre[0]}分钟{name}变动 {_pct(pre[1])}（{pre[2]:+.2f}σ）" if pre else "发布前走势数据缺失"
    post_text = f"发布后{post[0]}分钟 {_pct(post[1])}（{post[2]:+.2f}σ）"
    long_text = f"发布后{longest[0]}分钟 {_pct(longest[1])}（{longest[2]:+.2f}σ）"
    if case == lab.EXPECTATION_REALIZED:
        return (f"依据：{pre_text}，已提前出现明显波动；{post_text}，{long_text}，消息落地后没有沿事前方向继续，"
                "说明市场在消息发布前已经计入了预期。\n解读：消息内容本身可能并不差，但预期已被交易，落地后缺少新的增量资金，"
                "容易出现“买预期、卖事实”。")
    if case == lab.CONTINUATION:
        return (f"依据：{pre_text}；{post_text}，并在{long_text}仍保持同一方向且幅度显著。\n"
                "解读：消息带来的信息被市场逐步消化，价格沿反应方向持续运行，说明消息超出了原有预期或改变了中期判断。")
    if case == lab.FADING:
        return (f"依据：{pre_text}；{post_text}出现了明显反应，但到{long_text}时已明显回吐或转向。\n"
                "解读：初始反应更多是情绪或程序化交易驱动，随后被市场修正，消息的持续影响弱于第一反应。")
    return (f"依据：{pre_text}；{post_text}，波动不到该窗口典型波动的一半，{long_text}。\n"
            "解读：消息发布后市场没有形成明显反应，资金以观望为主，往往在等待更多数据或后续消息确认。")


def _z(impact: dict[tuple[str, int], float], ticker: str, window: int, ctx: LabelContext) -> tuple[int, float, float]:
    ret = impact[(ticker, window)]
    return window, ret, ret / ctx.sigmas[(ticker, window)]


def market_case_record(impact: dict[tuple[str, int], float], ctx: LabelContext, rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    """(instruction, input suffix, output, label) of a case question for a classifiable event."""
    ticker, returns, sigmas = case_inputs(impact, ctx)
    case = lab.market_case(returns, sigmas, ctx.rules)
    name = _ticker_label(ticker)
    pre_windows = sorted(w for w in returns if w < 0)
    post_windows = sorted(w for w in returns if w > 0)
    # Each window's move in units of its σ (z) is what the case rule reads (dataset/labels.py), stated
    # so that the label is knowable from the input, not only computable by dividing two numbers.
    table = "\n".join(
        f"- {_window_label(w)}：{_pct(returns[w])}（该窗口典型波动 σ={sigmas[w] * 100:.3f}%，即 {returns[w] / sigmas[w]:+.2f}σ）"
        for w in pre_windows + post_windows
    )
    suffix = f"\n\n{name}行情：\n{table}"
    pre = _z(impact, ticker, pre_windows[0], ctx) if pre_windows else None
    explanation = _case_explanation(case, name, pre, _z(impact, ticker, ctx.rules.primary_window, ctx), _z(impact, ticker, post_windows[-1], ctx))
    output = f"案例类型：{case}\n{explanation}\n提示：{_CAVEAT}"
    instruction = rng.choice(_CASE_INSTRUCTIONS).format(name=name)
    return instruction, suffix, output, {"case": case, "ticker": ticker, "window_min": ctx.rules.primary_window}


def importance_record(event: store.Event, impact: dict[tuple[str, int], float], ctx: LabelContext, rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    """(instruction, input suffix, output, label) of an importance-vs-reaction question."""
    ticker, p = ctx.primary_ticker, ctx.rules.primary_window
    ret = impact[(ticker, p)]
    typical = ctx.typical_abs["all"]
    relation = lab.importance_relation(abs(ret), typical, ctx.rules)
    name = _ticker_label(ticker)
    by_star = "；".join(f"{s}星 {ctx.typical_abs[s] * 100:.3f}%" for s in sorted(k for k in ctx.typical_abs if k != "all"))
    suffix = (f"\n\n{name}发布后{p}分钟收益：{_pct(ret)}\n"
              f"训练期全部快讯发布后{p}分钟波动幅度（|收益|）中位数：{typical * 100:.3f}%"
              + (f"\n按重要性分组的中位数：{by_star}" if by_star else ""))
    ratio = abs(ret) / typical if typical > 0 else float("inf")
    star_note = ""
    if event.star is not None and str(event.star) in ctx.typical_abs:
        peer = ctx.typical_abs[str(event.star)]
        star_note = f"与同为{event.star}星的快讯相比（中位数 {peer * 100:.3f}%），本次波动是其 {abs(ret) / peer:.1f} 倍。" if peer > 0 else ""
    high = "重要性较高" if (event.star or 0) >= 4 else "重要性一般"
    output = (
        f"案例类型：{lab.IMPORTANCE}\n结论：{relation}（本次 |收益| {abs(ret) * 100:.3f}%，约为全部快讯中位数的 {ratio:.1f} 倍）。\n"
        f"依据：这条快讯{high}（{_stars(event.star)}）。{star_note}\n"
        f"解读：重要性评级反映的是编辑对消息的重视程度，而价格波动取决于消息是否超出预期和当时的流动性；"
        f"两者{'一致' if (relation == lab.ABOVE_NORMAL) == ((event.star or 0) >= 4) else '并不一致'}，"
        "分析时应同时参考二者，而不是只看评级。\n"
        f"提示：{_CAVEAT}"
    )
    instruction = rng.choice(_IMPORTANCE_INSTRUCTIONS).format(name=name)
    label = {"case": lab.IMPORTANCE, "relation": relation, "star": event.star, "ticker": ticker, "window_min": p}
    return instruction, suffix, output, label


def _take_balanced(groups: dict[str, list[store.Event]], count: int) -> list[tuple[str, store.Event]]:
    """Round-robin over groups (sorted by name) so every case type is represented equally."""
    taken: list[tuple[str, store.Event]] = []
    used: set[str] = set()
    cursors = {name: 0 for name in groups}
    while len(taken) < count:
        progressed = False
        for name in sorted(groups):
            events = groups[name]
            while cursors[name] < len(events) and events[cursors[name]].event_id in used:
                cursors[name] += 1
            if cursors[name] < len(events) and len(taken) < count:
                event = events[cursors[name]]
                cursors[name] += 1
                used.add(event.event_id)
                taken.append((name, event))
                progressed = True
        if not progressed:
            break
    return taken


def _event_time(event: store.Event) -> str | None:
    return event.published_at


def _news_drafts(split: str, order: list[store.Event], want: int, data: StoreData, ctx: LabelContext,
                 decisions: dict[str, dict[str, rel.Decision]], rng: random.Random) -> list[Draft]:
    """Up to `want` ex-ante news-impact drafts from the shuffled events of one split.

    Labelled lazily in shuffled order, so a small build does not pay for labelling every event.
    """
    drafts: list[Draft] = []
    for event in order:
        if len(drafts) == want:
            break
        label = news_impact_label(data.impacts[event.event_id], ctx, decisions[event.event_id])
        if label is None:
            continue
        names = "、".join(TICKER_NAMES.get(t, t) for t in label["directions"])
        drafts.append(Draft(
            "news_impact", split, f"ni-{event.event_id}", rng.choice(_NEWS_INSTRUCTIONS).format(names=names),
            news_impact_output(label, rng), label, input_prefix=_news_prefix(event), news=news_text(event),
            event_id=event.event_id, event_time=_event_time(event), ts=event.ts_utc,
        ))
    return drafts


def _market_drafts(split: str, candidates: list[store.Event], want: int, data: StoreData, ctx: LabelContext,
                   rng: random.Random) -> list[Draft]:
    """Ex-post market-analysis drafts, balanced over the case types (classified until every
    case type has enough events for the quota)."""
    groups: dict[str, list[store.Event]] = {}
    for event in candidates:
        if len(groups) == len(MARKET_GROUPS) and all(len(g) >= want for g in groups.values()):
            break
        impact = data.impacts[event.event_id]
        case = classify_market(impact, ctx)
        if case is not None:
            groups.setdefault(case, []).append(event)
        if importance_applies(impact, ctx):
            groups.setdefault(lab.IMPORTANCE, []).append(event)
    drafts = []
    for case_name, event in _take_balanced(groups, want):
        impact = data.impacts[event.event_id]
        if case_name == lab.IMPORTANCE:
            instruction, suffix, output, label = importance_record(event, impact, ctx, rng)
        else:
            instruction, suffix, output, label = market_case_record(impact, ctx, rng)
        drafts.append(Draft(
            "market_analysis", split, f"ma-{event.event_id}", instruction, output, label,
            input_prefix=_news_prefix(event), news=news_text(event), input_suffix=suffix,
            event_id=event.event_id, event_time=_event_time(event), ts=event.ts_utc,
        ))
    return drafts


def sample_event_drafts(pools: dict[str, list[store.Event]], data: StoreData, ctx: LabelContext,
                        decisions: dict[str, dict[str, rel.Decision]], wanted: dict[str, int], shares: Sequence[float],
                        seed: int) -> tuple[list[Draft], list[str]]:
    """The news_impact and market_analysis drafts of every split (`wanted` per type, divided by
    the split shares), and a line for each split and type that got fewer than asked for."""
    rng = seeded_rng(seed, "store")
    news_split_counts = dict(zip(SPLITS, allocate(wanted["news_impact"], shares)))
    market_split_counts = dict(zip(SPLITS, allocate(wanted["market_analysis"], shares)))
    drafts: list[Draft] = []
    shortfalls = []
    for split in SPLITS:
        order = list(pools[split])
        rng.shuffle(order)
        news = _news_drafts(split, order, news_split_counts[split], data, ctx, decisions, rng)
        if len(news) < news_split_counts[split]:
            shortfalls.append(f"news_impact/{split}: asked for {news_split_counts[split]}, only {len(news)} relevant events qualify")
        used = {d.event_id for d in news}
        # Events unused by news_impact come first, relevant ones before the others.
        ranked = sorted(order, key=lambda e: (e.event_id in used, not any(d.relevant for d in decisions[e.event_id].values())))
        market = _market_drafts(split, ranked, market_split_counts[split], data, ctx, rng)
        if len(market) < market_split_counts[split]:
            shortfalls.append(f"market_analysis/{split}: asked for {market_split_counts[split]}, only {len(market)} events qualify")
        drafts += news + market
    return drafts, shortfalls
