"""Metric functions against hand-computed cases; McNemar on known tables (tests/core/test_statistics.py
compares every statistic with scipy, scikit-learn and statsmodels on random inputs)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from finqlora.core import statistics as S
from finqlora.evaluate import metrics as M


def test_accuracy_counts_unparsed_as_wrong() -> None:
    assert M.accuracy(["利好", "利空", "中性", "利好"], ["利好", None, "中性", "利空"]) == 0.5
    with pytest.raises(ValueError):
        M.accuracy(["a"], [])


def test_macro_f1_hand_computed() -> None:
    y_true = ["A", "A", "A", "B", "B", "C"]
    y_pred = ["A", "A", "B", "B", None, "A"]
    # A: tp 2, predicted 3, support 3 -> P 2/3, R 2/3, F1 2/3
    # B: tp 1, predicted 2, support 2 -> P 1/2, R 1/2, F1 1/2
    # C: tp 0 -> F1 0 (precision 0 when never predicted)
    scores = M.per_class_f1(y_true, y_pred, ["A", "B", "C"])
    assert scores["A"]["f1"] == pytest.approx(2 / 3)
    assert scores["B"]["f1"] == pytest.approx(1 / 2)
    assert scores["C"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert M.macro_f1(y_true, y_pred, ["A", "B", "C"]) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_mcc_matches_scikit_learn_on_random_data() -> None:
    from sklearn.metrics import matthews_corrcoef

    rng = np.random.default_rng(7)
    classes = np.array(["利好", "利空", "中性"], dtype=object)
    for trial in range(40):
        n = int(rng.integers(1, 60))
        k = int(rng.integers(1, 4))  # one to three classes, so constant references and predictions occur
        y_true = list(rng.choice(classes[:k], size=n))
        # predictions: correlated with the truth in some trials, with unparsed answers mixed in
        agree = rng.random(n) < rng.random()
        y_pred = [t if a else rng.choice(classes) for t, a in zip(y_true, agree)]
        y_pred = [None if rng.random() < 0.1 else p for p in y_pred]
        expected = matthews_corrcoef([str(t) for t in y_true], [str(p) for p in y_pred])
        assert M.mcc(y_true, y_pred) == pytest.approx(expected, abs=1e-12), trial
    assert M.mcc(["a", "b"], ["a", "b"]) == 1.0 and M.mcc(["a", "b"], ["b", "a"]) == -1.0
    assert M.mcc(["a", "b", "a"], ["a", "a", "a"]) == 0.0  # a constant guess
    assert math.isnan(M.mcc([], []))


def test_confusion_matrix_has_unparsed_column() -> None:
    cm = M.confusion_matrix(["A", "A", "B"], ["A", None, "A"], ["A", "B"])
    assert cm["columns"] == ["A", "B", M.UNPARSED]
    assert cm["matrix"] == [[1, 0, 1], [1, 0, 0]]


def test_baselines() -> None:
    y_true = ["利好"] * 5 + ["利空"] * 3 + ["中性"] * 2
    labels = ["利好", "利空", "中性"]
    majority = M.majority_baseline(y_true, labels)
    assert majority["class"] == "利好" and majority["accuracy"] == 0.5
    # F1 of the majority class: P 0.5, R 1 -> 2/3; the others 0.
    assert majority["macro_f1"] == pytest.approx((2 / 3) / 3)
    assert majority["mcc"] == 0.0
    from_train = M.majority_baseline(y_true, labels, train_labels=["利空"] * 4 + ["利好"])
    assert from_train["class"] == "利空" and from_train["accuracy"] == pytest.approx(0.3) and from_train["from"] == "train"
    random_ = M.random_baseline(y_true, labels)
    assert random_["accuracy"] == pytest.approx(1 / 3)
    # expected F1 per class = 2 p / (3 p + 1)
    expected = np.mean([2 * p / (3 * p + 1) for p in (0.5, 0.3, 0.2)])
    assert random_["macro_f1"] == pytest.approx(expected)


def test_numeric_correct_uses_absolute_tolerance() -> None:
    assert M.numeric_correct(12.34, 12.345, 0.01)
    assert M.numeric_correct(12.35, 12.34, 0.01)  # exactly at the tolerance
    assert not M.numeric_correct(12.36, 12.34, 0.01)
    assert not M.numeric_correct(None, 1.0, 0.01)
    assert not M.numeric_correct(float("nan"), 1.0, 0.01)


def test_tokenization_is_character_level_for_chinese() -> None:
    assert M.overlap_tokens("黄金ETF上涨1.5%，gold rose") == ["黄", "金", "ETF", "上", "涨", "1.5", "%", "，", "gold", "rose"]


def test_rouge_l_hand_computed() -> None:
    # LCS of 黄金价格上涨 (6) and 黄金价格大幅上涨 (8) is 6: P = 1, R = 6/8, F1 = 2*0.75/1.75
    assert M.rouge_l("黄金价格上涨", "黄金价格大幅上涨") == pytest.approx(2 * 0.75 / 1.75)
    assert M.rouge_l("利好", "利好") == 1.0
    assert M.rouge_l("", "利好") == 0.0
    assert M.rouge_l("abc", "利好") == 0.0


def test_bleu_hand_computed() -> None:
    # 1-gram 5/6, 2-gram 3/5, 3-gram 2/4, 4-gram 1/3, equal lengths (no brevity penalty)
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert M.corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected)
    assert M.corpus_bleu(["利好黄金"], ["利好黄金"]) == pytest.approx(100.0)


def test_bleu_brevity_penalty_and_smoothing() -> None:
    # Candidate 4 tokens, reference 8: all n-grams match; BP = exp(1 - 8/4).
    assert M.corpus_bleu(["黄金上涨"], ["黄金上涨美元下跌"]) == pytest.approx(100 * math.exp(1 - 2))
    # No 3- or 4-gram match: sacreBLEU "exp" smoothing gives the k-th empty order 1 / (2^k * total).
    stats = M.bleu_statistics(["黄金大涨了"], ["黄金上涨吗"])
    assert list(stats[0]) == [5, 5, 3, 1, 0, 0, 5, 4, 3, 2]  # lengths, matches 1-4, totals 1-4
    expected = 100 * (3 / 5 * 1 / 4 * 1 / (2 * 3) * 1 / (4 * 2)) ** 0.25
    assert M.bleu_from_statistics(stats) == pytest.approx(expected)
    assert "tok:zh" in M.bleu_signature() and "smooth:exp" in M.bleu_signature()


def test_corpus_bleu_pools_statistics() -> None:
    stats = M.bleu_statistics(["the cat sat on the mat", "利好黄金"], ["the cat sat on a mat", "利好黄金"])
    pooled = (5 + 4) / (6 + 4) * (3 + 3) / (5 + 3) * (2 + 2) / (4 + 2) * (1 + 1) / (3 + 1)
    assert M.bleu_from_statistics(stats) == pytest.approx(100 * pooled**0.25)
    assert M.bleu_from_statistics(stats[[0]]) == pytest.approx(M.corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]))


def test_perplexity() -> None:
    assert M.perplexity([2.0, 4.0], [2, 2]) == pytest.approx(math.exp(1.5))
    assert math.isnan(M.perplexity([], []))


def test_bootstrap_ci() -> None:
    constant = np.ones(50)
    interval = S.bootstrap_ci(lambda idx: float(constant[idx].mean()), 50)
    assert (interval.low, interval.high) == (1.0, 1.0)
    values = np.array([1.0] * 30 + [0.0] * 30)
    small = S.bootstrap_ci(lambda idx: float(values[idx].mean()), 60, seed=1)
    assert small.low < 0.5 < small.high
    # the normal approximation of the 95% interval half-width is 1.96 * sqrt(0.25 / 60) ~= 0.126
    assert (small.high - small.low) / 2 == pytest.approx(0.126, abs=0.03)
    big_values = np.array([1.0] * 600 + [0.0] * 600)
    big = S.bootstrap_ci(lambda idx: float(big_values[idx].mean()), 1200, seed=1)
    assert big.high - big.low < (small.high - small.low) / 3


@pytest.mark.parametrize(
    ("b", "c", "p_exact", "chi2", "p_corrected"),
    [
        # Wikipedia "McNemar's test" example: b = 6, c = 16 -> chi2_cc = 81/22, exact p = 110056 * 2 / 2^22
        (6, 16, 2 * 110056 / 2**22, 81 / 22, 0.05500883),
        # 1 vs 9: exact p = 2 * (1 + 10) / 2^10; chi2_cc = (8 - 1)^2 / 10
        (1, 9, 22 / 1024, 4.9, 0.02685670),
        (5, 5, 1.0, 0.1, 0.75183),
        (0, 0, 1.0, 0.0, 1.0),
    ],
)
def test_mcnemar_known_tables(b: int, c: int, p_exact: float, chi2: float, p_corrected: float) -> None:
    result = M.mcnemar(b, c)
    assert result.p_exact == pytest.approx(p_exact)
    assert result.chi2_corrected == pytest.approx(chi2)
    assert result.p_corrected == pytest.approx(p_corrected, rel=1e-4)


def test_mcnemar_paired_counts_discordant_pairs() -> None:
    base = [True, True, False, False, False, True]
    tuned = [True, False, True, True, False, True]
    result = M.mcnemar_paired(base, tuned)
    assert (result.both_correct, result.base_only, result.finetuned_only, result.both_wrong) == (2, 1, 2, 1)
    assert result.p_exact == pytest.approx(1.0)


@pytest.mark.slow
def test_token_nll_matches_the_models_own_loss(tiny_model_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["黄金价格今天上涨。", "The library opens at nine in the morning on Saturdays."]
    scored = M.text_nll(model, tokenizer, texts, batch_size=2)
    for text, (nll, count) in zip(texts, scored):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()  # mean over len - 1 tokens
        assert count == ids.shape[1] - 1
        assert nll / count == pytest.approx(loss, rel=1e-4)
    # Answer-only scoring counts exactly the answer tokens + end-of-turn marker.
    from finqlora.core.chat_format import encode_for_training

    record = {"instruction": "判断方向", "input": "美联储降息", "output": "方向：利好"}
    (nll, count), = M.answer_nll(model, tokenizer, [record])
    assert count == encode_for_training(tokenizer, record, 1024).answer_tokens
    assert nll > 0
