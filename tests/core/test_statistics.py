"""Every statistic of the project against the field's libraries, on seeded random inputs and edge cases.

The bootstrap (`finqlora.core.statistics`) against scipy.stats.bootstrap; the resampled macro-F1
and MCC against scikit-learn with `sample_weight`; McNemar, the kappas, Wilson intervals and the
one-sided binomial test against statsmodels (a test-only dependency: the independent reference).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import f1_score, matthews_corrcoef

from finqlora.core import statistics as S
from finqlora.dataset import predictability
from finqlora.evaluate import metrics as M
from finqlora.evaluate.human_eval import LOSS, TIE, WIN, cohen_kappa, fleiss_kappa
from finqlora.evaluate.ratings import wilson_interval
from finqlora.evaluate.scoring import _classification_block, _Scorer
from finqlora.report.report import binomial_greater_p

statsmodels = pytest.importorskip("statsmodels", reason="statsmodels (the `test` extra) is the reference for these tests")

CLASSES = np.array(["利好", "利空", "中性"], dtype=object)


def _random_classification(rng: np.random.Generator, n: int) -> tuple[list[str], list[str | None]]:
    """References from one to three classes (constant ones occur), predictions that agree with a
    random share of them, and some unparsed answers (None)."""
    k = int(rng.integers(1, 4))
    y_true = list(rng.choice(CLASSES[:k], size=n))
    agree = rng.random(n) < rng.random()
    y_pred = [t if a else rng.choice(CLASSES) for t, a in zip(y_true, agree)]
    return y_true, [None if rng.random() < 0.1 else p for p in y_pred]


# ---------------------------------------------------------------------------------------------
# The bootstrap


@pytest.mark.parametrize("seed", range(6))
def test_bootstrap_interval_is_scipys_percentile_interval(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 300))
    values = rng.integers(0, 2, size=n).astype(float) if seed % 2 else rng.normal(size=n)  # ties, then none
    level = [0.9, 0.95, 0.99][seed % 3]
    for name, fn in (("mean", np.mean), ("median", np.median)):
        ours = S.bootstrap_ci(lambda idx: float(fn(values[idx])), n, n_resamples=500, level=level, seed=seed)
        theirs = scipy_stats.bootstrap((values,), fn, n_resamples=500, confidence_level=level, method="percentile",
                                       vectorized=False, rng=np.random.default_rng(seed)).confidence_interval
        assert (ours.low, ours.high) == pytest.approx((theirs.low, theirs.high), abs=1e-12), name


@pytest.mark.parametrize("seed", range(4))
def test_paired_bootstrap_matches_scipys_paired_bootstrap(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    n = int(rng.integers(5, 200))
    base = (rng.random(n) < 0.5).astype(float)
    tuned = np.where(rng.random(n) < 0.7, base, 1 - base)  # correlated with base, as two models on the same items
    paired = S.paired_bootstrap(lambda i: float(base[i].mean()), lambda i: float(tuned[i].mean()), n, n_resamples=400, seed=seed)
    result = scipy_stats.bootstrap((base, tuned), lambda b, t: np.mean(t) - np.mean(b), paired=True, vectorized=False,
                                   n_resamples=400, method="percentile", rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    assert (paired.difference.low, paired.difference.high) == pytest.approx((interval.low, interval.high), abs=1e-12)
    differences = result.bootstrap_distribution
    assert paired.p_value == pytest.approx(min(1.0, 2 * min(np.mean(differences <= 0), np.mean(differences >= 0))))
    alone = S.bootstrap_ci(lambda i: float(base[i].mean()), n, n_resamples=400, seed=seed)
    assert paired.first == alone  # each model's interval is its own bootstrap's, same draws


def test_bootstrap_edge_cases() -> None:
    empty = S.paired_bootstrap(lambda i: 0.0, lambda i: 1.0, 0, n_resamples=50)
    assert all(math.isnan(x) for x in (empty.first.low, empty.second.high, empty.difference.low, empty.p_value))
    constant = np.ones(40)
    assert S.bootstrap_ci(lambda idx: float(constant[idx].mean()), 40) == S.Interval(1.0, 1.0, 0.95)
    # resamples whose statistic is undefined are left out: only draws that include item 0 count
    values = np.arange(5, dtype=float)
    defined = S.bootstrap_ci(lambda idx: float(values[idx].mean()) if 0 in idx else float("nan"), 5, n_resamples=300)
    assert not math.isnan(defined.low)
    assert math.isnan(S.bootstrap_ci(lambda idx: float("nan"), 5, n_resamples=20).low)
    assert S.bootstrap_p(np.zeros(10)) == 1.0 and S.bootstrap_p(np.ones(10)) == 0.0 and math.isnan(S.bootstrap_p(np.array([])))


def test_stratified_resamples_keep_every_stratum_size_and_stay_inside_it() -> None:
    strata = [np.arange(0, 3), np.arange(3, 10)]
    draws = S.resample_indices(10, 200, seed=0, strata=strata)
    assert draws.shape == (200, 10)
    assert ((draws[:, :3] < 3).all() and (draws[:, 3:] >= 3).all())
    assert set(draws[:, 3:].ravel()) == set(range(3, 10))  # every item of a stratum is drawn somewhere


# ---------------------------------------------------------------------------------------------
# Classification statistics on resamples


def test_resampled_macro_f1_and_mcc_match_scikit_learn_with_sample_weights() -> None:
    rng = np.random.default_rng(7)
    for trial in range(60):
        n = int(rng.integers(1, 80))
        y_true, y_pred = _random_classification(rng, n)
        labels = [c for c in CLASSES if c in y_true or c in y_pred]
        true_codes, pred_codes, n_codes = S.class_codes(y_true, y_pred, labels)
        draw = S.resample_indices(n, 1, seed=trial)[0]
        weights = np.bincount(draw, minlength=n)  # how often the resample drew each item
        confusion = S.confusion_counts(true_codes, pred_codes, n_codes, draw)
        as_text = [str(p) for p in y_pred]
        expected_f1 = f1_score(y_true, as_text, labels=labels, average="macro", zero_division=0, sample_weight=weights)
        assert S.macro_f1_from_confusion(confusion, len(labels)) == pytest.approx(expected_f1, abs=1e-12), trial
        assert S.mcc_from_confusion(confusion) == pytest.approx(matthews_corrcoef(y_true, as_text, sample_weight=weights), abs=1e-12), trial
        stacked = np.stack([confusion, S.confusion_counts(true_codes, pred_codes, n_codes, np.arange(n))])
        assert S.mcc_from_confusion(stacked)[1] == pytest.approx(M.mcc(y_true, y_pred), abs=1e-12)
    empty = np.zeros((3, 3))
    assert math.isnan(S.mcc_from_confusion(empty)) and math.isnan(S.macro_f1_from_confusion(empty, 3))


def test_per_class_scores_are_scikit_learns_with_unparsed_answers_as_a_class() -> None:
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(3)
    for _ in range(20):
        y_true, y_pred = _random_classification(rng, int(rng.integers(1, 50)))
        labels = list(CLASSES)
        precision, recall, f1, support = precision_recall_fscore_support(y_true, [str(p) for p in y_pred], labels=labels, zero_division=0)
        scores = M.per_class_f1(y_true, y_pred, labels)
        assert [scores[c]["f1"] for c in labels] == pytest.approx(list(f1))
        assert [scores[c]["precision"] for c in labels] == pytest.approx(list(precision))
        assert [scores[c]["support"] for c in labels] == list(support)
    assert M.per_class_f1([], [], []) == {} and math.isnan(M.macro_f1([], []))


@pytest.mark.filterwarnings("ignore:A single label:UserWarning")  # scikit-learn on a resample of one class
def test_metric_rows_intervals_equal_scikit_learn_on_every_resample() -> None:
    """The evaluation's fast resampled F1 / MCC give the intervals scikit-learn would, draw for draw."""
    rng = np.random.default_rng(11)
    n, resamples, seed = 60, 150, 4
    y_true, base = _random_classification(rng, n)
    tuned = [t if rng.random() < 0.6 else p for t, p in zip(y_true, base)]
    preds = {"base": base, "finetuned": tuned}
    _, rows = _classification_block(_Scorer(resamples, seed), "t.", "T", y_true, preds, list(CLASSES), with_mcc=True)
    by_key = {row["key"]: row for row in rows}
    f1_labels = [c for c in CLASSES if c in y_true or c in base or c in tuned]
    text = {v: np.array([str(p) for p in preds[v]], dtype=object) for v in preds}
    truth = np.array(y_true, dtype=object)
    library = {
        "t.macro_f1": lambda v, i: f1_score(truth[i], text[v][i], labels=f1_labels, average="macro", zero_division=0),
        "t.mcc": lambda v, i: matthews_corrcoef(truth[i], text[v][i]),
    }
    for key, statistic in library.items():
        expected = S.paired_bootstrap(lambda i: statistic("base", i), lambda i: statistic("finetuned", i), n, n_resamples=resamples, seed=seed)
        row = by_key[key]
        assert row["base"] == pytest.approx(statistic("base", np.arange(n)), abs=1e-12)
        assert row["base_ci"] == pytest.approx([expected.first.low, expected.first.high], abs=1e-12), key
        assert row["delta_ci"] == pytest.approx([expected.difference.low, expected.difference.high], abs=1e-12), key
        assert row["p_value"] == pytest.approx(expected.p_value), key


def test_predictability_mcc_interval_is_scikit_learns_over_the_bootstraps_draws() -> None:
    rng = np.random.default_rng(5)
    truth = rng.choice(CLASSES, size=120)
    predicted = np.where(rng.random(120) < 0.4, truth, rng.choice(CLASSES, size=120)).astype(object)
    draws = S.resample_indices(120, 200, seed=9)
    expected = S.percentile_interval(np.array([matthews_corrcoef(truth[d], predicted[d]) for d in draws]))
    assert predictability._mcc_interval(truth, predicted, 9, 200) == pytest.approx((expected.low, expected.high), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Tests and agreement against statsmodels


def test_mcnemar_matches_statsmodels() -> None:
    from statsmodels.stats.contingency_tables import mcnemar

    rng = np.random.default_rng(1)
    tables = [(0, 0), (0, 1), (1, 0), (3, 3), (0, 25), (120, 95)] + [tuple(int(x) for x in rng.integers(0, 60, size=2)) for _ in range(40)]
    for b, c in tables:
        result = M.mcnemar(b, c, both_correct=7, both_wrong=4)
        if b + c == 0:
            assert (result.p_exact, result.p_corrected) == (1.0, 1.0)
            continue
        table = [[7, b], [c, 4]]
        exact, corrected = mcnemar(table, exact=True), mcnemar(table, exact=False, correction=True)
        assert result.p_exact == pytest.approx(exact.pvalue, rel=1e-9), (b, c)
        assert result.chi2_corrected == pytest.approx(corrected.statistic, rel=1e-12), (b, c)
        assert result.p_corrected == pytest.approx(corrected.pvalue, rel=1e-9), (b, c)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # statsmodels' z-value of a kappa without spread
def test_cohen_kappa_matches_statsmodels() -> None:
    from statsmodels.stats.inter_rater import cohens_kappa, to_table

    rng = np.random.default_rng(2)
    categories = np.array([WIN, TIE, LOSS])
    for _ in range(40):
        n = int(rng.integers(2, 60))
        first = list(rng.choice(categories[: int(rng.integers(1, 4))], size=n))
        second = [a if rng.random() < rng.random() else rng.choice(categories) for a in first]
        if len(set(first) | set(second)) == 1:
            continue  # kappa is 0 / 0: the convention below
        codes = {c: i for i, c in enumerate(categories)}
        table, _ = to_table(np.array([[codes[a], codes[b]] for a, b in zip(first, second)]), bins=np.arange(4) - 0.5)
        assert cohen_kappa(first, second) == pytest.approx(cohens_kappa(table).kappa, abs=1e-12)
    assert cohen_kappa([WIN, WIN], [WIN, WIN]) == 1.0 and math.isnan(cohen_kappa([], []))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # statsmodels' 0 / 0 where every rating agrees
def test_fleiss_kappa_matches_statsmodels() -> None:
    from statsmodels.stats.inter_rater import aggregate_raters
    from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss

    rng = np.random.default_rng(4)
    categories = [WIN, TIE, LOSS]
    for _ in range(40):
        items, raters = int(rng.integers(1, 30)), int(rng.integers(2, 7))
        truth = rng.choice(categories, size=items)
        ratings = [[t if rng.random() < 0.6 else str(rng.choice(categories)) for _ in range(raters)] for t in truth]
        counts, _ = aggregate_raters(np.array([[categories.index(r) for r in row] for row in ratings]), n_cat=3)
        expected = sm_fleiss(counts, method="fleiss")
        if math.isnan(expected):
            assert fleiss_kappa(ratings) == 1.0  # every rating the same category: statsmodels' 0 / 0
        else:
            assert fleiss_kappa(ratings) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(fleiss_kappa([]))
    with pytest.raises(ValueError):
        fleiss_kappa([[WIN, TIE], [WIN]])


def test_wilson_interval_matches_statsmodels() -> None:
    from statsmodels.stats.proportion import proportion_confint

    rng = np.random.default_rng(6)
    cases = [(0, 1), (1, 1), (0, 12), (12, 12), (5, 10)] + [(int(k), int(n)) for n in rng.integers(1, 500, size=30) for k in [rng.integers(0, n + 1)]]
    for successes, n in cases:
        expected = proportion_confint(successes, n, alpha=0.05, method="wilson")
        assert wilson_interval(successes, n) == pytest.approx(expected, abs=1e-9), (successes, n)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_one_sided_binomial_test_matches_statsmodels() -> None:
    from statsmodels.stats.proportion import binom_test

    rng = np.random.default_rng(8)
    for _ in range(40):
        n = int(rng.integers(1, 400))
        successes, p0 = int(rng.integers(0, n + 1)), float(rng.random())
        assert binomial_greater_p(successes, n, p0) == pytest.approx(binom_test(successes, n, p0, alternative="larger"), rel=1e-9)
    assert binomial_greater_p(0, 12, 0.5) == 1.0 and binomial_greater_p(3, 0, 0.5) == 1.0
    assert binomial_greater_p(5, 12, 0.0) == 0.0 and binomial_greater_p(5, 12, 1.0) == 1.0
