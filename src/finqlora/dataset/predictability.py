"""Do the news-direction labels carry signal a text classifier can learn?

`finqlora build` fits a plain text classifier on the train split's news and scores it on
the validation split, which lies later in time (the builder splits by time with an embargo).
Character n-grams (1-3) with TF-IDF, because Chinese has no spaces and word segmenters
disagree, then multinomial logistic regression (scikit-learn). The baseline is the majority
class of the train split, scored on the validation split.

Verdict: the labels carry learnable signal when the classifier's validation accuracy beats
the majority's in a one-sided exact binomial test (H0: accuracy <= the majority's rate) at
`ALPHA`, *and* its Matthews correlation beats a label-permutation null (the same test a
constant guess always fails). Otherwise the dataset card says so and suggests a lower news
share: news -> short-horizon direction stays near chance in published work too (FLARE /
FinBen: accuracy 0.45-0.57, MCC -0.05 to 0.10).

A check, not a model: the classifier is never saved or used to label anything.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

ALPHA = 0.05
PERMUTATIONS = 1000
MIN_PER_SPLIT = 30  # fewer labelled events in a split say nothing either way
MAX_EVENTS = 20000  # per split: the check stays a few seconds on a large store


def check(train_texts: Sequence[str], train_labels: Sequence[str], val_texts: Sequence[str], val_labels: Sequence[str],
          *, seed: int = 0) -> dict[str, Any]:
    """Fit on train, score on validation; the result dict goes into the dataset's stats and card."""
    result: dict[str, Any] = {"method": "TF-IDF character 1-3-grams + logistic regression (scikit-learn), fitted on train, scored on the later validation split",
                              "n_train": len(train_texts), "n_val": len(val_texts)}
    if len(train_texts) < MIN_PER_SPLIT or len(val_texts) < MIN_PER_SPLIT or len(set(train_labels)) < 2:
        result.update(verdict="not tested", reason=f"needs at least {MIN_PER_SPLIT} labelled events in train and validation and two classes in train")
        return result
    from scipy.stats import binomtest
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score, matthews_corrcoef

    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True, max_features=200_000)
    features = vectorizer.fit_transform(train_texts)
    classifier = LogisticRegression(max_iter=2000, random_state=seed).fit(features, list(train_labels))
    predicted = classifier.predict(vectorizer.transform(val_texts))
    truth = np.array(val_labels, dtype=object)
    majority_class = Counter(train_labels).most_common(1)[0][0]
    majority_rate = float(np.mean(truth == majority_class))
    correct = int(np.sum(predicted == truth))
    accuracy = correct / len(truth)
    mcc = float(matthews_corrcoef(truth, predicted))
    binomial_p = float(binomtest(correct, len(truth), majority_rate, alternative="greater").pvalue) if majority_rate < 1 else 1.0
    rng = np.random.default_rng(seed)
    # Shuffling the labels keeps both marginals, and with fixed marginals MCC rises and falls with
    # the number of agreements alone: counting agreements gives MCC's permutation p, much faster.
    null = np.array([np.sum(rng.permutation(truth) == predicted) for _ in range(PERMUTATIONS)])
    permutation_p = float((1 + np.sum(null >= correct)) / (1 + PERMUTATIONS))
    signal = binomial_p < ALPHA and permutation_p < ALPHA
    result.update(
        labels=dict(Counter(val_labels)), majority_class=majority_class, majority_accuracy=majority_rate,
        accuracy=accuracy, macro_f1=float(f1_score(truth, predicted, average="macro", zero_division=0)), mcc=mcc,
        binomial_p=binomial_p, permutation_p=permutation_p, permutations=PERMUTATIONS, alpha=ALPHA,
        predicted=dict(Counter(predicted.tolist())),
        verdict="learnable signal beyond the majority" if signal else "no learnable signal beyond the majority",
    )
    return result


def card_lines(result: dict[str, Any] | None) -> list[str]:
    """The dataset card's section on the check (`result` as `check` returns it, with the build's
    `news_share` added)."""
    if not result:
        return []
    lines = ["", "## Do the direction labels carry learnable signal?", "", f"{result['method']}."]
    if result["verdict"] == "not tested":
        return lines + ["", f"Not tested: {result['reason']} (train {result['n_train']}, validation {result['n_val']})."]
    lines += [
        "",
        "| | validation |",
        "|---|---:|",
        f"| events (train / validation) | {result['n_train']} / {result['n_val']} |",
        f"| classifier accuracy | {result['accuracy']:.1%} |",
        f"| majority class ({result['majority_class']}, from train) accuracy | {result['majority_accuracy']:.1%} |",
        f"| classifier macro-F1 | {result['macro_f1']:.3f} |",
        f"| classifier MCC | {result['mcc']:.3f} |",
        f"| binomial test, accuracy > majority (one-sided) | p = {result['binomial_p']:.3g} |",
        f"| permutation test of MCC ({result['permutations']} shuffles) | p = {result['permutation_p']:.3g} |",
        "",
        f"**Verdict: {result['verdict']}** (both tests at {result['alpha']}).",
    ]
    if result["verdict"].startswith("no"):
        lines.append(f"A simple classifier cannot predict the later period's directions from the news better than always answering "
                     f"{result['majority_class']}, so news_impact records (now {result.get('news_share', 0):.0%} of the store records) mostly teach the "
                     "label distribution. Consider a lower news share (the first number of --mix, e.g. 0.3) and more market_analysis, "
                     "report_qa or public finance data; published news -> direction results are near chance too (MCC -0.05 to 0.10).")
    return lines
