"""The relevance rule: which tickers an event may be labelled by (synthetic texts)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from finqlora.dataset import relevance as rel


@dataclass
class FakeEvent:
    content: str
    title: str | None = None
    subjects: list[str] = field(default_factory=list)
    stocks: list[str] = field(default_factory=list)


@pytest.mark.parametrize(
    "text, subjects, channel, rule",
    [
        ("某地联储官员称年内仍可能降息", [], "货币政策", rel.KEYWORD),
        ("任意文本", ["美联储动态"], "货币政策", rel.SUBJECT),
        ("美元指数日内走强，非美货币承压", [], "美元与美债", rel.KEYWORD),
        ("美国5月CPI同比上涨，高于预期", [], "通胀与就业数据", rel.KEYWORD),
        ("非农就业人数大幅低于预期", [], "通胀与就业数据", rel.KEYWORD),
        ("某国宣布对另一国实施新一轮制裁", [], "地缘政治与制裁", rel.KEYWORD),
        ("政府宣布对进口商品加征关税", [], "关税与贸易", rel.KEYWORD),
        ("某国央行连续第八个月增持黄金", [], "央行购金", rel.KEYWORD),
        ("OPEC+同意延长减产", [], "原油", rel.KEYWORD),
        ("市场避险情绪升温，资金涌入国债", [], "风险情绪", rel.KEYWORD),
        ("现货黄金日内走高", [], "贵金属供需", rel.KEYWORD),
    ],
)
def test_gold_channels(text: str, subjects: list[str], channel: str, rule: str) -> None:
    decision = rel.decide("XAUUSD", text, subjects, [])
    assert (decision.relevant, decision.channel, decision.rule) == (True, channel, rule)
    assert rel.decide("XAGUSD", text, subjects, []).relevant


@pytest.mark.parametrize(
    "text",
    [
        "某医药公司年度净利润同比增长三成",  # company results: nothing that moves gold
        "央行今日开展七天期逆回购操作",  # a PBoC repo is not a Fed decision
        "国际足联将投票决定主席人选",
        "某国季调后失业率与预期持平",  # a jobless rate that is not US data
        "国庆黄金周旅游人数创新高",  # 黄金周 is a holiday, not gold
        "某公司发行10亿美元债券",  # an amount in dollars is not the dollar
    ],
)
def test_events_that_do_not_move_gold_are_not_relevant(text: str) -> None:
    decision = rel.decide("XAUUSD", text, [], [])
    assert not decision.relevant and decision.rule == rel.NONE and decision.channel is None


def test_equities_follow_the_stocks_links() -> None:
    event = FakeEvent("虚构公司公告中标大额订单", stocks=["SH600001", "000002.SZ"])
    decisions = rel.event_decisions(event, ["600001", "000002", "600003"])
    assert decisions["600001"].relevant and decisions["600001"].rule == rel.STOCKS
    assert decisions["000002"].relevant
    assert not decisions["600003"].relevant
    # No stocks attribute at all (a store without the column): no equity is relevant.
    assert not rel.event_decisions(type("Old", (), {"content": "x", "title": None, "subjects": []})(), ["600001"])["600001"].relevant


def test_stock_codes_are_compared_without_exchange_marks() -> None:
    assert rel.stock_code("sh600519") == rel.stock_code("600519.SH") == "600519"
    assert rel.stock_code("AAPL.O") == "AAPL"


def test_title_counts_and_describe_lists_every_channel() -> None:
    assert rel.event_decisions(FakeEvent("正文无关", title="鲍威尔讲话"), ["XAUUSD"])["XAUUSD"].channel == "货币政策"
    described = rel.describe()
    assert set(described["gold_and_silver"]) == {c.name for c in rel.GOLD_CHANNELS}
    assert "stocks" in described["equities"]
