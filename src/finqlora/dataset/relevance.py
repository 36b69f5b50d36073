"""Which tickers a news event may be labelled by (the relevance rule, docs/dataset.md).

A flash about a pharma company's profit says nothing about gold, so gold's 15-minute move
after it is noise, not a label. This module decides, per event and ticker, whether the
event is *relevant* and through which channel, from what was known at publication only
(the text, the CLS `subjects` tags and the `stocks` links), never from the price reaction.

Rules, in this order (the first channel that matches names the event's channel):

* **Gold and silver (XAUUSD, XAGUSD)**: a channel of `GOLD_CHANNELS` matches when one of its
  CLS `subjects` tags is on the event (rule `subject`) or one of its keywords occurs in the
  title or text (rule `keyword`). Keywords are plain substrings except where a pattern
  excludes a common false friend (黄金周, 10亿美元).
* **Other macro tickers** (DXY, USD/CNH, oil, index futures): the channels in `MACRO_TICKERS`.
* **Any other ticker is an equity**: relevant only when the event's `stocks` links name it
  (rule `stocks`; codes are compared without exchange prefixes or suffixes).

An event relevant to no labelled ticker is left out of the news-impact part (the builder's
choice, measured in the dataset card), rather than taught as 无直接关联.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SUBJECT, KEYWORD, STOCKS, NONE = "subject", "keyword", "stocks", "none"


@dataclass(frozen=True)
class Channel:
    name: str  # Chinese label, shown in answers and the card
    subjects: tuple[str, ...]  # CLS topic tags
    keywords: tuple[str, ...]  # substrings or regular expressions (prefix "re:")
    exclude: tuple[str, ...] = ()  # a text holding one of these never matches this channel by keyword


# Order matters: the most specific channel first.
GOLD_CHANNELS: tuple[Channel, ...] = (
    Channel("央行购金", (), ("购金", "增持黄金", "黄金储备", "买入黄金", "减持黄金")),
    Channel("贵金属供需", ("黄金",), (r"re:黄金(?!周|时间|时段|档|赛道|期|国际|集团|股份|矿业|[：:(（])", "金价", "白银", "银价", "贵金属", "伦敦金", "COMEX金", "现货金", "黄金ETF")),
    Channel("货币政策", ("美联储动态", "欧洲央行动态"), (
        "美联储", "联储", "FOMC", "鲍威尔", "议息", "利率决议", "点阵图", "缩表", "欧洲央行", "日本央行", "日央行",
        "英国央行", "英格兰银行", "拉加德", "植田和男", "加息", "降息")),
    Channel("美元与美债", ("美债动态",), (
        "美元指数", "美元走强", "美元走弱", "美元汇率", "强势美元", "弱势美元", "美元兑", "兑美元", "美债", "实际利率",
        # US yields only: a Japanese 10-year yield is not the dollar's.
        r"re:美国\d*年?期?国债收益率", "收益率曲线")),
    # Gold trades on US data: the generic data words count only next to 美国/美联储 (a Swiss
    # jobless rate or Thai GDP forecast is not a gold event).
    Channel("通胀与就业数据", ("美国宏观速递", "美国经济"), (
        "非农", "初请", "PCE", "ISM", "密歇根大学", r"re:美国.{0,12}(?:CPI|PPI|通胀|失业率|就业|零售销售|GDP)",
        r"re:(?:CPI|PPI|通胀|就业|GDP).{0,30}美联储")),
    Channel("地缘政治与制裁", ("中东冲突", "俄乌冲突快报"), (
        "制裁", "空袭", "导弹", "袭击", "停火", "战争", "军事行动", "伊朗", "以色列", "胡塞", "哈马斯", "真主党", "霍尔木兹",
        "乌克兰", "俄罗斯", "朝鲜", "核设施", "核武")),
    Channel("关税与贸易", (), ("关税", "贸易战", "贸易协议", "贸易谈判", "贸易摩擦", "出口管制", "301调查")),
    # By keyword only: the CLS tag 原油市场动态 also covers domestic asphalt and refinery deals;
    # 成品油 price changes are China's regulated pump prices, not the world oil market.
    Channel("原油", (), ("原油", "油价", "OPEC", "欧佩克", "布伦特", "WTI"), exclude=("成品油", "沥青", "润滑油")),
    Channel("风险情绪", ("美国债务危机",), (
        "避险情绪", "避险需求", "避险资产", "恐慌", "VIX", "美股暴跌", "美股大跌", "美股重挫", "衰退", "债务上限", "政府停摆", "银行危机", "崩盘")),
)
_BY_NAME = {c.name: c for c in GOLD_CHANNELS}
MACRO_TICKERS: dict[str, tuple[Channel, ...]] = {
    "XAUUSD": GOLD_CHANNELS,
    "XAGUSD": GOLD_CHANNELS,
    **{t: tuple(_BY_NAME[n] for n in ("货币政策", "美元与美债", "通胀与就业数据", "地缘政治与制裁", "关税与贸易"))
       for t in ("DXY", "USDCNH", "USDCNY")},
    **{t: tuple(_BY_NAME[n] for n in ("原油", "地缘政治与制裁", "关税与贸易", "风险情绪")) for t in ("WTI", "BRENT")},
    **{t: tuple(_BY_NAME[n] for n in ("货币政策", "通胀与就业数据", "关税与贸易", "风险情绪")) for t in ("SPX", "NDX", "HSI")},
}
EQUITY_CHANNEL = "个股消息"


@dataclass(frozen=True)
class Decision:
    """Whether an event may be labelled by one ticker, and why."""

    ticker: str
    relevant: bool
    rule: str  # subject | keyword | stocks | none
    channel: str | None
    evidence: str | None  # the tag, keyword or stock code that matched

    def as_dict(self) -> dict[str, object]:
        return {"relevant": self.relevant, "rule": self.rule, "channel": self.channel, "evidence": self.evidence}


def _keyword_hit(keyword: str, text: str) -> str | None:
    if keyword.startswith("re:"):
        found = re.search(keyword[3:], text)
        return found.group(0) if found else None
    return keyword if keyword in text else None


def match_channel(channels: Sequence[Channel], text: str, subjects: Iterable[str]) -> tuple[str, str, str] | None:
    """(channel name, rule, evidence) of the first matching channel, or None."""
    tags = set(subjects)
    upper = text.upper()
    for channel in channels:
        for tag in channel.subjects:
            if tag in tags:
                return channel.name, SUBJECT, tag
        if any(word in text for word in channel.exclude):
            continue
        for keyword in channel.keywords:
            hit = _keyword_hit(keyword, text if keyword.startswith("re:") else (upper if keyword.isascii() else text))
            if hit:
                return channel.name, KEYWORD, hit
    return None


def stock_code(code: str) -> str:
    """'SH600519', '600519.SH', 'sz000001' -> '600519' / '000001'; 'AAPL.O' -> 'AAPL'."""
    cleaned = code.strip().upper()
    digits = re.search(r"\d{4,6}", cleaned)
    if digits:
        return digits.group(0)
    return re.split(r"[.\s]", cleaned)[0]


def decide(ticker: str, text: str, subjects: Iterable[str], stocks: Iterable[str]) -> Decision:
    """The relevance decision of one event for one ticker (see the module doc)."""
    ticker_up = ticker.upper()
    channels = MACRO_TICKERS.get(ticker_up)
    if channels is not None:
        found = match_channel(channels, text, subjects)
        if found is None:
            return Decision(ticker, False, NONE, None, None)
        return Decision(ticker, True, found[1], found[0], found[2])
    linked = {stock_code(s) for s in stocks if s}
    if stock_code(ticker) in linked:
        return Decision(ticker, True, STOCKS, EQUITY_CHANNEL, ticker)
    return Decision(ticker, False, NONE, None, None)


def event_decisions(event: object, tickers: Iterable[str]) -> dict[str, Decision]:
    """Decisions for one `store.db.Event` (title + content, subjects, stocks) and tickers."""
    title = getattr(event, "title", None) or ""
    text = f"{title}\n{getattr(event, 'content', '') or ''}"
    subjects = getattr(event, "subjects", None) or []
    stocks = [str(s) for s in (getattr(event, "stocks", None) or [])]
    return {t: decide(t, text, subjects, stocks) for t in tickers}


def describe() -> dict[str, object]:
    """The rule as data, for the dataset card and stats."""
    return {
        "gold_and_silver": {c.name: {"subjects": list(c.subjects), "keywords": [k.removeprefix("re:") for k in c.keywords]}
                            for c in GOLD_CHANNELS},
        "macro_tickers": {t: [c.name for c in cs] for t, cs in MACRO_TICKERS.items() if t not in ("XAUUSD", "XAGUSD")},
        "equities": "relevant only when the event's stocks links name the ticker (codes compared without exchange prefix/suffix)",
        "irrelevant_events": "left out of news_impact (not labelled by that ticker's move)",
    }
