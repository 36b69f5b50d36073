"""The stages of `finqlora run`, each a thin call into the module that owns the work.

`finqlora.pipeline.engine` decides what runs; this module says, for each stage, what it reads (its
inputs, fingerprinted), what it does, and what it writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from finqlora.core.config import RunConfig, dump_config
from finqlora.core.errors import FinqloraError
from finqlora.pipeline.engine import RunPaths, Stage, fingerprint_path

# Training writes these at the top of the run folder; their fingerprints stand for "the adapter".
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "training_info.json")


def config_yaml(config: RunConfig) -> str:
    return "# The resolved configuration of this run (finqlora run writes it; rerun with --config this file)\n" + dump_config(config)


def database_path(config: RunConfig, paths: RunPaths) -> Path:
    if config.data.db == "sample":
        return paths.sample_db
    path = Path(config.data.db)
    if not path.is_file():
        raise FinqloraError(
            f"database not found: {path} (data.db in the config)",
            hint="pass the path of your finance_analysis.db, or data.db: sample for the built-in synthetic sample",
        )
    return path


def _eval_dtype(config: RunConfig) -> str:
    """bf16 generation on CPUs with native bf16 matrix units (about 4-6x faster there), as training does."""
    from finqlora.models.loading import pick_device
    from finqlora.train.speedups import cpu_has_fast_bf16

    on_cpu = pick_device(config.train.device) == "cpu"
    return "bfloat16" if on_cpu and config.train.compute_dtype in ("auto", "bf16") and cpu_has_fast_bf16() else "auto"


def _eval_options(config: RunConfig, paths: RunPaths, *, adapter: Path | None):
    from finqlora.evaluate.evaluation import EvalOptions

    return EvalOptions(
        output=paths.eval_dir,
        model=config.train.model,
        adapter=str(adapter) if adapter else None,
        data=paths.dataset,
        max_samples=config.eval.max_prompts,
        max_new_tokens=config.eval.max_new_tokens,
        temperature=config.eval.temperature,
        batch_size=config.eval.batch_size,
        device=config.train.device,
        dtype=_eval_dtype(config),
        load_in_4bit=config.train.load_in_4bit,
        chat_template=config.train.chat_template,
        max_length=max(config.train.max_length, 512),
        report=False,
    )


def make_stages(config: RunConfig, paths: RunPaths) -> list[Stage]:
    data, train_cfg, eval_cfg = config.data, config.train, config.eval
    eval_files = ("items.jsonl", "generations_base.jsonl")

    def db_fingerprint() -> str:
        return fingerprint_path(database_path(config, paths))

    # -- database ---------------------------------------------------------------------------
    def database_inputs() -> dict[str, Any]:
        if data.db == "sample":
            return {"db": "sample", "seed": data.seed}
        return {"db": str(Path(data.db).resolve()), "content": db_fingerprint()}

    def database_run(_resume: bool) -> dict[str, Any]:
        from finqlora.store.sample_db import build_sample_db
        from finqlora.store.stats import store_stats

        path = database_path(config, paths) if data.db != "sample" else build_sample_db(paths.sample_db, seed=data.seed, overwrite=True)
        stats = store_stats(path)
        return {"database": str(path), "events": stats.events, "synthetic": stats.synthetic}

    # -- check ------------------------------------------------------------------------------
    def check_run(_resume: bool) -> dict[str, Any]:
        from finqlora.store.db import check_db

        report = check_db(database_path(config, paths))
        if not report.ok:
            problems = "; ".join(p.describe() for p in report.problems if p.severity == "fatal")
            raise FinqloraError(
                f"{report.path} cannot feed the pipeline: {problems}",
                hint=f"see `finqlora db check --db {report.path}`; `--migrate` adds what finqlora can add (after a backup)",
            )
        return {"warnings": [p.describe() for p in report.problems], "counts": report.counts}

    # -- build ------------------------------------------------------------------------------
    def build_inputs() -> dict[str, Any]:
        return {"data": data.model_dump(), "db": db_fingerprint(), "tokenizer": data.tokenizer or train_cfg.model, "max_length": train_cfg.max_length}

    def build_run(_resume: bool) -> dict[str, Any]:
        from finqlora.dataset.builder import BuildConfig, build_dataset

        result = build_dataset(
            BuildConfig(
                output=paths.dataset,
                db=database_path(config, paths),
                num_samples=data.num_samples,
                seed=data.seed,
                output_format=data.format,
                tokenizer=data.tokenizer or train_cfg.model,
                max_length=train_cfg.max_length,
            )
        )
        for notice in result.notices:
            print(f"  note: {notice}")
        return {"records": len(result.records), "by_split": result.stats.get("by_split")}

    def build_outputs() -> list[Path]:
        return [paths.dataset]

    # -- evaluation of the base model -------------------------------------------------------
    def eval_inputs() -> dict[str, Any]:
        return {"dataset": fingerprint_path(paths.dataset), "eval": eval_cfg.model_dump(), "model": train_cfg.model}

    def eval_base_run(_resume: bool) -> dict[str, Any]:
        from dataclasses import replace

        from finqlora.evaluate.evaluation import evaluate

        result = evaluate(replace(_eval_options(config, paths, adapter=None), variants=("base",)))
        return {"timings": result["meta"].get("timings", {})}

    # -- training ---------------------------------------------------------------------------
    def train_inputs() -> dict[str, Any]:
        settings = train_cfg.model_dump(exclude={"dataset", "output_dir", "resume_from_checkpoint"})
        return {"dataset": fingerprint_path(paths.dataset), "train": settings}

    def train_run(interrupted: bool) -> dict[str, Any]:
        from finqlora.train.training import train

        if not interrupted:
            # Old checkpoints belong to another configuration or a finished run: never resume them.
            for folder in paths.adapter.glob("checkpoint-*"):
                shutil.rmtree(folder, ignore_errors=True)
        run_cfg = config.model_copy(deep=True)
        run_cfg.train.dataset = str(paths.dataset)
        run_cfg.train.output_dir = str(paths.adapter)
        run_cfg.train.resume_from_checkpoint = "auto" if interrupted else None
        result = train(run_cfg)
        if result.status != "completed":
            raise FinqloraError(
                f"training was interrupted at step {result.global_step}; a checkpoint was saved",
                hint="run the same `finqlora run` command again to resume from it",
            )
        return {"steps": result.global_step, "best_step": result.best_step, "best_val_loss": result.best_val_loss,
                "final_train_loss": result.final_train_loss, "resumed": interrupted}

    def train_outputs() -> list[Path]:
        return [paths.adapter / name for name in ADAPTER_FILES]

    # -- evaluation of the fine-tuned model -------------------------------------------------
    def eval_ft_inputs() -> dict[str, Any]:
        return {**eval_inputs(), "adapter": [fingerprint_path(paths.adapter / name) for name in ADAPTER_FILES[:2]]}

    def eval_ft_run(_resume: bool) -> dict[str, Any]:
        from finqlora.evaluate.evaluation import evaluate

        metrics = evaluate(_eval_options(config, paths, adapter=paths.adapter))
        return {"metrics": str(paths.eval_dir / "metrics.json"), "rows": len(metrics.get("table", []))}

    # -- report -----------------------------------------------------------------------------
    def report_inputs() -> dict[str, Any]:
        # The caches the metrics come from, not metrics.json, which the report itself enriches.
        caches = [fingerprint_path(paths.eval_dir / name) for name in (*eval_files, "generations_finetuned.jsonl")]
        return {"eval": caches, "training": fingerprint_path(paths.adapter / "training_info.json")}

    def report_run(_resume: bool) -> dict[str, Any]:
        from finqlora.report.report import build_report

        report = build_report(paths.eval_dir, paths.report_dir, training_dir=paths.adapter, title=f"finqlora run: {config.name}", recompute=False)
        return {"html": str(report.html)}

    return [
        Stage("database", database_inputs, database_run, lambda: [paths.sample_db] if data.db == "sample" else []),
        Stage("check", lambda: {"db": db_fingerprint()}, check_run, lambda: []),
        Stage("build", build_inputs, build_run, build_outputs),
        Stage("eval_base", eval_inputs, eval_base_run, lambda: [paths.eval_dir / name for name in eval_files]),
        Stage("train", train_inputs, train_run, train_outputs),
        Stage("eval_finetuned", eval_ft_inputs, eval_ft_run, lambda: [paths.eval_dir / "generations_finetuned.jsonl"]),
        Stage("report", report_inputs, report_run, lambda: [paths.report_dir / "report.html", paths.report_dir / "report.md"]),
    ]


def headline(paths: RunPaths) -> dict[str, Any]:
    """The before/after numbers worth a line in the summary (from metrics.json, if any)."""
    metrics_file = paths.eval_dir / "metrics.json"
    if not metrics_file.exists():
        return {}
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    return {row["key"]: row for row in metrics.get("table", []) if "key" in row}
