"""The project's one bootstrap, and the confusion-matrix statistics it resamples.

Every interval and bootstrap p-value of the project comes from here: the evaluation's metric
rows (`evaluate/scoring.py`), the suite's average over sets (`evaluate/suite.py`) and the
dataset's label-predictability check (`dataset/predictability.py`, which sits below
`evaluate/`, hence `core/`).

* Resamples: `resample_indices` draws every resample of item indices at once,
  `numpy.random.default_rng(seed).integers(0, n, size=(resamples, n))`: the draws of
  `scipy.stats.bootstrap(..., rng=default_rng(seed))`, so its percentile interval of the same
  statistic is the same (tests/core/test_statistics.py checks it). scipy's function is not called
  itself because it has no stratified resampling (the suite resamples within every set) and
  no paired p-value, and the evaluation needs both from one set of draws.
* Interval: the percentile interval (linear interpolation, as numpy and scipy); resamples whose
  statistic is undefined (NaN) are left out.
* Paired comparison: the base and fine-tuned statistics are computed on the same resamples; the
  difference's interval and its two-sided p-value, 2 x the smaller share of differences on
  either side of 0, come from those same differences.
* Classification statistics on resamples: scikit-learn's `f1_score` and `matthews_corrcoef` cost
  about 2.5 ms a call on 600 items (input checks; measured 2026-12-07 on the 2-core dev
  machine), 10-25x a bincount-based statistic, and a bootstrap calls them thousands of times. A resample's confusion matrix is one `bincount` instead, and macro-F1 and
  MCC follow from it with the formulas scikit-learn documents; tests/core/test_statistics.py checks
  both against scikit-learn (with `sample_weight` = how often each item was drawn).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    level: float = 0.95


# ---------------------------------------------------------------------------------------------
# The bootstrap


def resample_indices(n_items: int, n_resamples: int, seed: int, strata: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Item indices of every resample, one row each (`n_resamples` x `n_items`).

    With `strata` (index arrays that partition the items, e.g. the sets of a suite), each row
    draws within every stratum in turn, so each keeps its size. No items: no resamples.
    """
    if n_items == 0:
        return np.zeros((0, 0), dtype=np.int64)
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.integers(0, n_items, size=(n_resamples, n_items))
    return np.array([np.concatenate([stratum[rng.integers(0, len(stratum), size=len(stratum))] for stratum in strata])
                     for _ in range(n_resamples)], dtype=np.int64)


def bootstrap_distribution(statistic: Callable[[np.ndarray], float], resamples: np.ndarray) -> np.ndarray:
    """`statistic(indices)` of each resample (row of `resample_indices`)."""
    return np.array([statistic(indices) for indices in resamples], dtype=float)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> Interval:
    """Percentile interval of a bootstrap distribution; NaN values (undefined resamples) left out."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return Interval(float("nan"), float("nan"), level)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(float(low), float(high), level)


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n_items: int, *, n_resamples: int = 1000, level: float = 0.95,
                 seed: int = 0, strata: Sequence[np.ndarray] | None = None) -> Interval:
    """Percentile bootstrap interval of `statistic(indices)` over resampled items."""
    return percentile_interval(bootstrap_distribution(statistic, resample_indices(n_items, n_resamples, seed, strata)), level)


def bootstrap_p(differences: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a difference being 0: 2 x min(P(d <= 0), P(d >= 0)), at most 1."""
    differences = np.asarray(differences, dtype=float)
    differences = differences[~np.isnan(differences)]
    if differences.size == 0:
        return float("nan")
    return float(min(1.0, 2 * min((differences <= 0).mean(), (differences >= 0).mean())))


@dataclass(frozen=True)
class PairedBootstrap:
    """Intervals of two statistics and of their difference (second - first) on the same resamples."""

    first: Interval
    second: Interval
    difference: Interval
    p_value: float  # two-sided bootstrap p of the difference


def paired_bootstrap(first: Callable[[np.ndarray], float], second: Callable[[np.ndarray], float], n_items: int, *,
                     n_resamples: int = 1000, level: float = 0.95, seed: int = 0, strata: Sequence[np.ndarray] | None = None) -> PairedBootstrap:
    """Both statistics on the same resamples of the items (the base and the fine-tuned model answer
    the same questions), so the difference's spread leaves out what the items share."""
    resamples = resample_indices(n_items, n_resamples, seed, strata)
    first_values, second_values = bootstrap_distribution(first, resamples), bootstrap_distribution(second, resamples)
    differences = second_values - first_values
    return PairedBootstrap(percentile_interval(first_values, level), percentile_interval(second_values, level),
                           percentile_interval(differences, level), bootstrap_p(differences))


# ---------------------------------------------------------------------------------------------
# Classification from confusion matrices


def class_codes(y_true: Sequence[Any], y_pred: Sequence[Any], labels: Sequence[Any] = ()) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer codes of the reference and predicted classes, and the number of codes.

    `labels` get codes 0, 1, ... in their order; any other value (e.g. `None`, an unparsed
    answer) gets the next free code in order of appearance, a class of its own.
    """
    codes: dict[Any, int] = {}
    for value in [*labels, *y_true, *y_pred]:
        codes.setdefault(value, len(codes))
    encode = lambda values: np.fromiter((codes[v] for v in values), dtype=np.int64, count=len(values))  # noqa: E731
    return encode(y_true), encode(y_pred), len(codes)


def confusion_counts(true_codes: np.ndarray, pred_codes: np.ndarray, n_codes: int, indices: np.ndarray) -> np.ndarray:
    """Confusion matrix (rows = reference, columns = prediction) of the items `indices` picks
    (an item drawn twice counts twice)."""
    cells = true_codes[indices] * n_codes + pred_codes[indices]
    return np.bincount(cells, minlength=n_codes * n_codes).reshape(n_codes, n_codes)


def macro_f1_from_confusion(confusion: np.ndarray, n_labels: int) -> np.ndarray | float:
    """Macro-F1 over the first `n_labels` classes, F1 = 2 tp / (2 tp + fp + fn) and 0 where that
    is 0 / 0 (scikit-learn's `f1_score(average="macro", zero_division=0)`); NaN with no items.
    Works on one matrix or a stack of them."""
    confusion = np.asarray(confusion, dtype=float)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)[..., :n_labels]
    support, predicted = confusion.sum(axis=-1)[..., :n_labels], confusion.sum(axis=-2)[..., :n_labels]
    denominator = support + predicted
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return _nan_where_empty(f1.mean(axis=-1), confusion)


def mcc_from_confusion(confusion: np.ndarray) -> np.ndarray | float:
    """Multiclass Matthews correlation (Gorodkin's R_K, scikit-learn's `matthews_corrcoef`):
    with t / p the row / column sums, c the trace and s the total,
    (c s - t.p) / sqrt((s^2 - p.p) (s^2 - t.t)); 0 when either side is constant, NaN with no
    items. Works on one matrix or a stack of them."""
    confusion = np.asarray(confusion, dtype=float)
    t, p = confusion.sum(axis=-1), confusion.sum(axis=-2)
    c, s = np.trace(confusion, axis1=-2, axis2=-1), confusion.sum(axis=(-2, -1))
    denominator = np.sqrt((s * s - np.sum(p * p, axis=-1)) * (s * s - np.sum(t * t, axis=-1)))
    numerator = c * s - np.sum(t * p, axis=-1)
    mcc = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
    return _nan_where_empty(mcc, confusion)


def _nan_where_empty(values: np.ndarray, confusion: np.ndarray) -> np.ndarray | float:
    values = np.where(confusion.sum(axis=(-2, -1)) > 0, values, np.nan)
    return float(values) if values.ndim == 0 else values
