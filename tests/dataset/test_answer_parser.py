"""The answer parser on varied wordings, including negations and unparseable answers."""

from __future__ import annotations

import pytest

from finqlora.dataset.answer_parser import NEGATIVE, NEUTRAL, POSITIVE, parse_direction, parse_number


@pytest.mark.parametrize(
    ("text", "expected", "method"),
    [
        # the trained structure
        ("方向：利好\n幅度：较大\n提示：仅供参考", POSITIVE, "structured"),
        ("**结论**：利空。黄金短线承压。", NEGATIVE, "structured"),
        ("【判断】：看多", POSITIVE, "structured"),
        ("影响方向为中性，市场反应平淡。", NEUTRAL, "structured"),
        ("Direction: bearish. The dollar rallied.", NEGATIVE, "structured"),
        ("Sentiment: neutral", NEUTRAL, "structured"),
        ("答案：积极", POSITIVE, "structured"),
        # free wording, Chinese and English
        ("这条消息对黄金构成利好，避险需求上升。", POSITIVE, "keyword"),
        ("整体来看偏空，建议谨慎。", NEGATIVE, "keyword"),
        ("预计影响有限。", NEUTRAL, "keyword"),
        ("中性偏多，关注美元走势。", POSITIVE, "keyword"),
        ("The news is bullish for gold.", POSITIVE, "keyword"),
        ("I would call this negative for equities.", NEGATIVE, "keyword"),
        ("对金价不利", NEGATIVE, "keyword"),
        # negations
        ("该消息对黄金不利好。", NEGATIVE, "keyword"),
        ("并非利空。", NEUTRAL, "keyword"),
        ("不构成利空，反而是利好。", POSITIVE, "keyword"),
        ("This is not bullish.", NEGATIVE, "keyword"),
        # weak wording only when nothing stronger is said
        ("金价可能小幅上涨。", POSITIVE, "weak_keyword"),
        ("Prices will probably fall.", NEGATIVE, "weak_keyword"),
    ],
)
def test_direction_wordings(text: str, expected: str, method: str) -> None:
    parsed = parse_direction(text)
    assert parsed.direction == expected
    assert parsed.method == method


@pytest.mark.parametrize(
    "text",
    ["", "   ", "我不知道。", "Sorry, I cannot help with that.", "短期利好，长期利空。", "bullish at first, then bearish", "supporting data"],
)
def test_unparseable_or_ambiguous_is_none(text: str) -> None:
    assert parse_direction(text).direction is None


def test_ticker_line_wins_over_other_tickers() -> None:
    text = "XAUUSD：利空（美元走强）\nUSDCNH：利好"
    assert parse_direction(text, ticker="USDCNH").direction == POSITIVE
    assert parse_direction(text, ticker="XAUUSD").direction == NEGATIVE
    assert parse_direction(text).direction is None  # no ticker: the two verdicts conflict


def test_strong_term_wins_over_described_moves() -> None:
    # The realized moves ("上涨") describe the market; the verdict is the strong term.
    assert parse_direction("尽管金价盘中上涨，整体判断偏空。").direction == NEGATIVE


@pytest.mark.parametrize(
    ("text", "unit", "value", "parsed_unit"),
    [
        ("净利率 = 净利润 / 营业收入 = 120 / 1000 = 12.00%\n答案：12.00%", "%", 12.0, "%"),
        ("答案：-3.45%", "%", -3.45, "%"),
        ("每股收益约为 1.25 元", "元", 1.25, "元"),
        ("营收约为3.2亿元", "元", 320000000.0, "元"),
        ("市盈率为 15.2 倍", "倍", 15.2, "倍"),
        ("净利润 1,234.5 万元，同比增长 8.5%", "%", 8.5, "%"),
        ("2024年的资产负债率为 45.6%", "%", 45.6, "%"),
        ("The P/E ratio is 18.3x.", "倍", 18.3, "倍"),
        ("结果是 0.85", None, 0.85, None),
    ],
)
def test_numbers(text: str, unit: str | None, value: float, parsed_unit: str | None) -> None:
    parsed = parse_number(text, unit)
    assert parsed is not None
    assert parsed.value == pytest.approx(value)
    assert parsed.unit == parsed_unit


def test_answer_key_beats_earlier_numbers() -> None:
    text = "计算结果：25.00%\n解读：盈利能力较强。\n答案：25.00%"
    assert parse_number(text, "%").value == pytest.approx(25.0)
    # Inputs come before the result in a worked answer: the last number is the answer.
    assert parse_number("营业收入 800 万元，营业成本 600 万元，毛利率 25%", "%").value == pytest.approx(25.0)


@pytest.mark.parametrize("text", ["", "无法计算", "数据不足，无法给出答案。", "Q3 results were mixed"])
def test_no_number(text: str) -> None:
    assert parse_number(text) is None
