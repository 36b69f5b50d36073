"""The label-predictability check of `finqlora build` on data with and without planted signal,
and its verdict in a real build's stats and dataset card."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from finqlora.dataset import predictability

WORDS = ["央行", "宣布", "市场", "美元", "黄金", "价格", "数据", "公布", "投资者", "关注", "政策", "会议", "今日", "指数", "报道"]
CUES = {"利好": "降息", "利空": "加息", "中性": "维持"}


def _news(rng: random.Random, n: int, *, planted: bool) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for _ in range(n):
        label = rng.choices(["利好", "利空", "中性"], weights=[0.4, 0.35, 0.25])[0]
        words = rng.choices(WORDS, k=12)
        if planted and rng.random() < 0.7:  # 70% of the news name the cue of their label
            words.insert(rng.randrange(len(words)), CUES[label])
        elif not planted and rng.random() < 0.7:  # the same cue words, unrelated to the label
            words.insert(rng.randrange(len(words)), rng.choice(list(CUES.values())))
        texts.append("".join(words))
        labels.append(label)
    return texts, labels


def test_planted_signal_is_found() -> None:
    rng = random.Random(0)
    train, val, test = _news(rng, 400, planted=True), _news(rng, 200, planted=True), _news(rng, 100, planted=True)
    result = predictability.check(*train, *val, *test, resamples=200)  # fewer resamples: a quick test
    assert result["verdict"] == "learnable signal beyond the majority"
    scores = result["val"]
    assert scores["accuracy"] > scores["majority_accuracy"] + 0.2 and scores["mcc"] > 0.4
    assert scores["binomial_p"] < 1e-6 and scores["permutation_p"] < 0.01
    assert 0.3 < scores["mcc_ci"][0] < scores["mcc"] < scores["mcc_ci"][1] and result["test"]["n"] == 100 and result["test"]["mcc"] > 0.3
    card = "\n".join(predictability.card_lines({**result, "news_share": 0.6}))
    assert "Verdict: learnable signal" in card and "lower news share" not in card and "test (latest)" in card


def test_labels_without_signal_are_called_so() -> None:
    rng = random.Random(1)
    train, val = _news(rng, 400, planted=False), _news(rng, 200, planted=False)
    result = predictability.check(*train, *val, resamples=200)
    assert result["verdict"] == "no learnable signal beyond the majority" and "test" not in result
    scores = result["val"]
    assert scores["binomial_p"] >= predictability.ALPHA or scores["permutation_p"] >= predictability.ALPHA
    assert abs(scores["mcc"]) < 0.2 and scores["mcc_ci"][0] < 0 < scores["mcc_ci"][1]
    card = "\n".join(predictability.card_lines({**result, "news_share": 0.6}))
    assert "Verdict: no learnable signal" in card and "lower news share" in card and "60%" in card


def test_too_few_events_are_not_tested() -> None:
    result = predictability.check(["涨"] * 10, ["利好"] * 5 + ["利空"] * 5, ["跌"] * 10, ["利空"] * 10)
    assert result["verdict"] == "not tested" and "Not tested" in "\n".join(predictability.card_lines(result))


def test_build_runs_the_check_and_writes_the_card(tmp_path: Path) -> None:
    """The synthetic sample store: the check runs on its train and later validation events."""
    from finqlora.dataset.build_config import BuildConfig
    from finqlora.dataset.builder import build_dataset
    from finqlora.store.sample_db import build_sample_db

    db = build_sample_db(tmp_path / "sample.db", seed=0)
    result = build_dataset(BuildConfig(output=tmp_path / "data.jsonl", db=db, num_samples=60, progress=False))
    check = result.stats["predictability"]
    assert check["news_share"] == pytest.approx(0.6) and check["n_train"] > check["n_val"] > 0
    assert check["verdict"] in ("learnable signal beyond the majority", "no learnable signal beyond the majority", "not tested")
    assert "## Do the direction labels carry learnable signal?" in result.card.read_text(encoding="utf-8")
