"""The built-in Chinese finance templates (the no-database fallback)."""

from __future__ import annotations

import random
import re

import pytest

from finqlora.dataset import templates as tp
from finqlora.dataset.answer_parser import parse_number

CJK = re.compile(r"[\u4e00-\u9fff]")


def test_at_least_120_distinct_templates() -> None:
    ids = [t.template_id for t in tp.TEMPLATES]
    assert len(ids) >= 120
    assert len(set(ids)) == len(ids)
    assert len({t.category for t in tp.TEMPLATES}) >= 15


@pytest.mark.parametrize("template", tp.TEMPLATES, ids=lambda t: t.template_id)
def test_each_template_builds_chinese_records(template: tp.Template) -> None:
    rng = random.Random(0)
    for _ in range(20):
        instruction, input_text, output = template.build(rng)
        assert CJK.search(instruction) and CJK.search(output)
        assert "nan" not in output and "inf" not in output
        if template.template_id.startswith("calc_"):
            assert input_text, "a calculation states its numbers in the input"
            assert re.search(r"答案：-?[\d,]+\.\d{2}\S*$", output), output


def test_small_datasets_are_varied() -> None:
    records = tp.generate_template_records(len(tp.TEMPLATES), random.Random(5))
    assert len({r["label"]["template_id"] for r in records}) == len(tp.TEMPLATES)


def test_same_seed_same_records_other_seed_other_records() -> None:
    a = tp.generate_template_records(300, random.Random(1))
    b = tp.generate_template_records(300, random.Random(1))
    c = tp.generate_template_records(300, random.Random(2))
    assert a == b
    assert a != c


def test_no_exact_duplicate_records() -> None:
    records = tp.generate_template_records(1000, random.Random(0))
    keys = [(r["instruction"], r["input"], r["output"]) for r in records]
    assert len(set(keys)) == len(keys)


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", text)]


def test_calculation_answers_are_right() -> None:
    """Recompute a few calculation templates' answers from the numbers stated in the input."""
    by_id = {t.template_id: t for t in tp.TEMPLATES}
    rng = random.Random(11)
    for _ in range(50):
        _, text, output = by_id["calc_pe_calc"].build(rng)
        price, eps = _numbers(text)
        assert parse_number(output, "倍").value == pytest.approx(round(price / eps, 2), abs=0.006)

        _, text, output = by_id["calc_compound_interest"].build(rng)
        principal, rate, years = _numbers(text)
        assert parse_number(output, "元").value == pytest.approx(principal * (1 + rate / 100) ** years, abs=0.006)

        _, text, output = by_id["calc_breakeven_after_loss"].build(rng)
        (loss,) = _numbers(text)
        assert parse_number(output, "%").value == pytest.approx(100 / (100 - loss) * 100 - 100, abs=0.006)

        _, text, output = by_id["calc_capm"].build(rng)
        rf, beta, premium = _numbers(text)[-3:]
        assert parse_number(output, "%").value == pytest.approx(rf + beta * premium, abs=0.006)
