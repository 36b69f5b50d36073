"""Simulated financial statements: consistent numbers and checked answers."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from finqlora.dataset import report_qa as rq
from finqlora.dataset.answer_parser import parse_number
from finqlora.core.errors import FinqloraError

# A statement written out by hand (万元); the expected answers below are worked by hand too.
HAND = rq.Statement(
    company="测试股份有限公司", year=2024, industry="软件服务",
    revenue=12_000, revenue_prev=10_000, cost_of_revenue=7_200, operating_expenses=2_400,
    operating_profit=2_400, income_tax=600, net_profit=1_800, net_profit_prev=1_500,
    total_assets=30_000, total_liabilities=18_000, equity=12_000, equity_prev=11_000,
    operating_cash_flow=2_700, shares=6_000, price=9.00,
)
HAND_ANSWERS = {
    "revenue_growth": (20.00, "%"),       # (12000-10000)/10000
    "net_profit_growth": (20.00, "%"),    # (1800-1500)/1500
    "gross_margin": (40.00, "%"),         # (12000-7200)/12000
    "operating_margin": (20.00, "%"),     # 2400/12000
    "net_margin": (15.00, "%"),           # 1800/12000
    "roe": (15.65, "%"),                  # 1800/11500 = 15.652%
    "eps": (0.30, "元"),                  # 1800/6000
    "debt_ratio": (60.00, "%"),           # 18000/30000
    "equity_multiplier": (2.50, "倍"),    # 30000/12000
    "cash_conversion": (1.50, "倍"),      # 2700/1800
    "pe": (30.00, "倍"),                  # 9.00/0.30
}


def test_every_metric_is_covered_by_the_hand_example() -> None:
    assert set(HAND_ANSWERS) == set(rq.METRICS)


@pytest.mark.parametrize("metric", sorted(HAND_ANSWERS))
def test_hand_worked_answers(metric: str) -> None:
    record = rq.make_record(HAND, metric, random.Random(0))
    answer, unit = HAND_ANSWERS[metric]
    assert record["label"] == {"metric": metric, "answer": answer, "unit": unit, "tolerance": rq.TOLERANCE}
    assert record["output"].endswith(f"答案：{answer:.2f}{unit}")
    rq.check_record(record)
    # The evaluator's parser reads the same number back from the worked answer.
    parsed = parse_number(record["output"], unit)
    assert parsed is not None and parsed.value == pytest.approx(answer)


def test_generated_statements_are_consistent() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        st = rq.generate_statement(rng)
        fields = rq.parse_statement(rq.render_statement(st))
        assert rq.check_statement(fields) == []
        assert st.net_profit > 0 and st.equity > 0 and st.equity_prev > 0
        assert st.operating_profit == st.revenue - st.cost_of_revenue - st.operating_expenses


def test_generated_records_cover_all_metrics_and_pass_the_check() -> None:
    records = rq.generate_records(200, random.Random(3))
    assert {r["label"]["metric"] for r in records} == set(rq.METRICS)
    for record in records:
        rq.check_record(record)
        rq.check_record({**record, "input": record["compact_input"]})


def test_check_catches_a_wrong_label() -> None:
    record = rq.make_record(HAND, "gross_margin", random.Random(0))
    record["label"] = {**record["label"], "answer": 41.0}
    with pytest.raises(FinqloraError, match="recomputed 40.0"):
        rq.check_record(record)


def test_check_catches_an_inconsistent_statement() -> None:
    bad = replace(HAND, operating_profit=2_500)
    record = rq.make_record(bad, "operating_margin", random.Random(0))
    with pytest.raises(FinqloraError, match="营业利润"):
        rq.check_record(record)


def test_check_catches_an_output_that_does_not_end_with_the_answer() -> None:
    record = rq.make_record(HAND, "eps", random.Random(0))
    record["output"] = record["output"].replace("答案：0.30元", "答案：0.31元")
    with pytest.raises(FinqloraError, match="does not end"):
        rq.check_record(record)


def test_compact_input_has_only_the_needed_figures() -> None:
    record = rq.make_record(HAND, "roe", random.Random(0))
    fields = rq.parse_statement(record["compact_input"])
    assert set(fields) == {"net_profit", "equity_prev", "equity"}
    missing = {**record, "input": record["compact_input"].replace("期初股东权益：11000万元", "")}
    with pytest.raises(FinqloraError, match="期初股东权益"):
        rq.check_record(missing)


def test_text_without_figures_is_refused() -> None:
    with pytest.raises(FinqloraError, match="no financial statement figures"):
        rq.parse_statement("公司：某公司")
