"""Labelling rules: the direction of a news event and the market-analysis case it shows.

Every rule here is a pure function of the stored returns (`event_impacts.ret`, fractions;
positive `window_min` = post-event, negative = pre-event) so a test can recompute any label.

Direction (news_impact):
    sigma(ticker, w) = 1.4826 * median(|r - median(r)|)  over the estimation events' returns
                       of that ticker at window w (a robust standard deviation: one crash
                       does not set the scale for a year);
    threshold(ticker, w) = max(min_threshold, k * sigma(ticker, w))       (default k = 0.5)
    direction = 利好 if r > threshold, 利空 if r < -threshold, else 中性  at the primary window
                (default 15 minutes).
    The estimation events are the training split's events only, so val/test returns never
    shape the labels (a documented choice; see docs/dataset.md).

    Held across windows (`hold_adjacent`, default on): a 利好/利空 whose sign does not hold at
    the stored windows adjacent to the primary one (10 and 30 around 15) becomes 中性.
    z = r / sigma is stored in the label: the move in units of the ticker's volatility.

Magnitude: |r| / sigma < 1 较小, < 2 中等, otherwise 较大.

Market-analysis cases, with z_w = r_w / sigma_w, the pre-event window = the longest one
stored (e.g. -120), the primary window p and the longest post window L, in this order:
    1. 预期兑现  |z_pre| >= pre_move_z (default 1.0) and no follow-through at p, i.e. NOT
                 (sign r_p = sign r_pre and |z_p| >= follow_z): the market moved before the
                 news (taken as the news's direction, since no sentiment label exists) and
                 then reversed or stalled.
    2. 趋势延续  |z_p| >= follow_z, every stored post window >= p has the sign of r_p, and
                 |z_L| >= follow_z: the reaction persists to the longest window.
    3. 反应消退  |z_p| >= follow_z but not a continuation: a significant reaction at p that
                 a later window contradicts or that has faded (|z_L| < follow_z) by L.
    4. 观望信号  otherwise, i.e. |z_p| < follow_z: no significant reaction at the primary
                 window (whatever the noise in the shorter windows).
    重要性与波动 (a separate question type): ratio = |r_p| / median |r_p| of the estimation
                 events; >= 1.5 高于常态, <= 2/3 低于常态, else 接近常态.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

POSITIVE, NEGATIVE, NEUTRAL = "利好", "利空", "中性"
EXPECTATION_REALIZED = "预期兑现"
WAIT_AND_SEE = "观望信号"
CONTINUATION = "趋势延续"
FADING = "反应消退"
MARKET_CASES = (EXPECTATION_REALIZED, WAIT_AND_SEE, CONTINUATION, FADING)  # what label_market_case returns
IMPORTANCE = "重要性与波动"
ABOVE_NORMAL, NORMAL, BELOW_NORMAL = "高于常态", "接近常态", "低于常态"
RELATIONS = (ABOVE_NORMAL, NORMAL, BELOW_NORMAL)  # what importance_relation returns
# How a market-analysis answer opens, before its label (the builder writes it; choice scoring
# puts each option after it, where a trained model states its label).
CASE_ANSWER_PREFIX = "案例类型："
IMPORTANCE_ANSWER_PREFIX = f"{CASE_ANSWER_PREFIX}{IMPORTANCE}\n结论："


@dataclass(frozen=True)
class LabelRules:
    primary_window: int = 15
    threshold_k: float = 0.5
    # Floor so that a very quiet series does not turn noise into 利好/利空 (0.01%).
    min_threshold: float = 0.0001
    pre_move_z: float = 1.0
    follow_z: float = 0.5
    importance_high_ratio: float = 1.5
    importance_low_ratio: float = 2.0 / 3.0
    # Fewer estimation returns than this for a (ticker, window): sigma is not trusted and
    # that window is left unlabelled rather than labelled against a noisy scale.
    min_estimation_samples: int = 20
    # A 利好/利空 at the primary window must keep its sign at the adjacent stored windows
    # (10 and 30 around 15), else it is 中性: measured on CLS + gold 2026-05..07, a 15-minute
    # direction that does not hold at 10 and 30 agrees with the 120-minute sign only 49% of the
    # time (a coin flip), one that holds 73% (docs/dataset.md, "Labels").
    hold_adjacent: bool = True

    def describe(self) -> dict[str, object]:
        return {
            "direction": f"利好 if r > t, 利空 if r < -t, else 中性; r at the primary window "
            f"({self.primary_window} min); t = max({self.min_threshold}, {self.threshold_k} x sigma(ticker, window))",
            "sigma": "1.4826 x median absolute deviation of the training-split events' returns per ticker and window",
            "magnitude": "|r|/sigma < 1 较小, < 2 中等, else 较大",
            "z": "z = r_p / sigma(ticker, p): the move in units of the ticker's typical move at that window; "
            f"neutral band |z| <= {self.threshold_k}",
            "hold_adjacent": ("a 利好/利空 must keep its sign at the stored windows adjacent to the primary one, else 中性"
                              if self.hold_adjacent else "off: the primary window alone decides"),
            "cases": {
                EXPECTATION_REALIZED: f"|z_pre| >= {self.pre_move_z} and no same-sign |z_p| >= {self.follow_z}",
                CONTINUATION: f"|z_p| >= {self.follow_z}, all post windows >= p share its sign, |z_longest| >= {self.follow_z}",
                FADING: f"|z_p| >= {self.follow_z} but not a continuation (a later window turns, or |z_longest| < {self.follow_z})",
                WAIT_AND_SEE: f"otherwise: |z_p| < {self.follow_z} (no significant reaction at the primary window)",
                IMPORTANCE: f"|r_p| / median|r_p| >= {self.importance_high_ratio:.2f} {ABOVE_NORMAL}, "
                f"<= {self.importance_low_ratio:.2f} {BELOW_NORMAL}, else {NORMAL}",
            },
            "primary_window": self.primary_window,
            "threshold_k": self.threshold_k,
            "min_threshold": self.min_threshold,
            "pre_move_z": self.pre_move_z,
            "follow_z": self.follow_z,
        }


def robust_sigma(values: Iterable[float]) -> float:
    """1.4826 x median absolute deviation: the standard deviation of a normal sample, robustly."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(arr - np.median(arr))))


def volatility_table(
    impacts: Mapping[str, Mapping[tuple[str, int], float | None]],
    event_ids: Iterable[str],
    rules: LabelRules = LabelRules(),
) -> dict[tuple[str, int], float]:
    """sigma per (ticker, window) over the given events; pairs with too few returns are left out."""
    collected: dict[tuple[str, int], list[float]] = {}
    for event_id in event_ids:
        for key, ret in impacts.get(event_id, {}).items():
            if ret is not None and math.isfinite(ret):
                collected.setdefault(key, []).append(ret)
    return {
        key: robust_sigma(values)
        for key, values in sorted(collected.items())
        if len(values) >= rules.min_estimation_samples
    }


def threshold_for(sigma: float, rules: LabelRules = LabelRules()) -> float:
    return max(rules.min_threshold, rules.threshold_k * sigma)


def direction(ret: float, threshold: float) -> str:
    if ret > threshold:
        return POSITIVE
    if ret < -threshold:
        return NEGATIVE
    return NEUTRAL


def magnitude(ret: float, sigma: float) -> str:
    ratio = abs(ret) / sigma if sigma > 0 else math.inf
    if ratio < 1:
        return "较小"
    return "中等" if ratio < 2 else "较大"


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def market_case(
    returns: Mapping[int, float], sigmas: Mapping[int, float], rules: LabelRules = LabelRules()
) -> str | None:
    """The case of one ticker's reaction (see module doc), or None if the primary window is missing.

    `returns` and `sigmas` map window_min -> value for one ticker; windows missing from
    `sigmas` are ignored.
    """
    p = rules.primary_window
    z = {w: r / sigmas[w] for w, r in returns.items() if r is not None and sigmas.get(w, 0) > 0}
    if p not in z:
        return None
    pre_windows = sorted(w for w in z if w < 0)
    post_windows = sorted(w for w in z if w > 0)
    z_p = z[p]
    if pre_windows:
        z_pre = z[pre_windows[0]]
        follow_through = _sign(z_p) == _sign(z_pre) and abs(z_p) >= rules.follow_z
        if abs(z_pre) >= rules.pre_move_z and not follow_through:
            return EXPECTATION_REALIZED
    longest = post_windows[-1]
    later = [w for w in post_windows if w >= p]
    if (
        abs(z_p) >= rules.follow_z
        and all(_sign(z[w]) == _sign(z_p) for w in later)
        and abs(z[longest]) >= rules.follow_z
    ):
        return CONTINUATION
    if abs(z_p) >= rules.follow_z:
        return FADING
    return WAIT_AND_SEE


def importance_relation(abs_primary_ret: float, typical_abs_ret: float, rules: LabelRules = LabelRules()) -> str:
    """How an event's primary-window move compares with the typical (median) move."""
    if typical_abs_ret <= 0:
        return ABOVE_NORMAL if abs_primary_ret > 0 else NORMAL
    ratio = abs_primary_ret / typical_abs_ret
    if ratio >= rules.importance_high_ratio:
        return ABOVE_NORMAL
    if ratio <= rules.importance_low_ratio:
        return BELOW_NORMAL
    return NORMAL
