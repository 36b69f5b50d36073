"""Before/after evaluation: the base model and the fine-tuned model on the same prompts.

`evaluate(options)` does three things, each resumable:

1. **Items** (`DIR/items.jsonl`): the held-out records (split `test` when the file has
   splits) and the rows of any external benchmark, as prompts + references + labels.
2. **Generations** (`DIR/generations_base.jsonl`, `DIR/generations_finetuned.jsonl`): one
   line per item, appended batch by batch. The base answers come from the same loaded
   weights with the adapter switched off, the same tokenizer and chat template (the
   adapter's) and the same `GenerationSettings`. A cached line is reused when its prompt
   hash, settings hash and model key match, so re-running (or re-reporting) never
   regenerates; an interrupted run continues where it stopped.
   Perplexities of the reference answers (`DIR/perplexity_*.jsonl`) and of the shipped
   general-domain text set (`DIR/forgetting.json`) are cached the same way.
3. **Metrics** (`DIR/metrics.json`): computed from the cached files only
   (`compute_metrics(DIR)`), then the report (`finqlora.report.report.build_report`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from finqlora.evaluate import metrics as M
from finqlora.dataset.answer_parser import DIRECTIONS, parse_direction, parse_number
from finqlora.core.chat_format import record_to_chat, render_prompt
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json, atomic_write_jsonl, sha256_file

VARIANTS = ("base", "finetuned")
SIGNIFICANCE_LEVEL = 0.05


@dataclass
class BenchmarkSpec:
    path: str
    format: str
    label_map: str | None = None
    split: str | None = None
    limit: int | None = None


@dataclass
class EvalOptions:
    """Everything `finqlora eval` needs; the CLI fills this from its options."""

    output: Path
    model: str | None = None
    adapter: str | None = None
    data: Path | None = None
    split: str = "test"
    max_samples: int | None = None
    benchmarks: list[BenchmarkSpec] = field(default_factory=list)
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    load_in_4bit: bool | None = None
    chat_template: str | None = None
    perplexity: bool = True
    forgetting: bool = True
    max_length: int = 1024
    bootstrap_resamples: int = 1000
    report: bool = True
    progress: bool = True
    # ("base",) generates and scores only the base model (no adapter needed), e.g. before
    # training; a later full run reuses those cached answers (same prompts, settings, model).
    variants: tuple[str, ...] = VARIANTS


# ---------------------------------------------------------------------------------------------
# Items


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FinqloraError(f"file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FinqloraError(
                    f"{path}: line {number} is not valid JSON ({exc.msg} at column {exc.colno})",
                    hint="the dataset is JSONL: one JSON object per line (as written by `finqlora build`)",
                ) from exc
            if not isinstance(row, dict):
                raise FinqloraError(f"{path}: line {number} is not a JSON object")
            rows.append(row)
    return rows


def read_cache(path: Path) -> list[dict[str, Any]]:
    """Rows of an append-only cache; a torn last line (an interrupted write) is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def load_test_records(path: Path, *, split: str = "test", max_samples: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The held-out records: split == `split` when the file has splits, else every record.

    With `max_samples`, a seeded sample stratified by record type (each type keeps its
    share), in file order.
    """
    rows = _read_jsonl(path)
    if any("split" in row for row in rows):
        chosen = [row for row in rows if row.get("split") == split]
        if not chosen:
            found = sorted({str(row.get("split")) for row in rows})
            raise FinqloraError(f"{path}: no records with split {split!r} (found: {', '.join(found)})", hint="pass --split with one of those")
    else:
        chosen = rows
    if max_samples is not None and max_samples < len(chosen):
        by_type: dict[str, list[int]] = defaultdict(list)
        for index, row in enumerate(chosen):
            by_type[str(row.get("type"))].append(index)
        rng = random.Random(seed)
        keep: list[int] = []
        remaining = max_samples
        types = sorted(by_type, key=lambda t: -len(by_type[t]))
        for position, kind in enumerate(types):
            share = round(max_samples * len(by_type[kind]) / len(chosen)) if position < len(types) - 1 else remaining
            share = max(0, min(share, remaining, len(by_type[kind])))
            keep.extend(rng.sample(by_type[kind], share))
            remaining -= share
        chosen = [chosen[i] for i in sorted(keep)]
    return chosen


def build_items(records: Sequence[dict[str, Any]], benchmarks: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Prompts, references and labels for every record and benchmark row."""
    items = []
    seen: set[str] = set()
    for number, record in enumerate(records):
        example = record_to_chat(record)
        item_id = str(record.get("id") or f"item-{number}")
        if item_id in seen:
            raise FinqloraError(f"duplicate record id {item_id!r} in the test data", hint="ids must be unique (finqlora build writes unique ids)")
        seen.add(item_id)
        items.append(
            {
                "id": item_id,
                "task": str(record.get("type") or "other"),
                "messages": example.messages,
                "reference": example.answer,
                "label": record.get("label"),
                "event_id": record.get("event_id"),
                "event_time": record.get("event_time"),
            }
        )
    for benchmark in benchmarks:
        for row in benchmark.items:
            example = record_to_chat(row.to_record())
            items.append(
                {
                    "id": f"{benchmark.name}/{row.id}",
                    "task": "benchmark",
                    "benchmark": benchmark.name,
                    "benchmark_format": benchmark.format,
                    "messages": example.messages,
                    "reference": row.raw_label,
                    "label": {"class": row.label, "labels": benchmark.labels, "display": benchmark.display_names},
                }
            )
    return items


# ---------------------------------------------------------------------------------------------
# Generation with a cache


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _model_keys(loaded: Any, adapter: str | None) -> dict[str, str]:
    base = f"{loaded.resolved.base_id}|{loaded.dtype}"
    keys = {"base": base}
    if adapter is not None:
        weights = Path(adapter) / "adapter_model.safetensors"
        fingerprint = sha256_file(weights)[:16] if weights.exists() else _sha(str(Path(adapter).resolve()))
        keys["finetuned"] = f"{base}|adapter:{fingerprint}"
    return keys


def _generate_cached(
    loaded: Any,
    items: Sequence[dict[str, Any]],
    variant: str,
    model_key: str,
    settings: Any,
    cache_path: Path,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    """Fill `cache_path` with one generation per item; returns timing facts."""
    from finqlora.models.generation import generate

    settings_key = _sha(asdict(settings))
    prompts = {item["id"]: render_prompt(loaded.tokenizer, item["messages"]) for item in items}
    wanted = {item["id"]: _sha([prompts[item["id"]], settings_key, model_key]) for item in items}
    cached = {row["id"]: row for row in read_cache(cache_path) if row.get("cache_key") == wanted.get(row.get("id"))}
    todo = [item for item in items if item["id"] not in cached]
    started = time.perf_counter()
    generated_tokens = 0
    if todo:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [TextColumn(f"generating ({variant})"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
        # Batches of similar prompt length waste less padding; order is restored by id.
        todo.sort(key=lambda item: len(prompts[item["id"]]))
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task(variant, total=len(todo))
            with cache_path.open("a", encoding="utf-8") as handle:
                for start in range(0, len(todo), batch_size):
                    batch = todo[start : start + batch_size]
                    batch_started = time.perf_counter()
                    answers = generate(loaded.model, loaded.tokenizer, [item["messages"] for item in batch], settings, batch_size=batch_size, progress=False)
                    seconds = (time.perf_counter() - batch_started) / len(batch)
                    for item, answer in zip(batch, answers):
                        generated_tokens += answer.new_tokens
                        row = {
                            "id": item["id"], "output": answer.text, "tokens": answer.new_tokens, "finished": answer.finished,
                            "seconds": round(seconds, 3), "cache_key": wanted[item["id"]], "model": model_key,
                        }
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                        cached[item["id"]] = row
                    handle.flush()
                    bar.advance(task, len(batch))
    elapsed = time.perf_counter() - started
    # Rewrite in item order without stale lines (atomic), so the file reads cleanly.
    atomic_write_jsonl(cache_path, [cached[item["id"]] for item in items])
    return {"generated": len(todo), "reused": len(items) - len(todo), "seconds": round(elapsed, 2), "tokens": generated_tokens,
            "tokens_per_s": round(generated_tokens / elapsed, 2) if todo and elapsed > 0 else None}


def _nll_cached(
    compute: Callable[[list[dict[str, Any]]], list[tuple[float, int]]],
    items: Sequence[dict[str, Any]],
    keys: dict[str, str],
    cache_path: Path,
) -> None:
    cached = {row["id"]: row for row in read_cache(cache_path) if row.get("cache_key") == keys.get(row.get("id"))}
    todo = [item for item in items if item["id"] not in cached]
    if todo:
        for item, (nll, count) in zip(todo, compute(todo)):
            cached[item["id"]] = {"id": item["id"], "nll": nll, "tokens": count, "cache_key": keys[item["id"]]}
    atomic_write_jsonl(cache_path, [cached[item["id"]] for item in items if item["id"] in cached])


def general_texts() -> list[dict[str, str]]:
    """The shipped general-domain (not finance) Chinese + English passages for forgetting."""
    text = resources.files("finqlora").joinpath("resources/general_text.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _progress_callback(progress: bool, label: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not progress)
    task = bar.add_task(label, total=total)
    return bar, lambda n: bar.advance(task, n)


def evaluate(options: EvalOptions) -> dict[str, Any]:
    """Run (or resume) the evaluation and write metrics.json (and the report)."""
    from finqlora.evaluate.benchmarks import load_benchmark, parse_label_map
    from finqlora.models.generation import GenerationSettings
    from finqlora.models.loading import adapter_base_model, load_model

    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    if options.data is None and not options.benchmarks:
        raise FinqloraError("nothing to evaluate", hint="pass --data test.jsonl (from finqlora build) and/or --benchmark PATH")
    unknown = set(options.variants) - set(VARIANTS)
    if unknown or not options.variants:
        raise FinqloraError(f"unknown variants {sorted(unknown)}", hint="use base and/or finetuned")
    if "finetuned" in options.variants and not options.adapter:
        raise FinqloraError(
            "no --adapter given: the evaluation compares the base model with the fine-tuned one",
            hint="pass --adapter OUTPUT_DIR of `finqlora train` (the base model defaults to the one it was trained on)",
        )
    adapter = options.adapter if "finetuned" in options.variants else None
    model_spec = options.model or (adapter_base_model(adapter) if adapter else None)
    if not model_spec:
        raise FinqloraError("no base model given", hint="pass --model (e.g. builtin:qwen2.5-coder-0.5b-instruct) or an --adapter that records its base")

    records = load_test_records(Path(options.data), split=options.split, max_samples=options.max_samples, seed=options.seed) if options.data else []
    benchmarks = [
        load_benchmark(spec.path, spec.format, label_map=parse_label_map(spec.label_map), split=spec.split, limit=spec.limit, seed=options.seed)
        for spec in options.benchmarks
    ]
    items = build_items(records, benchmarks)
    atomic_write_jsonl(output / "items.jsonl", items)

    load_started = time.perf_counter()
    loaded = load_model(
        model_spec, adapter=adapter, device=options.device, dtype=options.dtype,
        load_in_4bit=options.load_in_4bit, chat_template=options.chat_template, progress=options.progress,
    )
    load_seconds = time.perf_counter() - load_started
    settings = GenerationSettings(
        max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
        repetition_penalty=options.repetition_penalty, seed=options.seed,
    )
    keys = _model_keys(loaded, adapter)
    variants = [v for v in VARIANTS if v in options.variants]
    timings: dict[str, Any] = {"model_load_s": round(load_seconds, 2)}
    for variant in variants:
        context = loaded.base_only() if variant == "base" else contextlib.nullcontext()
        with context:
            timings[f"generate_{variant}"] = _generate_cached(
                loaded, items, variant, keys[variant], settings, output / f"generations_{variant}.jsonl", options.batch_size, options.progress
            )
            if options.perplexity:
                scored = [item for item in items if item["task"] != "benchmark" and item["reference"]]
                started = time.perf_counter()
                item_keys = {item["id"]: _sha([item["messages"], item["reference"], keys[variant], options.max_length]) for item in scored}

                def compute(todo: list[dict[str, Any]]) -> list[tuple[float, int]]:
                    bar, advance = _progress_callback(options.progress, f"answer perplexity ({variant})", len(todo))
                    with bar:
                        records_for_nll = [{"messages": item["messages"] + [{"role": "assistant", "content": item["reference"]}]} for item in todo]
                        return M.answer_nll(loaded.model, loaded.tokenizer, records_for_nll, max_length=options.max_length, batch_size=options.batch_size, progress=advance)

                _nll_cached(compute, scored, item_keys, output / f"perplexity_{variant}.jsonl")
                timings[f"perplexity_{variant}_s"] = round(time.perf_counter() - started, 2)
            if options.forgetting:
                started = time.perf_counter()
                texts = general_texts()
                text_keys = {row["id"]: _sha([row["text"], keys[variant]]) for row in texts}

                def compute_texts(todo: list[dict[str, Any]]) -> list[tuple[float, int]]:
                    bar, advance = _progress_callback(options.progress, f"general-text perplexity ({variant})", len(todo))
                    with bar:
                        return M.text_nll(loaded.model, loaded.tokenizer, [row["text"] for row in todo], batch_size=options.batch_size, progress=advance)

                _nll_cached(compute_texts, texts, text_keys, output / f"forgetting_{variant}.jsonl")
                timings[f"forgetting_{variant}_s"] = round(time.perf_counter() - started, 2)

    meta = {
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": model_spec,
        "base_id": loaded.resolved.base_id,
        "adapter": str(Path(adapter).resolve()) if adapter else None,
        "data": str(Path(options.data).resolve()) if options.data else None,
        "data_sha256": sha256_file(options.data) if options.data else None,
        "split": options.split,
        "max_samples": options.max_samples,
        "benchmarks": [asdict(spec) for spec in options.benchmarks],
        "generation": asdict(settings),
        "batch_size": options.batch_size,
        "device": loaded.device,
        "dtype": str(loaded.dtype),
        "load_in_4bit": loaded.load_in_4bit,
        "chat_template_sha256": hashlib.sha256((loaded.tokenizer.chat_template or "").encode("utf-8")).hexdigest()[:16],
        "timings": timings,
        "versions": _library_versions(),
    }
    del loaded
    if variants != list(VARIANTS):
        # Only part of the comparison exists yet: keep the cache, leave the metrics for the full run.
        atomic_write_json(output / f"eval_config_{variants[0]}.json", meta)
        return {"meta": meta, "variants": variants}
    atomic_write_json(output / "eval_config.json", meta)
    result = compute_metrics(output, bootstrap_resamples=options.bootstrap_resamples, seed=options.seed)
    if options.report:
        from finqlora.report.report import build_report

        build_report(output, output, seed=options.seed, recompute=False)
    return result


def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("finqlora", "torch", "transformers", "peft"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# ---------------------------------------------------------------------------------------------
# Metrics from cached files


def _by_id(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in rows}


def _interval(interval: M.Interval) -> list[float]:
    return [interval.low, interval.high]


def _verdict(delta: float, p_value: float | None, higher_is_better: bool) -> str:
    if p_value is None or np.isnan(delta):
        return "not tested"
    if p_value >= SIGNIFICANCE_LEVEL:
        return "no significant difference"
    better = delta > 0 if higher_is_better else delta < 0
    return "significantly better" if better else "significantly worse"


def _bootstrap_p(statistic: Callable[[np.ndarray], float], n: int, resamples: int, seed: int) -> float:
    """Two-sided bootstrap p-value of a paired difference: 2 * min(P(d <= 0), P(d >= 0))."""
    rng = np.random.default_rng(seed + 1)
    values = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(resamples)])
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan")
    return float(min(1.0, 2 * min((values <= 0).mean(), (values >= 0).mean())))


class _Scorer:
    """Builds metric rows with intervals and tests for one set of paired items."""

    def __init__(self, resamples: int, seed: int) -> None:
        self.resamples = resamples
        self.seed = seed

    def ci(self, statistic: Callable[[np.ndarray], float], n: int) -> list[float]:
        return _interval(M.bootstrap_ci(statistic, n, n_resamples=self.resamples, seed=self.seed))

    def row(
        self, key: str, name: str, n: int, base: Callable[[np.ndarray], float], tuned: Callable[[np.ndarray], float],
        *, higher_is_better: bool = True, paired_correct: tuple[Sequence[bool], Sequence[bool]] | None = None, unit: str = "",
    ) -> dict[str, Any]:
        everything = np.arange(n)
        base_value, tuned_value = base(everything), tuned(everything)

        def delta(indices: np.ndarray) -> float:
            return tuned(indices) - base(indices)

        row: dict[str, Any] = {
            "key": key, "name": name, "n": n, "unit": unit, "higher_is_better": higher_is_better,
            "base": base_value, "base_ci": self.ci(base, n), "finetuned": tuned_value, "finetuned_ci": self.ci(tuned, n),
            "delta": tuned_value - base_value, "delta_ci": self.ci(delta, n),
        }
        if paired_correct is not None:
            test = M.mcnemar_paired(*paired_correct)
            row["test"] = "McNemar exact"
            row["p_value"] = test.p_exact
            row["mcnemar"] = test.to_dict()
        else:
            row["test"] = "paired bootstrap"
            row["p_value"] = _bootstrap_p(delta, n, self.resamples, self.seed) if n else float("nan")
        row["verdict"] = _verdict(row["delta"], row["p_value"], higher_is_better)
        return row


def _classification_block(
    scorer: _Scorer, prefix: str, title: str, y_true: list[str], preds: dict[str, list[str | None]], labels: list[str],
    groups: list[str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    n = len(y_true)
    truth = np.array(y_true, dtype=object)
    arrays = {v: np.array(preds[v], dtype=object) for v in VARIANTS}

    def acc(v: str) -> Callable[[np.ndarray], float]:
        return lambda idx: float(np.mean(arrays[v][idx] == truth[idx])) if len(idx) else float("nan")

    # Macro-F1 over the classes that occur in the references or either model's answers
    # (scikit-learn's default), fixed for all resamples so the bootstrap compares like with like.
    f1_labels = [label for label in labels if label in y_true or any(label in preds[v] for v in VARIANTS)]

    def f1(v: str) -> Callable[[np.ndarray], float]:
        return lambda idx: M.macro_f1(list(truth[idx]), list(arrays[v][idx]), f1_labels)

    def parsed(v: str) -> Callable[[np.ndarray], float]:
        return lambda idx: float(np.mean([p is not None for p in arrays[v][idx]]))

    correct = {v: [p == t for p, t in zip(preds[v], y_true)] for v in VARIANTS}
    rows = [
        scorer.row(f"{prefix}.accuracy", f"{title}: accuracy", n, acc("base"), acc("finetuned"), paired_correct=(correct["base"], correct["finetuned"])),
        scorer.row(f"{prefix}.macro_f1", f"{title}: macro-F1", n, f1("base"), f1("finetuned")),
        scorer.row(f"{prefix}.parse_rate", f"{title}: parse rate (format adherence)", n, parsed("base"), parsed("finetuned")),
    ]
    block: dict[str, Any] = {
        "n": n,
        "labels": labels,
        "macro_f1_classes": f1_labels,
        "label_counts": {label: y_true.count(label) for label in labels},
        # The majority baseline's macro-F1 is over the reference classes (the union of references
        # and its single predicted class); random guessing predicts every class.
        "baselines": {"majority": M.majority_baseline(y_true, [label for label in labels if label in y_true]), "random": M.random_baseline(y_true, labels)},
    }
    for v in VARIANTS:
        block[v] = {
            "confusion": M.confusion_matrix(y_true, preds[v], labels),
            "per_class": M.per_class_f1(y_true, preds[v], labels),
        }
    if groups is not None:
        breakdown = {}
        for group in sorted(set(groups)):
            idx = [i for i, g in enumerate(groups) if g == group]
            breakdown[group] = {"n": len(idx)}
            for v in VARIANTS:
                sub_true = [y_true[i] for i in idx]
                sub_pred = [preds[v][i] for i in idx]
                breakdown[group][v] = {"accuracy": M.accuracy(sub_true, sub_pred), "macro_f1": M.macro_f1(sub_true, sub_pred, f1_labels)}
        block["by_ticker_window"] = breakdown
    return block, rows


def compute_metrics(run_dir: str | Path, *, bootstrap_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """metrics.json from the cached items, generations and perplexities (no model needed)."""
    run_dir = Path(run_dir)
    items = read_cache(run_dir / "items.jsonl")
    if not items:
        raise FinqloraError(f"{run_dir} has no items.jsonl", hint="run `finqlora eval --data ... --output DIR` first")
    generations = {v: _by_id(read_cache(run_dir / f"generations_{v}.jsonl")) for v in VARIANTS}
    missing = {v: sum(item["id"] not in generations[v] for item in items) for v in VARIANTS}
    if any(missing.values()):
        raise FinqloraError(
            f"{run_dir}: generations missing for {missing['base']} base and {missing['finetuned']} fine-tuned items",
            hint="run `finqlora eval` again with the same options: it resumes and fills in only what is missing",
        )
    scorer = _Scorer(bootstrap_resamples, seed)
    table: list[dict[str, Any]] = []
    tasks: dict[str, Any] = {}
    outputs = {v: {item["id"]: generations[v][item["id"]]["output"] for item in items} for v in VARIANTS}
    per_item: dict[str, dict[str, Any]] = {item["id"]: {} for item in items}

    # News impact: direction at the primary ticker/window.
    news = [item for item in items if item["task"] == "news_impact" and item.get("label") and item["label"].get("direction")]
    if news:
        truth = [item["label"]["direction"] for item in news]
        preds = {}
        for v in VARIANTS:
            parsed = [parse_direction(outputs[v][item["id"]], ticker=item["label"].get("ticker")) for item in news]
            preds[v] = [p.direction for p in parsed]
            for item, p in zip(news, parsed):
                per_item[item["id"]][v] = {"parsed": p.direction, "method": p.method, "correct": p.direction == item["label"]["direction"]}
        groups = [f"{item['label'].get('ticker')} @ {item['label'].get('window_min')} min" for item in news]
        labels = [label for label in DIRECTIONS if label in truth or any(label in preds[v] for v in VARIANTS)]
        block, rows = _classification_block(scorer, "news_impact", "News direction", truth, preds, labels, groups)
        tasks["news_impact"] = block
        table.extend(rows)

    # Financial-report Q&A: numeric answer within the label's tolerance.
    qa = [item for item in items if item["task"] == "report_qa" and item.get("label") and "answer" in item["label"]]
    if qa:
        correct: dict[str, list[bool]] = {}
        parsed_ok: dict[str, list[bool]] = {}
        for v in VARIANTS:
            correct[v], parsed_ok[v] = [], []
            for item in qa:
                label = item["label"]
                number = parse_number(outputs[v][item["id"]], label.get("unit"))
                value = number.value if number else None
                ok = M.numeric_correct(value, float(label["answer"]), float(label.get("tolerance", 0.01)))
                correct[v].append(ok)
                parsed_ok[v].append(number is not None)
                per_item[item["id"]][v] = {"parsed": value, "correct": ok}
        arr = {v: np.array(correct[v], dtype=float) for v in VARIANTS}
        prs = {v: np.array(parsed_ok[v], dtype=float) for v in VARIANTS}
        n = len(qa)
        table.append(scorer.row("report_qa.accuracy", "Report Q&A: numeric accuracy", n,
                                lambda i: float(arr["base"][i].mean()), lambda i: float(arr["finetuned"][i].mean()),
                                paired_correct=(correct["base"], correct["finetuned"])))
        table.append(scorer.row("report_qa.parse_rate", "Report Q&A: parse rate", n,
                                lambda i: float(prs["base"][i].mean()), lambda i: float(prs["finetuned"][i].mean())))
        tasks["report_qa"] = {"n": n, "tolerance_rule": "|answer - reference| <= label.tolerance (absolute, in the reference unit)",
                              "metrics": sorted({item["label"].get("metric", "?") for item in qa})}

    # Market analysis: the case named in the answer.
    cases_items = [item for item in items if item["task"] == "market_analysis" and item.get("label") and item["label"].get("case")]
    if cases_items:
        # Every case the builder can label, so an answer naming another case is wrong, not unparsed.
        from finqlora.dataset import labels as builder_labels

        case_names = sorted(set(builder_labels.MARKET_CASES) | {item["label"]["case"] for item in cases_items})
        truth = [item["label"]["case"] for item in cases_items]
        preds = {}
        for v in VARIANTS:
            preds[v] = [_first_named(outputs[v][item["id"]], case_names) for item in cases_items]
            for item, p in zip(cases_items, preds[v]):
                per_item[item["id"]][v] = {"parsed": p, "correct": p == item["label"]["case"]}
        block, rows = _classification_block(scorer, "market_analysis", "Market case", truth, preds, case_names)
        tasks["market_analysis"] = block
        table.extend(rows)

    # Text overlap with the references (every item with a reference text, benchmarks excluded).
    texts = [item for item in items if item["task"] != "benchmark" and item["reference"]]
    if texts:
        n = len(texts)
        rouge = {v: np.array([M.rouge_l(outputs[v][item["id"]], item["reference"]) for item in texts]) for v in VARIANTS}
        stats = {v: [M.bleu_stats(outputs[v][item["id"]], item["reference"]) for item in texts] for v in VARIANTS}
        for v in VARIANTS:
            for item, value in zip(texts, rouge[v]):
                per_item[item["id"]].setdefault(v, {})["rouge_l"] = float(value)
        table.append(scorer.row("overlap.rouge_l", "ROUGE-L F1 vs reference", n,
                                lambda i: float(rouge["base"][i].mean()), lambda i: float(rouge["finetuned"][i].mean())))
        table.append(scorer.row("overlap.bleu", "BLEU-4 vs reference (0-100)", n,
                                lambda i: M.bleu_from_stats([stats["base"][j] for j in i]),
                                lambda i: M.bleu_from_stats([stats["finetuned"][j] for j in i])))
        tasks["overlap"] = {"n": n, "by_type": {
            kind: {v: float(np.mean([rouge[v][k] for k, item in enumerate(texts) if item["task"] == kind])) for v in VARIANTS}
            for kind in sorted({item["task"] for item in texts})
        }}

    # Perplexity of the reference answers and of general text (forgetting).
    for key, name, stem in (
        ("perplexity.reference", "Reference-answer perplexity", "perplexity"),
        ("perplexity.general_text", "Forgetting: general-text perplexity", "forgetting"),
    ):
        rows_by_variant = {v: read_cache(run_dir / f"{stem}_{v}.jsonl") for v in VARIANTS}
        common = sorted(set.intersection(*(set(_by_id(rows_by_variant[v])) for v in VARIANTS)))
        if not common:
            continue
        nll = {v: np.array([_by_id(rows_by_variant[v])[i]["nll"] for i in common]) for v in VARIANTS}
        tok = {v: np.array([_by_id(rows_by_variant[v])[i]["tokens"] for i in common]) for v in VARIANTS}

        def ppl(v: str) -> Callable[[np.ndarray], float]:
            return lambda i: M.perplexity(nll[v][i], tok[v][i])

        table.append(scorer.row(key, name, len(common), ppl("base"), ppl("finetuned"), higher_is_better=False))
        if stem == "forgetting":
            base_ppl, tuned_ppl = table[-1]["base"], table[-1]["finetuned"]
            tasks["forgetting"] = {"texts": len(common), "ratio": tuned_ppl / base_ppl if base_ppl else float("nan"),
                                   "source": "finqlora/resources/general_text.jsonl (written for this project; not finance)"}

    # External benchmarks.
    bench_items: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        if item["task"] == "benchmark":
            bench_items[item["benchmark"]].append(item)
    if bench_items:
        tasks["benchmarks"] = {}
    for name, rows_ in bench_items.items():
        truth = [item["label"]["class"] for item in rows_]
        preds = {}
        for v in VARIANTS:
            preds[v] = [parse_direction(outputs[v][item["id"]]).direction for item in rows_]
            for item, p in zip(rows_, preds[v]):
                per_item[item["id"]][v] = {"parsed": p, "correct": p == item["label"]["class"]}
        labels = rows_[0]["label"]["labels"]
        block, rows = _classification_block(scorer, f"benchmark.{name}", f"Benchmark {name}", truth, preds, labels)
        block["format"] = rows_[0]["benchmark_format"]
        block["display_names"] = rows_[0]["label"].get("display") or {}
        tasks["benchmarks"][name] = block
        table.extend(rows)

    # Generation cost from the cache itself, so a re-run that reused everything still reports it.
    generation_cost = {}
    for v in VARIANTS:
        rows_ = [generations[v][item["id"]] for item in items]
        seconds = sum(row.get("seconds") or 0.0 for row in rows_)
        tokens = sum(row.get("tokens") or 0 for row in rows_)
        generation_cost[v] = {
            "items": len(rows_), "seconds": round(seconds, 2), "new_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
            "hit_max_new_tokens": sum(row.get("finished") is False for row in rows_),
        }
    config = json.loads((run_dir / "eval_config.json").read_text(encoding="utf-8")) if (run_dir / "eval_config.json").exists() else {}
    result = {
        "meta": config,
        "significance_level": SIGNIFICANCE_LEVEL,
        "bootstrap": {"resamples": bootstrap_resamples, "seed": seed, "level": 0.95, "method": "percentile, paired for deltas"},
        "n_items": len(items),
        "items_by_task": {task: sum(item["task"] == task for item in items) for task in sorted({item["task"] for item in items})},
        "generation_cost": generation_cost,
        "table": table,
        "tasks": tasks,
    }
    result = _finite(result)
    atomic_write_json(run_dir / "metrics.json", result)
    atomic_write_jsonl(run_dir / "per_item.jsonl", [{"id": item_id, **scores} for item_id, scores in per_item.items()])
    return result


def _first_named(text: str, names: Sequence[str]) -> str | None:
    positions = [(text.find(name), name) for name in names if name in text]
    return min(positions)[1] if positions else None


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
