"""Before/after evaluation: the base model and the fine-tuned model on the same prompts.

`evaluate(options)` does three things, each resumable:

1. **Items** (`DIR/items.jsonl`): the held-out records (split `test` when the file has
   splits) and the rows of any external benchmark, as prompts + references + labels; items
   of a task with closed options (news direction, market case, benchmark class) also carry
   those options.
2. **Model outputs**, one cache file per kind and variant, appended batch by batch:
   generations (`generations_{base,finetuned}.jsonl`), option scores of choice scoring
   (`choice_*.jsonl`, see `finqlora.evaluate.choice`), perplexities of the reference answers
   (`perplexity_*.jsonl`) and of the shipped general-domain text set (`forgetting_*.jsonl`).
   The base answers come from the same loaded weights with the adapter switched off, the
   same tokenizer and chat template (the adapter's) and the same settings. Where the base is
   not quantized the adapter is then merged into the weights (PEFT `merge_and_unload`) for
   the fine-tuned work, so the fine-tuned model generates as fast as the base (unmerged
   LoRA adds two small matmuls per projection) with the same logits up to float rounding.
   A cached line is reused when its prompt, settings and model key match, so re-running
   never regenerates; an interrupted run continues where it stopped.
3. **Metrics** (`DIR/metrics.json`, `DIR/per_item.jsonl`): computed from the cached files
   only (`finqlora.evaluate.scoring.compute_metrics`) and returned. The report is a later
   stage (`finqlora.report.report.build_report`) that reads them.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finqlora.core.chat_format import record_to_chat, render_prompt
from finqlora.core.config import BENCHMARK_FORMATS, MAX_NEW_TOKENS, EvalConfig, split_benchmark_string
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json, atomic_write_jsonl, read_jsonl, sha256_file
from finqlora.core.lock import lock_enclosing_run
from finqlora.dataset.answer_parser import DIRECTIONS
from finqlora.evaluate import metrics as M
from finqlora.evaluate.benchmarks import CLOZE
from finqlora.evaluate.scoring import SCORING_MODES, VARIANTS, compute_metrics, read_cache

if TYPE_CHECKING:
    from finqlora.core.config import BenchmarkConfig, RunConfig

__all__ = ["BenchmarkSpec", "EvalOptions", "SuiteSpec", "VARIANTS", "SCORING_MODES", "build_items", "compute_metrics", "eval_dtype",
           "evaluate", "general_texts", "load_test_records", "read_cache"]


@dataclass
class BenchmarkSpec:
    path: str
    format: str
    label_map: str | None = None
    split: str | None = None
    limit: int | None = None

    @classmethod
    def from_config(cls, entry: BenchmarkConfig) -> BenchmarkSpec:
        """One `eval.benchmarks` entry of a run config."""
        return cls(entry.path, entry.format, entry.label_map, entry.split, entry.limit)

    @classmethod
    def parse(cls, text: str, fmt: str | None = None, **fields: Any) -> BenchmarkSpec:
        """`FORMAT:PATH` (as in a run config), or a plain PATH with its format given apart."""
        head = text.partition(":")[0]
        if head in BENCHMARK_FORMATS:
            entry = split_benchmark_string(text)
            return cls(entry["path"], entry["format"], **fields)
        if fmt is None:
            raise FinqloraError(f"--benchmark {text} has no format", hint=f"write FORMAT:PATH (FORMAT one of {', '.join(BENCHMARK_FORMATS)}) or add --benchmark-format")
        return cls(text, fmt, **fields)


@dataclass
class SuiteSpec:
    """A suite of public sets (`--suite NAME --suite-set SET=PATH`, or `eval.suite`)."""

    name: str
    sets: dict[str, str]
    limit: int | None = None


def eval_dtype(device: str, compute_dtype: str) -> str:
    """bf16 generation on CPUs with native bf16 matrix units (about 4-6x faster there), as training does."""
    from finqlora.core.hardware import cpu_has_fast_bf16
    from finqlora.models.loading import pick_device

    on_cpu = pick_device(device) == "cpu"
    return "bfloat16" if on_cpu and compute_dtype in ("auto", "bf16") and cpu_has_fast_bf16() else "auto"


@dataclass
class EvalOptions:
    """Everything `finqlora eval` needs; the CLI's defaults are these fields' defaults."""

    output: Path
    model: str | None = None
    adapter: str | None = None
    data: Path | None = None
    split: str = "test"
    max_samples: int | None = None
    benchmarks: list[BenchmarkSpec] = field(default_factory=list)
    suite: SuiteSpec | None = None
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    # One default each, the run config's (core/config.py EvalConfig).
    repetition_penalty: float = EvalConfig.model_fields["repetition_penalty"].default
    no_repeat_ngram_size: int = EvalConfig.model_fields["no_repeat_ngram_size"].default
    seed: int = 0
    batch_size: int = 8
    # Choice scoring runs only prompt tokens (no generation), so larger batches pay: on a 2-core
    # CPU 16 items together scored 6.3-6.9 items/s against 3.7 for 8 (docs/benchmarks.md).
    choice_batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    load_in_4bit: bool | None = None
    chat_template: str | None = None
    perplexity: bool = True
    forgetting: bool = True
    max_length: int = 1024
    bootstrap_resamples: int = 1000
    # Closed-option tasks: "choice" scores options by log-likelihood, "generate" parses the
    # generated answer, "both" does both (open tasks are always generated).
    scoring: str = "both"
    showcase_samples: int = EvalConfig.model_fields["showcase_samples"].default
    # Merge the adapter into unquantized weights for the fine-tuned work (same logits, base speed).
    merge_adapter: bool = True
    progress: bool = True
    # ("base",) scores only the base model (no adapter needed), e.g. before training; a later
    # full run reuses those cached outputs (same prompts, settings, model).
    variants: tuple[str, ...] = VARIANTS

    @classmethod
    def from_run(cls, cfg: RunConfig, *, output: Path, data: Path | None, adapter: str | None = None, variants: Sequence[str] = VARIANTS) -> EvalOptions:
        """The one mapping from a run config (`finqlora run`) to the evaluation's options."""
        return cls(
            output=Path(output),
            model=cfg.train.model,
            adapter=str(adapter) if adapter else None,
            data=Path(data) if data is not None else None,
            split=cfg.eval.split,
            max_samples=cfg.eval.max_samples,
            benchmarks=[BenchmarkSpec.from_config(entry) for entry in cfg.eval.benchmarks],
            suite=SuiteSpec(cfg.eval.suite.name, dict(cfg.eval.suite.sets), cfg.eval.suite.max_items) if cfg.eval.suite else None,
            max_new_tokens=cfg.eval.max_new_tokens,
            temperature=cfg.eval.temperature,
            top_p=cfg.eval.top_p,
            seed=cfg.eval.seed,
            perplexity=cfg.eval.perplexity,
            forgetting=cfg.eval.forgetting,
            merge_adapter=cfg.eval.merge_adapter,
            bootstrap_resamples=cfg.eval.bootstrap_resamples,
            repetition_penalty=cfg.eval.repetition_penalty,
            no_repeat_ngram_size=cfg.eval.no_repeat_ngram_size,
            batch_size=cfg.eval.batch_size,
            choice_batch_size=cfg.eval.choice_batch_size,
            device=cfg.train.device,
            dtype=eval_dtype(cfg.train.device, cfg.train.compute_dtype),
            load_in_4bit=cfg.train.load_in_4bit,
            chat_template=cfg.train.chat_template,
            max_length=max(cfg.train.max_length, 512),
            scoring=cfg.eval.scoring,
            showcase_samples=cfg.eval.showcase_samples,
            variants=tuple(variants),
        )


# ---------------------------------------------------------------------------------------------
# Items


def load_test_records(path: Path, *, split: str = "test", max_samples: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The held-out records: split == `split` when the file has splits, else every record.

    With `max_samples`, a seeded sample stratified by record type (each type keeps its
    share), in file order.
    """
    rows = read_jsonl(path, what="dataset", hint="the dataset is JSONL: one JSON object per line (as written by `finqlora build`)")
    if any("split" in row for row in rows):
        chosen = [row for row in rows if row.get("split") == split]
        if not chosen:
            found = sorted({str(row.get("split")) for row in rows})
            raise FinqloraError(f"{path}: no records with split {split!r} (found: {', '.join(found)})", hint="set eval.split to one of those (`finqlora eval --split`, or --set eval.split=NAME)")
    else:
        chosen = rows
    if max_samples is None or max_samples >= len(chosen):
        return chosen
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
    return [chosen[i] for i in sorted(keep)]


def _record_choice(record: dict[str, Any]) -> dict[str, list[str]] | None:
    """The closed options of a record's task: option texts (what is scored) and their classes."""
    from finqlora.dataset import labels as builder_labels

    label = record.get("label") or {}
    if record.get("type") == "news_impact" and label.get("direction"):
        return {"options": list(DIRECTIONS), "classes": list(DIRECTIONS)}
    if record.get("type") == "market_analysis" and label.get("case") == builder_labels.IMPORTANCE and label.get("relation"):
        # The question names its type; what it asks is how the move compares with the typical one.
        relations = list(builder_labels.RELATIONS)
        return {"options": relations, "classes": relations, "answer_prefix": builder_labels.IMPORTANCE_ANSWER_PREFIX}
    if record.get("type") == "market_analysis" and label.get("case"):
        cases = sorted(set(builder_labels.MARKET_CASES) | {label["case"]})
        return {"options": cases, "classes": cases, "answer_prefix": builder_labels.CASE_ANSWER_PREFIX}
    return None


def _benchmark_choice(benchmark: Any) -> dict[str, list[str]]:
    """A benchmark's options are its own words for its classes (积极/中性/消极 for FinFE); a
    multiple-choice item's are its own letters (set per item in `build_items`)."""
    raw_words: dict[str, Counter] = defaultdict(Counter)
    for row in benchmark.items:
        raw_words[row.label][row.raw_label] += 1
    options = [benchmark.display_names.get(label) or raw_words[label].most_common(1)[0][0] for label in benchmark.labels]
    return {"options": options, "classes": list(benchmark.labels)}


def build_items(records: Sequence[dict[str, Any]], benchmarks: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Prompts, references, labels (and closed options) for every record and benchmark row."""
    items = []
    seen: set[str] = set()
    for number, record in enumerate(records):
        example = record_to_chat(record)
        item_id = str(record.get("id") or f"item-{number}")
        if item_id in seen:
            raise FinqloraError(f"duplicate record id {item_id!r} in the test data", hint="ids must be unique (finqlora build writes unique ids)")
        seen.add(item_id)
        item = {"id": item_id, "task": str(record.get("type") or "other"), "messages": example.messages, "reference": example.answer,
                "label": record.get("label"), "event_id": record.get("event_id"), "event_time": record.get("event_time")}
        choice = _record_choice(record)
        if choice:
            item["choice"] = choice
        items.append(item)
    for benchmark in benchmarks:
        choice = None if benchmark.kind == "multiple_choice" else _benchmark_choice(benchmark)
        cloze = benchmark.formulation == CLOZE
        for row in benchmark.items:
            example = record_to_chat(row.to_record())
            item = {
                "id": f"{benchmark.name}/{row.id}", "task": "benchmark", "benchmark": benchmark.name, "benchmark_format": benchmark.format,
                "messages": example.messages, "reference": row.raw_label,
                # cloze: the option texts are scored, the class is still the option's letter
                "choice": {"options": list(row.cloze.options if cloze else row.options), "classes": list(row.options)} if row.options else choice,
                "label": {"class": row.label, "labels": benchmark.labels, "display": benchmark.display_names, "kind": benchmark.kind},
            }
            if cloze:
                item["formulation"] = CLOZE
            items.append(item)
    return items


def generated_items(items: Sequence[dict[str, Any]], scoring: str, showcase_samples: int = 0) -> list[dict[str, Any]]:
    """The items whose answers are generated: all, except closed-option items under `choice`,
    of which the first `showcase_samples` of each task are still generated (example answers).
    Cloze items never are: asked without letters, their free answers have nothing to parse."""
    items = [item for item in items if item.get("formulation") != CLOZE]
    if scoring != "choice":
        return items
    shown: Counter[str] = Counter()
    chosen = []
    for item in items:
        task = item.get("benchmark") or item["task"]
        if "choice" not in item or shown[task] < showcase_samples:
            chosen.append(item)
            shown[task] += "choice" in item
    return chosen


def general_texts() -> list[dict[str, str]]:
    """The shipped general-domain (not finance) Chinese + English passages for forgetting."""
    text = resources.files("finqlora").joinpath("resources/general_text.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Model outputs with a cache


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _model_keys(loaded: Any, adapter: str | None, merged: bool) -> dict[str, str]:
    base = f"{loaded.resolved.base_id}|{loaded.dtype}"
    keys = {"base": base}
    if adapter is not None:
        weights = Path(adapter) / "adapter_model.safetensors"
        fingerprint = sha256_file(weights)[:16] if weights.exists() else _sha(str(Path(adapter).resolve()))
        keys["finetuned"] = f"{base}|adapter:{fingerprint}" + ("|merged" if merged else "")
    return keys


def _progress_bar(progress: bool, label: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress)
    task = bar.add_task(label, total=total)
    return bar, lambda n: bar.advance(task, n)


def _generate_cached(loaded: Any, items: Sequence[dict[str, Any]], variant: str, model_key: str, settings: Any,
                     cache_path: Path, batch_size: int, progress: bool) -> dict[str, Any]:
    """Fill `cache_path` with one generation per item; returns timing facts."""
    from finqlora.models.generation import generate

    settings_key = _sha(asdict(settings))
    prompts = {item["id"]: render_prompt(loaded.tokenizer, item["messages"]) for item in items}
    wanted = {item["id"]: _sha([prompts[item["id"]], settings_key, model_key]) for item in items}
    cached = {row["id"]: row for row in read_cache(cache_path) if row.get("cache_key") == wanted.get(row.get("id"))}
    todo = sorted((item for item in items if item["id"] not in cached), key=lambda item: len(prompts[item["id"]]))  # less padding
    started = time.perf_counter()
    generated_tokens = 0
    if todo:
        bar, advance = _progress_bar(progress, f"generating ({variant})", len(todo))
        with bar, cache_path.open("a", encoding="utf-8") as handle:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                batch_started = time.perf_counter()
                answers = generate(loaded.model, loaded.tokenizer, [item["messages"] for item in batch], settings, batch_size=batch_size, progress=False)
                seconds = (time.perf_counter() - batch_started) / len(batch)
                for item, answer in zip(batch, answers):
                    generated_tokens += answer.new_tokens
                    cached[item["id"]] = row = {"id": item["id"], "output": answer.text, "tokens": answer.new_tokens, "finished": answer.finished,
                                                "seconds": round(seconds, 3), "cache_key": wanted[item["id"]], "model": model_key}
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                handle.flush()
                advance(len(batch))
    elapsed = time.perf_counter() - started
    # Rewrite in item order without stale lines (atomic), so the file reads cleanly.
    atomic_write_jsonl(cache_path, [cached[item["id"]] for item in items])
    return {"generated": len(todo), "reused": len(items) - len(todo), "seconds": round(elapsed, 2), "tokens": generated_tokens,
            "tokens_per_s": round(generated_tokens / elapsed, 2) if todo and elapsed > 0 else None}


def _scores_cached(compute: Callable[[list[dict[str, Any]]], list[dict[str, Any]]], items: Sequence[dict[str, Any]],
                   keys: dict[str, str], cache_path: Path) -> int:
    """Fill `cache_path` with `compute`'s row for each item whose key changed; returns how many ran."""
    cached = {row["id"]: row for row in read_cache(cache_path) if row.get("cache_key") == keys.get(row.get("id"))}
    todo = [item for item in items if item["id"] not in cached]
    if todo:
        for item, row in zip(todo, compute(todo)):
            cached[item["id"]] = {"id": item["id"], **row, "cache_key": keys[item["id"]]}
    atomic_write_jsonl(cache_path, [cached[item["id"]] for item in items if item["id"] in cached])
    return len(todo)


def _timed_scores(label: str, progress: bool, run: Callable[[list[dict[str, Any]], Callable[[int], None]], list[dict[str, Any]]],
                  items: Sequence[dict[str, Any]], keys: dict[str, str], cache_path: Path) -> dict[str, Any]:
    started = time.perf_counter()

    def compute(todo: list[dict[str, Any]]) -> list[dict[str, Any]]:
        bar, advance = _progress_bar(progress, label, len(todo))
        with bar:
            return run(todo, advance)

    scored = _scores_cached(compute, items, keys, cache_path)
    seconds = time.perf_counter() - started
    return {"scored": scored, "reused": len(items) - scored, "seconds": round(seconds, 2),
            "items_per_s": round(scored / seconds, 2) if scored and seconds > 0 else None}


def _score_variant(loaded: Any, items: list[dict[str, Any]], variant: str, model_key: str, settings: Any, options: EvalOptions) -> dict[str, Any]:
    """Every cache of one variant: generations, choice scores, perplexities."""
    output, progress = Path(options.output), options.progress
    timings: dict[str, Any] = {}
    to_generate = generated_items(items, options.scoring, options.showcase_samples)
    if to_generate:
        timings[f"generate_{variant}"] = _generate_cached(
            loaded, to_generate, variant, model_key, settings, output / f"generations_{variant}.jsonl", options.batch_size, progress)
    closed = [item for item in items if "choice" in item] if options.scoring != "generate" else []
    if closed:
        from finqlora.evaluate.choice import NORMALISATION, score_choices

        def choices(todo: list[dict[str, Any]], advance: Callable[[int], None]) -> list[dict[str, Any]]:
            results = score_choices(loaded.model, loaded.tokenizer, [(item["messages"], item["choice"]["options"]) for item in todo],
                                    answer_prefixes=[item["choice"].get("answer_prefix", "") for item in todo],
                                    batch_size=options.choice_batch_size, max_prompt_tokens=options.max_length, progress=advance)
            return [{"choice": r.choice, "scores": r.scores, "token_logprobs": r.token_logprobs} for r in results]

        keys = {item["id"]: _sha([item["messages"], item["choice"]["options"], item["choice"].get("answer_prefix", ""), model_key, options.max_length,
                                  NORMALISATION]) for item in closed}
        timings[f"choice_{variant}"] = _timed_scores(f"choice scoring ({variant})", progress, choices, closed, keys, output / f"choice_{variant}.jsonl")
    if options.perplexity:
        scored = [item for item in items if item["task"] != "benchmark" and item["reference"]]

        def answer_nll(todo: list[dict[str, Any]], advance: Callable[[int], None]) -> list[dict[str, Any]]:
            records = [{"messages": item["messages"] + [{"role": "assistant", "content": item["reference"]}]} for item in todo]
            nll = M.answer_nll(loaded.model, loaded.tokenizer, records, max_length=options.max_length, batch_size=options.batch_size, progress=advance)
            return [{"nll": value, "tokens": count} for value, count in nll]

        keys = {item["id"]: _sha([item["messages"], item["reference"], model_key, options.max_length]) for item in scored}
        timings[f"perplexity_{variant}"] = _timed_scores(f"answer perplexity ({variant})", progress, answer_nll, scored, keys, output / f"perplexity_{variant}.jsonl")
    if options.forgetting:
        texts = general_texts()

        def text_nll(todo: list[dict[str, Any]], advance: Callable[[int], None]) -> list[dict[str, Any]]:
            nll = M.text_nll(loaded.model, loaded.tokenizer, [row["text"] for row in todo], batch_size=options.batch_size, progress=advance)
            return [{"nll": value, "tokens": count} for value, count in nll]

        keys = {row["id"]: _sha([row["text"], model_key]) for row in texts}
        timings[f"forgetting_{variant}"] = _timed_scores(f"general-text perplexity ({variant})", progress, text_nll, texts, keys, output / f"forgetting_{variant}.jsonl")
    return timings


# ---------------------------------------------------------------------------------------------
# The run


def _check_options(options: EvalOptions) -> tuple[str | None, str]:
    """(adapter or None, base model spec) after the checks that need no model."""
    from finqlora.models.loading import adapter_base_model

    if options.data is None and not options.benchmarks and options.suite is None:
        raise FinqloraError("nothing to evaluate", hint="pass --data test.jsonl (from finqlora build), --benchmark FORMAT:PATH and/or --suite finance-zh")
    unknown = set(options.variants) - set(VARIANTS)
    if unknown or not options.variants:
        raise FinqloraError(f"unknown variants {sorted(unknown)}", hint="use base and/or finetuned")
    if options.scoring not in SCORING_MODES:
        raise FinqloraError(f"unknown scoring {options.scoring!r}", hint=f"use one of: {', '.join(SCORING_MODES)}")
    if "finetuned" in options.variants and not options.adapter:
        raise FinqloraError(
            "no --adapter given: the evaluation compares the base model with the fine-tuned one",
            hint="pass --adapter OUTPUT_DIR of `finqlora train` (the base model defaults to the one it was trained on)",
        )
    adapter = options.adapter if "finetuned" in options.variants else None
    model_spec = options.model or (adapter_base_model(adapter) if adapter else None)
    if not model_spec:
        raise FinqloraError("no base model given", hint="pass --model (e.g. builtin:qwen2.5-coder-0.5b-instruct) or an --adapter that records its base")
    return adapter, model_spec


def _load_items(options: EvalOptions) -> list[dict[str, Any]]:
    from finqlora.evaluate.benchmarks import load_benchmark, parse_label_map

    records = load_test_records(Path(options.data), split=options.split, max_samples=options.max_samples, seed=options.seed) if options.data else []
    benchmarks = [
        load_benchmark(spec.path, spec.format, label_map=parse_label_map(spec.label_map), split=spec.split, limit=spec.limit, seed=options.seed)
        for spec in options.benchmarks
    ]
    if options.suite is not None:
        from finqlora.evaluate.suite import load_suite

        suite = load_suite(options.suite.name, options.suite.sets, limit=options.suite.limit, seed=options.seed)
        clash = {b.name for b in benchmarks} & {b.name for b in suite}
        if clash:
            raise FinqloraError(f"benchmark name(s) {', '.join(sorted(clash))} also name suite sets", hint="drop the --benchmark that the suite already scores")
        benchmarks += suite
    return build_items(records, benchmarks)


def generation_speed(timings: dict[str, Any]) -> dict[str, Any] | None:
    """Base and fine-tuned tokens/s measured in this run, and their ratio (>= 0.9 is the goal)."""
    base, tuned = (timings.get(f"generate_{v}", {}).get("tokens_per_s") for v in VARIANTS)
    if not base or not tuned:
        return None
    return {"base_tokens_per_s": base, "finetuned_tokens_per_s": tuned, "ratio": round(tuned / base, 3)}


def _meta(options: EvalOptions, model_spec: str, adapter: str | None, loaded: Any, settings: Any, timings: dict[str, Any], merged: bool) -> dict[str, Any]:
    from finqlora.core.versions import RECORDED_LIBRARIES, library_versions

    return {
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": model_spec,
        "base_id": loaded.resolved.base_id,
        "adapter": str(Path(adapter).resolve()) if adapter else None,
        "adapter_merged": merged,
        "data": str(Path(options.data).resolve()) if options.data else None,
        "data_sha256": sha256_file(options.data) if options.data else None,
        "split": options.split,
        "max_samples": options.max_samples,
        "benchmarks": [asdict(spec) for spec in options.benchmarks],
        "suite": asdict(options.suite) if options.suite else None,
        "scoring": options.scoring,
        "generation": asdict(settings),
        "batch_size": options.batch_size,
        "choice_batch_size": options.choice_batch_size,
        "device": loaded.device,
        "dtype": str(loaded.dtype),
        "load_in_4bit": loaded.load_in_4bit,
        "chat_template_sha256": hashlib.sha256((loaded.tokenizer.chat_template or "").encode("utf-8")).hexdigest()[:16],
        "timings": timings,
        "versions": library_versions((*RECORDED_LIBRARIES, "sacrebleu")),
    }


def evaluate(options: EvalOptions) -> dict[str, Any]:
    """Run (or resume) the evaluation; write and return metrics.json (no report: see module doc).

    Refused while another process holds the run folder the output lies in (finqlora.core.lock).
    """
    with lock_enclosing_run(Path(options.output)):
        return _evaluate(options)


def _evaluate(options: EvalOptions) -> dict[str, Any]:
    from finqlora.models.generation import GenerationSettings
    from finqlora.models.loading import load_model

    adapter, model_spec = _check_options(options)
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    items = _load_items(options)
    atomic_write_jsonl(output / "items.jsonl", items)

    load_started = time.perf_counter()
    loaded = load_model(model_spec, adapter=adapter, device=options.device, dtype=options.dtype,
                        load_in_4bit=options.load_in_4bit, chat_template=options.chat_template, progress=options.progress)
    timings: dict[str, Any] = {"model_load_s": round(time.perf_counter() - load_started, 2)}
    settings = GenerationSettings(max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
                                  repetition_penalty=options.repetition_penalty, no_repeat_ngram_size=options.no_repeat_ngram_size,
                                  seed=options.seed)
    merged = adapter is not None and options.merge_adapter and not loaded.load_in_4bit
    keys = _model_keys(loaded, adapter, merged)
    variants = [v for v in VARIANTS if v in options.variants]
    for variant in variants:
        if variant == "base":
            with loaded.base_only():
                timings.update(_score_variant(loaded, items, variant, keys[variant], settings, options))
            continue
        if merged:
            # The base's work is done: fold the adapter into the weights (in place, no second copy).
            started = time.perf_counter()
            loaded.model = loaded.model.merge_and_unload()
            timings["merge_adapter_s"] = round(time.perf_counter() - started, 2)
        timings.update(_score_variant(loaded, items, variant, keys[variant], settings, options))
    speed = generation_speed(timings)
    if speed:
        timings["generation_speed"] = speed
    meta = _meta(options, model_spec, adapter, loaded, settings, timings, merged)
    del loaded
    if variants != list(VARIANTS):
        # Only part of the comparison exists yet: keep the cache, leave the metrics for the full run.
        atomic_write_json(output / f"eval_config_{variants[0]}.json", meta)
        return {"meta": meta, "variants": variants}
    atomic_write_json(output / "eval_config.json", meta)
    return compute_metrics(output, bootstrap_resamples=options.bootstrap_resamples, seed=options.seed)
