"""metrics.json from the evaluation's cached files: no model is needed.

`compute_metrics(DIR)` reads items.jsonl and the caches `evaluate()` wrote (generations,
choice scores, perplexities), and writes `DIR/metrics.json` and `DIR/per_item.jsonl`. Every
metric row has the base and fine-tuned value, 95% percentile bootstrap intervals (paired for
the difference), a test (McNemar exact for paired right/wrong, else a paired bootstrap) and a
verdict at `SIGNIFICANCE_LEVEL`. Closed-option tasks get rows from parsed generations
(`<task>.accuracy`, ...) and from choice scoring (`<task>.choice_accuracy`, ...) side by
side, with the same majority and random baselines.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finqlora.core import statistics as S
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json, atomic_write_jsonl, read_jsonl
from finqlora.dataset.answer_parser import DIRECTIONS, parse_direction, parse_number
from finqlora.dataset.labels import IMPORTANCE, MARKET_CASES, RELATIONS
from finqlora.evaluate import metrics as M
from finqlora.evaluate.choice import NORMALISATION

VARIANTS = ("base", "finetuned")
SCORING_MODES = ("choice", "generate", "both")
SIGNIFICANCE_LEVEL = 0.05


def read_cache(path: Path) -> list[dict[str, Any]]:
    """Rows of an append-only cache (none if the file is absent); a torn last line is dropped."""
    return read_jsonl(path, what="evaluation cache", torn_tail=True) if Path(path).exists() else []


def _by_id(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in rows}


def _verdict(delta: float, p_value: float | None, higher_is_better: bool) -> str:
    if p_value is None or np.isnan(delta):
        return "not tested"
    if p_value >= SIGNIFICANCE_LEVEL:
        return "no significant difference"
    better = delta > 0 if higher_is_better else delta < 0
    return "significantly better" if better else "significantly worse"


def _pair(interval: S.Interval) -> list[float]:
    return [interval.low, interval.high]


class _Scorer:
    """Builds metric rows with intervals and tests for one set of paired items."""

    def __init__(self, resamples: int, seed: int) -> None:
        self.resamples = resamples
        self.seed = seed

    def row(
        self, key: str, name: str, n: int, base: Callable[[np.ndarray], float], tuned: Callable[[np.ndarray], float],
        *, higher_is_better: bool = True, paired_correct: tuple[Sequence[bool], Sequence[bool]] | None = None, unit: str = "",
        values: tuple[float, float] | None = None,
    ) -> dict[str, Any]:
        """`base` / `tuned` give the statistic of the items an index array picks; `values`, when
        given, are the library's point values of statistics that `base` / `tuned` compute faster."""
        everything = np.arange(n)
        base_value, tuned_value = values if values is not None else (base(everything), tuned(everything))
        boot = S.paired_bootstrap(base, tuned, n, n_resamples=self.resamples, seed=self.seed)
        row: dict[str, Any] = {
            "key": key, "name": name, "n": n, "unit": unit, "higher_is_better": higher_is_better,
            "base": base_value, "base_ci": _pair(boot.first), "finetuned": tuned_value, "finetuned_ci": _pair(boot.second),
            "delta": tuned_value - base_value, "delta_ci": _pair(boot.difference),
        }
        if paired_correct is not None:
            test = M.mcnemar_paired(*paired_correct)
            row.update(test="McNemar exact", p_value=test.p_exact, mcnemar=test.to_dict())
        else:
            row.update(test="paired bootstrap", p_value=boot.p_value)
        row["verdict"] = _verdict(row["delta"], row["p_value"], higher_is_better)
        return row

    def mean_row(self, key: str, name: str, values: dict[str, np.ndarray], **kwargs: Any) -> dict[str, Any]:
        """A row whose statistic is the mean of per-item values."""
        n = len(values["base"])
        return self.row(key, name, n, lambda i: float(values["base"][i].mean()), lambda i: float(values["finetuned"][i].mean()), **kwargs)


# ---------------------------------------------------------------------------------------------
# Closed-option tasks


def _classification_block(
    scorer: _Scorer, prefix: str, title: str, y_true: list[str], preds: dict[str, list[str | None]], labels: list[str],
    groups: list[str] | None = None, *, parse_rate: bool = True, with_mcc: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    n = len(y_true)
    truth = np.array(y_true, dtype=object)
    arrays = {v: np.array(preds[v], dtype=object) for v in VARIANTS}

    def acc(v: str) -> Callable[[np.ndarray], float]:
        return lambda idx: float(np.mean(arrays[v][idx] == truth[idx])) if len(idx) else float("nan")

    # Macro-F1 over the classes that occur in the references or either model's answers
    # (scikit-learn's default), fixed for all resamples so the bootstrap compares like with like.
    f1_labels = [label for label in labels if label in y_true or any(label in preds[v] for v in VARIANTS)]
    # One code space for both models (f1_labels first, then e.g. None = unparsed): a resample's
    # confusion matrix is a bincount of the codes (core.statistics; scikit-learn per resample is 10-25x slower).
    true_codes, pred_codes, n_codes = S.class_codes(y_true, [*preds["base"], *preds["finetuned"]], f1_labels)
    codes = {"base": pred_codes[:n], "finetuned": pred_codes[n:]}

    def f1(v: str) -> Callable[[np.ndarray], float]:
        return lambda idx: S.macro_f1_from_confusion(S.confusion_counts(true_codes, codes[v], n_codes, idx), len(f1_labels))

    correct = {v: [p == t for p, t in zip(preds[v], y_true)] for v in VARIANTS}
    rows = [
        scorer.row(f"{prefix}accuracy", f"{title}: accuracy", n, acc("base"), acc("finetuned"), paired_correct=(correct["base"], correct["finetuned"])),
        scorer.row(f"{prefix}macro_f1", f"{title}: macro-F1", n, f1("base"), f1("finetuned"),
                   values=(M.macro_f1(y_true, preds["base"], f1_labels), M.macro_f1(y_true, preds["finetuned"], f1_labels))),
    ]
    if with_mcc:
        # Directions: accuracy rewards guessing the majority class, MCC does not (0 for any constant guess).
        def mcc(v: str) -> Callable[[np.ndarray], float]:
            return lambda idx: S.mcc_from_confusion(S.confusion_counts(true_codes, codes[v], n_codes, idx))

        rows.append(scorer.row(f"{prefix}mcc", f"{title}: MCC", n, mcc("base"), mcc("finetuned"),
                               values=(M.mcc(y_true, preds["base"]), M.mcc(y_true, preds["finetuned"]))))
    if parse_rate:
        parsed = {v: np.array([p is not None for p in preds[v]], dtype=float) for v in VARIANTS}
        rows.append(scorer.mean_row(f"{prefix}parse_rate", f"{title}: parse rate (format adherence)", parsed))
    block: dict[str, Any] = {
        "n": n, "labels": labels, "macro_f1_classes": f1_labels, "label_counts": {label: y_true.count(label) for label in labels},
        # The majority baseline's macro-F1 is over the reference classes (the union of references
        # and its single predicted class); random guessing predicts every class.
        "baselines": {"majority": M.majority_baseline(y_true, [label for label in labels if label in y_true]), "random": M.random_baseline(y_true, labels)},
    }
    for v in VARIANTS:
        block[v] = {"confusion": M.confusion_matrix(y_true, preds[v], labels), "per_class": M.per_class_f1(y_true, preds[v], labels)}
    if with_mcc:
        mcc_row = next(row for row in rows if row["key"] == f"{prefix}mcc")
        for v in VARIANTS:
            block[v].update(mcc=mcc_row[v], mcc_ci=mcc_row[f"{v}_ci"])
    if groups is not None:
        block["by_ticker_window"] = _breakdown(y_true, preds, groups, f1_labels)
    return block, rows


def _breakdown(y_true: list[str], preds: dict[str, list[str | None]], groups: list[str], f1_labels: list[str]) -> dict[str, Any]:
    breakdown: dict[str, Any] = {}
    for group in sorted(set(groups)):
        idx = [i for i, g in enumerate(groups) if g == group]
        sub_true = [y_true[i] for i in idx]
        breakdown[group] = {"n": len(idx)}
        for v in VARIANTS:
            sub_pred = [preds[v][i] for i in idx]
            breakdown[group][v] = {"accuracy": M.accuracy(sub_true, sub_pred), "macro_f1": M.macro_f1(sub_true, sub_pred, f1_labels)}
    return breakdown


def _present(labels: list[str], truth: list[str], preds: dict[str, list[str | None]]) -> list[str]:
    return [label for label in labels if label in truth or any(label in preds[v] for v in VARIANTS)]


class _Context:
    """What every task's scoring reads: the items, outputs, choice scores and per-item record."""

    def __init__(self, run_dir: Path, items: list[dict[str, Any]], scoring: str, scorer: _Scorer) -> None:
        self.items, self.scoring, self.scorer = items, scoring, scorer
        self.outputs = {v: {row["id"]: row["output"] for row in read_cache(run_dir / f"generations_{v}.jsonl")} for v in VARIANTS}
        self.choices = {v: _by_id(read_cache(run_dir / f"choice_{v}.jsonl")) for v in VARIANTS}
        self.per_item: dict[str, dict[str, Any]] = {item["id"]: {} for item in items}
        self.table: list[dict[str, Any]] = []
        self.tasks: dict[str, Any] = {}

    def record(self, item_id: str, variant: str, **values: Any) -> None:
        self.per_item[item_id].setdefault(variant, {}).update(values)

    def closed_task(self, key: str, title: str, items: list[dict[str, Any]], truth: list[str], labels: list[str],
                    parse: Callable[[str, dict[str, Any]], tuple[str | None, dict[str, Any]]], groups: list[str] | None = None,
                    *, only_present: bool = False, with_mcc: bool = False) -> dict[str, Any] | None:
        """Rows from parsed generations and from choice scoring; returns the generation block.

        With `only_present`, the classes are those of `labels` that occur in the references or
        in either model's predictions (news directions: a class nobody used is not a column).
        """
        block = None
        if all(item["id"] in self.outputs[v] for item in items for v in VARIANTS):
            preds: dict[str, list[str | None]] = {}
            for v in VARIANTS:
                preds[v] = []
                for item, expected in zip(items, truth):
                    predicted, extra = parse(self.outputs[v][item["id"]], item)
                    preds[v].append(predicted)
                    self.record(item["id"], v, parsed=predicted, correct=predicted == expected, **extra)
            block, rows = _classification_block(self.scorer, f"{key}.", title, truth, preds, _present(labels, truth, preds) if only_present else labels, groups,
                                                with_mcc=with_mcc)
            self.table.extend(rows)
        if self.scoring != "generate" and all(item["id"] in self.choices[v] for item in items for v in VARIANTS):
            self.choice_task(key, title, items, truth, labels, only_present, with_mcc)
        return block

    def choice_task(self, key: str, title: str, items: list[dict[str, Any]], truth: list[str], labels: list[str], only_present: bool,
                    with_mcc: bool = False) -> None:
        preds: dict[str, list[str | None]] = {}
        for v in VARIANTS:
            preds[v] = [item["choice"]["classes"][self.choices[v][item["id"]]["choice"]] for item in items]
            for item, predicted, expected in zip(items, preds[v], truth):
                self.record(item["id"], v, choice=predicted, choice_correct=predicted == expected)
        labels = _present(labels, truth, preds) if only_present else labels
        block, rows = _classification_block(self.scorer, f"{key}.choice_", f"{title} (choice)", truth, preds, labels, parse_rate=False, with_mcc=with_mcc)
        block["options"] = items[0]["choice"]["options"]
        block["normalisation"] = f"{NORMALISATION} (finqlora.evaluate.choice)"
        self.tasks.setdefault("choice", {})[key] = block
        self.table.extend(rows)


def _news_impact(ctx: _Context) -> None:
    news = [item for item in ctx.items if item["task"] == "news_impact" and (item.get("label") or {}).get("direction")]
    if not news:
        return
    truth = [item["label"]["direction"] for item in news]

    def parse(text: str, item: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        parsed = parse_direction(text, ticker=item["label"].get("ticker"))
        return parsed.direction, {"method": parsed.method}

    groups = [f"{item['label'].get('ticker')} @ {item['label'].get('window_min')} min" for item in news]
    block = ctx.closed_task("news_impact", "News direction", news, truth, list(DIRECTIONS), parse, groups, only_present=True, with_mcc=True)
    if block:
        ctx.tasks["news_impact"] = block


def _report_qa(ctx: _Context) -> None:
    qa = [item for item in ctx.items if item["task"] == "report_qa" and item.get("label") and "answer" in item["label"]]
    if not qa:
        return
    correct: dict[str, list[bool]] = {v: [] for v in VARIANTS}
    parsed_ok: dict[str, list[bool]] = {v: [] for v in VARIANTS}
    for v in VARIANTS:
        for item in qa:
            label = item["label"]
            number = parse_number(ctx.outputs[v][item["id"]], label.get("unit"))
            value = number.value if number else None
            ok = M.numeric_correct(value, float(label["answer"]), float(label.get("tolerance", 0.01)))
            correct[v].append(ok)
            parsed_ok[v].append(number is not None)
            ctx.record(item["id"], v, parsed=value, correct=ok)
    as_float = {v: np.array(correct[v], dtype=float) for v in VARIANTS}
    ctx.table.append(ctx.scorer.mean_row("report_qa.accuracy", "Report Q&A: numeric accuracy", as_float, paired_correct=(correct["base"], correct["finetuned"])))
    ctx.table.append(ctx.scorer.mean_row("report_qa.parse_rate", "Report Q&A: parse rate", {v: np.array(parsed_ok[v], dtype=float) for v in VARIANTS}))
    ctx.tasks["report_qa"] = {"n": len(qa), "tolerance_rule": "|answer - reference| <= label.tolerance (absolute, in the reference unit)",
                              "metrics": sorted({item["label"].get("metric", "?") for item in qa})}


def _first_named(text: str, names: Sequence[str]) -> str | None:
    positions = [(text.find(name), name) for name in names if name in text]
    return min(positions)[1] if positions else None


def _market_analysis(ctx: _Context) -> None:
    market = [item for item in ctx.items if item["task"] == "market_analysis" and (item.get("label") or {}).get("case")]
    # The 重要性与波动 question names its own type: it is scored on its answer (高于/接近/低于常态).
    importance = [item for item in market if item["label"]["case"] == IMPORTANCE and item["label"].get("relation")]
    cases = [item for item in market if item not in importance]
    if cases:
        # Every case the builder can label, so an answer naming another case is wrong, not unparsed.
        names = sorted(set(MARKET_CASES) | {item["label"]["case"] for item in cases})
        block = ctx.closed_task("market_analysis", "Market case", cases, [item["label"]["case"] for item in cases], names,
                                lambda text, _item: (_first_named(text, names), {}))
        if block:
            ctx.tasks["market_analysis"] = block
    if importance:
        relations = list(RELATIONS)
        block = ctx.closed_task("market_importance", "Move vs typical", importance, [item["label"]["relation"] for item in importance],
                                relations, lambda text, _item: (_first_named(text, relations), {}))
        if block:
            ctx.tasks["market_importance"] = block


_SAID_LETTER = re.compile(r"(?:答案|answer)\s*(?:是|为|:|：)?\s*([A-F])(?![A-Za-z])", re.IGNORECASE)
_LONE_LETTER = re.compile(r"(?<![A-Za-z])([A-F])(?![A-Za-z])")


def parse_letter(text: str, options: Sequence[str]) -> str | None:
    """The option letter a generated answer names: the one after 答案/answer if it says so, else
    the first standalone capital letter among the options."""
    for pattern in (_SAID_LETTER, _LONE_LETTER):
        for match in pattern.finditer(text or ""):
            if match.group(1).upper() in options:
                return match.group(1).upper()
    return None


def _benchmark_parser(kind: str, labels: list[str]) -> Callable[[str, dict[str, Any]], tuple[str | None, dict[str, Any]]]:
    if kind == "multiple_choice":
        return lambda text, item: (parse_letter(text, item["choice"]["options"]), {})
    if kind == "classes":
        return lambda text, _item: (_first_named(text, labels), {})
    return lambda text, _item: (parse_direction(text).direction, {})


def _benchmarks(ctx: _Context) -> None:
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in ctx.items:
        if item["task"] == "benchmark":
            by_name[item["benchmark"]].append(item)
    for name, rows in by_name.items():
        truth = [item["label"]["class"] for item in rows]
        labels = rows[0]["label"]["labels"]
        block = ctx.closed_task(f"benchmark.{name}", f"Benchmark {name}", rows, truth, labels,
                                _benchmark_parser(rows[0]["label"].get("kind", "sentiment"), labels))
        if block:
            block["format"] = rows[0]["benchmark_format"]
            block["display_names"] = rows[0]["label"].get("display") or {}
            ctx.tasks.setdefault("benchmarks", {})[name] = block
        if f"benchmark.{name}" in ctx.tasks.get("choice", {}):
            ctx.tasks["choice"][f"benchmark.{name}"]["format"] = rows[0]["benchmark_format"]


def _suite(ctx: _Context, meta_suite: dict[str, Any] | None, resamples: int, seed: int) -> dict[str, Any] | None:
    """The suite's table (finqlora.evaluate.suite): choice correctness where scored, else parsed answers."""
    if not meta_suite:
        return None
    from finqlora.evaluate.suite import scored_names, suite_block

    correct: dict[str, dict[str, np.ndarray]] = {}
    for name in scored_names(meta_suite):
        ids = [item["id"] for item in ctx.items if item["task"] == "benchmark" and item["benchmark"] == name]
        for field in ("choice_correct", "correct"):
            if ids and all(field in ctx.per_item[i].get(v, {}) for i in ids for v in VARIANTS):
                correct[name] = {v: np.array([ctx.per_item[i][v][field] for i in ids], dtype=bool) for v in VARIANTS}
                break
    return suite_block(meta_suite, ctx.table, ctx.tasks, correct, resamples, seed)


# ---------------------------------------------------------------------------------------------
# Open tasks


def _overlap(ctx: _Context) -> None:
    """ROUGE-L and sacreBLEU against the references (generated items with a reference text)."""
    texts = [item for item in ctx.items if item["task"] != "benchmark" and item["reference"] and all(item["id"] in ctx.outputs[v] for v in VARIANTS)]
    if not texts:
        return
    rouge = {v: np.array([M.rouge_l(ctx.outputs[v][item["id"]], item["reference"]) for item in texts]) for v in VARIANTS}
    stats = {v: M.bleu_statistics([ctx.outputs[v][item["id"]] for item in texts], [item["reference"] for item in texts]) for v in VARIANTS}
    for v in VARIANTS:
        for item, value in zip(texts, rouge[v]):
            ctx.record(item["id"], v, rouge_l=float(value))
    ctx.table.append(ctx.scorer.mean_row("overlap.rouge_l", "ROUGE-L F1 vs reference", rouge))
    ctx.table.append(ctx.scorer.row("overlap.bleu", "BLEU-4 vs reference (sacreBLEU, 0-100)", len(texts),
                                    lambda i: M.bleu_from_statistics(stats["base"][i]), lambda i: M.bleu_from_statistics(stats["finetuned"][i])))
    ctx.tasks["overlap"] = {"n": len(texts), "bleu_signature": M.bleu_signature(), "by_type": {
        kind: {v: float(np.mean([rouge[v][k] for k, item in enumerate(texts) if item["task"] == kind])) for v in VARIANTS}
        for kind in sorted({item["task"] for item in texts})
    }}


def _repetition(ctx: _Context) -> None:
    """Share of repeated n-grams per generated answer (metrics.repetition_rate), lower is better."""
    generated = [item for item in ctx.items if all(item["id"] in ctx.outputs[v] for v in VARIANTS)]
    if not generated:
        return
    rates = {v: np.array([M.repetition_rate(ctx.outputs[v][item["id"]]) for item in generated]) for v in VARIANTS}
    for v in VARIANTS:
        for item, value in zip(generated, rates[v]):
            ctx.record(item["id"], v, repetition_rate=float(value))
    ctx.table.append(ctx.scorer.mean_row("generation.repetition_rate", f"Repetition rate ({M.REPETITION_NGRAM}-grams repeated, lower is better)",
                                         rates, higher_is_better=False))
    ctx.tasks["repetition"] = {"n": len(generated), "ngram": M.REPETITION_NGRAM, **{v: float(rates[v].mean()) for v in VARIANTS}}


def _perplexities(ctx: _Context, run_dir: Path) -> None:
    """Perplexity of the reference answers and of general text (forgetting)."""
    for key, name, stem in (
        ("perplexity.reference", "Reference-answer perplexity", "perplexity"),
        ("perplexity.general_text", "Forgetting: general-text perplexity", "forgetting"),
    ):
        rows = {v: _by_id(read_cache(run_dir / f"{stem}_{v}.jsonl")) for v in VARIANTS}
        common = sorted(set(rows["base"]) & set(rows["finetuned"]))
        if not common:
            continue
        nll = {v: np.array([rows[v][i]["nll"] for i in common]) for v in VARIANTS}
        tokens = {v: np.array([rows[v][i]["tokens"] for i in common]) for v in VARIANTS}

        def ppl(v: str) -> Callable[[np.ndarray], float]:
            return lambda i: M.perplexity(nll[v][i], tokens[v][i])

        ctx.table.append(ctx.scorer.row(key, name, len(common), ppl("base"), ppl("finetuned"), higher_is_better=False))
        if stem == "forgetting":
            base_ppl, tuned_ppl = ctx.table[-1]["base"], ctx.table[-1]["finetuned"]
            ctx.tasks["forgetting"] = {"texts": len(common), "ratio": tuned_ppl / base_ppl if base_ppl else float("nan"),
                                       "source": "finqlora/resources/general_text.jsonl (written for this project; not finance)"}


def _generation_cost(ctx: _Context, generations: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Generation cost from the cache itself, so a re-run that reused everything still reports it."""
    cost: dict[str, Any] = {}
    for v in VARIANTS:
        rows = [generations[v][item["id"]] for item in ctx.items if item["id"] in generations[v]]
        seconds = sum(row.get("seconds") or 0.0 for row in rows)
        tokens = sum(row.get("tokens") or 0 for row in rows)
        cost[v] = {"items": len(rows), "seconds": round(seconds, 2), "new_tokens": tokens,
                   "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
                   "hit_max_new_tokens": sum(row.get("finished") is False for row in rows)}
    if cost["base"]["tokens_per_s"] and cost["finetuned"]["tokens_per_s"]:
        cost["finetuned_to_base_speed"] = round(cost["finetuned"]["tokens_per_s"] / cost["base"]["tokens_per_s"], 3)
    return cost


def _check_complete(run_dir: Path, items: list[dict[str, Any]], scoring: str, generations: dict[str, dict[str, Any]]) -> None:
    wanted = [item for item in items if scoring != "choice" or "choice" not in item]
    missing = {v: sum(item["id"] not in generations[v] for item in wanted) for v in VARIANTS}
    if any(missing.values()):
        raise FinqloraError(
            f"{run_dir}: generations missing for {missing['base']} base and {missing['finetuned']} fine-tuned items",
            hint="run `finqlora eval` again with the same options: it resumes and fills in only what is missing",
        )


def compute_metrics(run_dir: str | Path, *, bootstrap_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """metrics.json (and per_item.jsonl) from the cached items and model outputs."""
    run_dir = Path(run_dir)
    items = read_cache(run_dir / "items.jsonl")
    if not items:
        raise FinqloraError(f"{run_dir} has no items.jsonl", hint="run `finqlora eval --data ... --output DIR` first")
    config_file = run_dir / "eval_config.json"
    meta = read_json_file(config_file) if config_file.exists() else {}
    scoring = meta.get("scoring", "generate")  # caches from before choice scoring hold generations only
    generations = {v: _by_id(read_cache(run_dir / f"generations_{v}.jsonl")) for v in VARIANTS}
    _check_complete(run_dir, items, scoring, generations)
    ctx = _Context(run_dir, items, scoring, _Scorer(bootstrap_resamples, seed))
    for task in (_news_impact, _report_qa, _market_analysis):
        task(ctx)
    _overlap(ctx)
    _repetition(ctx)
    _perplexities(ctx, run_dir)
    _benchmarks(ctx)
    suite = _suite(ctx, meta.get("suite"), bootstrap_resamples, seed)
    result = _finite({
        "meta": meta,
        "significance_level": SIGNIFICANCE_LEVEL,
        "bootstrap": {"resamples": bootstrap_resamples, "seed": seed, "level": 0.95, "method": "percentile, paired for deltas"},
        "n_items": len(items),
        "items_by_task": {task: sum(item["task"] == task for item in items) for task in sorted({item["task"] for item in items})},
        "generation_cost": _generation_cost(ctx, generations),
        "table": ctx.table,
        "tasks": ctx.tasks,
        **({"suite": suite} if suite else {}),
    })
    atomic_write_json(run_dir / "metrics.json", result)
    atomic_write_jsonl(run_dir / "per_item.jsonl", [{"id": item_id, **scores} for item_id, scores in ctx.per_item.items()])
    return result


def read_json_file(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FinqloraError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})", hint="delete it and run `finqlora eval` again") from exc


def _finite(value: Any) -> Any:
    """JSON has no NaN: undefined numbers become null."""
    if isinstance(value, float) and (np.isnan(value) or np.isinf(value)):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _finite(value.item())
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
