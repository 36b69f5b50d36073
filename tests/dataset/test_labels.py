"""The labelling rules of finqlora.dataset.labels, one test per rule and boundary."""

from __future__ import annotations

import math

import numpy as np
import pytest

from finqlora.dataset import labels as lab

RULES = lab.LabelRules()


def test_robust_sigma_matches_std_of_normal_sample_and_ignores_outliers() -> None:
    rng = np.random.default_rng(0)
    sample = rng.normal(0.0, 0.002, size=20_000)
    assert lab.robust_sigma(sample) == pytest.approx(0.002, rel=0.03)
    # A handful of crashes would double a plain standard deviation; the MAD barely moves.
    with_outliers = np.concatenate([sample, [0.2] * 50])
    assert np.std(with_outliers) > 2 * 0.002
    assert lab.robust_sigma(with_outliers) == pytest.approx(0.002, rel=0.05)


def test_robust_sigma_of_known_values() -> None:
    # median 3, absolute deviations [2,1,0,1,2] -> MAD 1 -> sigma 1.4826
    assert lab.robust_sigma([1, 2, 3, 4, 5]) == pytest.approx(1.4826)
    assert math.isnan(lab.robust_sigma([]))
    assert lab.robust_sigma([float("nan"), 1.0, 2.0, 3.0]) == pytest.approx(1.4826)


def test_direction_uses_strict_threshold() -> None:
    assert lab.direction(0.0011, 0.001) == lab.POSITIVE
    assert lab.direction(-0.0011, 0.001) == lab.NEGATIVE
    assert lab.direction(0.001, 0.001) == lab.NEUTRAL  # on the threshold is not a move
    assert lab.direction(-0.001, 0.001) == lab.NEUTRAL
    assert lab.direction(0.0, 0.001) == lab.NEUTRAL


def test_threshold_is_k_sigma_with_a_floor() -> None:
    assert lab.threshold_for(0.004) == pytest.approx(0.002)
    assert lab.threshold_for(0.00001) == RULES.min_threshold
    assert lab.threshold_for(0.004, lab.LabelRules(threshold_k=1.0)) == pytest.approx(0.004)


def test_volatility_table_needs_enough_estimation_returns() -> None:
    impacts = {f"e{i}": {("XAUUSD", 15): 0.001 * (i % 5 - 2), ("XAGUSD", 15): 0.002} for i in range(25)}
    impacts["e0"][("XAUUSD", 30)] = 0.01  # one return only: not enough for a scale
    table = lab.volatility_table(impacts, impacts.keys())
    assert ("XAUUSD", 30) not in table
    assert table[("XAUUSD", 15)] == pytest.approx(lab.robust_sigma([0.001 * (i % 5 - 2) for i in range(25)]))
    # Only the events given are used (e.g. the train split).
    assert lab.volatility_table(impacts, ["e1", "e2"]) == {}


def test_magnitude_buckets() -> None:
    assert lab.magnitude(0.0009, 0.001) == "较小"
    assert lab.magnitude(-0.0015, 0.001) == "中等"
    assert lab.magnitude(0.002, 0.001) == "较大"


SIG = {-120: 0.004, 5: 0.001, 10: 0.0012, 15: 0.0015, 30: 0.002, 120: 0.004}


def _case(returns: dict[int, float]) -> str | None:
    return lab.market_case(returns, SIG, RULES)


def test_case_expectation_realized_pre_move_then_reversal_or_stall() -> None:
    # +1.5 sigma before, then a fall after: the news's move happened before it was published.
    assert _case({-120: 0.006, 5: -0.0005, 15: -0.001, 30: -0.002, 120: -0.003}) == lab.EXPECTATION_REALIZED
    # +1.5 sigma before, then nothing: no follow-through.
    assert _case({-120: -0.006, 5: 0.0001, 15: -0.0002, 30: 0.0, 120: 0.0005}) == lab.EXPECTATION_REALIZED


def test_case_pre_move_with_follow_through_is_not_expectation_realized() -> None:
    returns = {-120: 0.006, 5: 0.0008, 15: 0.0012, 30: 0.0018, 120: 0.004}
    assert _case(returns) == lab.CONTINUATION


def test_case_continuation_needs_all_later_windows_and_the_longest_to_agree() -> None:
    assert _case({-120: 0.0, 5: -0.0002, 15: -0.001, 30: -0.0015, 120: -0.003}) == lab.CONTINUATION
    # Same start, but the 120-minute move is insignificant: the reaction did not persist.
    assert _case({-120: 0.0, 5: -0.0002, 15: -0.001, 30: -0.0015, 120: -0.0005}) == lab.FADING
    # The 30-minute window turns: not a continuation.
    assert _case({-120: 0.0, 5: 0.0, 15: 0.001, 30: -0.0001, 120: 0.003}) == lab.FADING


def test_case_fading_needs_a_significant_primary_move() -> None:
    # A significant 10-minute wiggle is not a reaction at the primary window: wait-and-see.
    assert _case({-120: -0.003, 5: 0.0003, 10: -0.0007, 15: 0.0001, 30: -0.0009, 120: 0.0006}) == lab.WAIT_AND_SEE
    # Significant at 15 minutes, gone by 120: fading.
    assert _case({-120: -0.003, 5: 0.0007, 15: -0.0017, 30: -0.0001, 120: 0.0002}) == lab.FADING


def test_case_wait_and_see_when_the_primary_window_is_quiet() -> None:
    assert _case({-120: 0.001, 5: 0.0001, 10: -0.0002, 15: 0.0003, 30: -0.0005, 120: 0.001}) == lab.WAIT_AND_SEE
    assert _case({5: 0.001, 10: -0.001, 15: 0.0002, 30: -0.0001, 120: 0.0}) == lab.WAIT_AND_SEE


def test_case_needs_primary_window() -> None:
    assert _case({-120: 0.01, 5: 0.001, 30: 0.002}) is None
    # Windows without a scale are ignored rather than guessed.
    assert lab.market_case({15: 0.002, 60: 0.01}, {15: 0.0015}, RULES) == lab.CONTINUATION


def test_importance_relation() -> None:
    assert lab.importance_relation(0.003, 0.002) == lab.ABOVE_NORMAL
    assert lab.importance_relation(0.0013, 0.002) == lab.BELOW_NORMAL
    assert lab.importance_relation(0.002, 0.002) == lab.NORMAL
    assert lab.importance_relation(0.0, 0.0) == lab.NORMAL


def test_rules_are_described_for_the_card() -> None:
    described = lab.LabelRules(primary_window=30, threshold_k=0.8).describe()
    assert "30 min" in described["direction"] and "0.8" in described["direction"]
    assert set(described["cases"]) == {lab.EXPECTATION_REALIZED, lab.CONTINUATION, lab.WAIT_AND_SEE, lab.FADING, lab.IMPORTANCE}
