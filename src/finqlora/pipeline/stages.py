"""The stages of `finqlora run`, each a thin call into the stage package that owns the work.

`finqlora.pipeline.engine` decides what runs; this module says, for each stage, what it reads
(its inputs, fingerprinted), what it does, and what it writes. Each stage is a small class of
module-level methods over a `StageContext`; the mapping from the run config to a stage's
options lives with those options (`BuildConfig.from_run`, `EvalOptions.from_run`), not here.

    engine.run_pipeline(config, make_stages, headline=headline)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finqlora.core.config import RunConfig
from finqlora.core.errors import FinqloraError
from finqlora.pipeline.engine import STAGES, RunPaths, Stage, fingerprint_path

# Training writes these at the top of the run folder; their fingerprints stand for "the adapter".
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "training_info.json")
# What the base model's evaluation leaves for the fine-tuned one and the report.
BASE_EVAL_FILES = ("items.jsonl", "generations_base.jsonl")


@dataclass(frozen=True)
class StageContext:
    """What every stage reads: the resolved run config and the run folder's paths."""

    config: RunConfig
    paths: RunPaths

    def database(self) -> Path:
        if self.config.data.db == "sample":
            return self.paths.sample_db
        path = Path(self.config.data.db)
        if not path.is_file():
            raise FinqloraError(
                f"database not found: {path} (data.db in the config)",
                hint="pass the path of your finance_analysis.db, or data.db: sample for the built-in synthetic sample",
            )
        return path

    def database_fingerprint(self) -> str:
        return fingerprint_path(self.database())


class DatabaseStage:
    """The user's database, or the generated synthetic sample."""

    name = "database"

    @staticmethod
    def inputs(ctx: StageContext) -> dict[str, Any]:
        data = ctx.config.data
        if data.db == "sample":
            return {"db": "sample", "seed": data.seed}
        return {"db": str(Path(data.db).resolve()), "content": ctx.database_fingerprint()}

    @staticmethod
    def run(ctx: StageContext, _resume: bool) -> dict[str, Any]:
        from finqlora.store.sample_db import build_sample_db
        from finqlora.store.stats import store_stats

        data = ctx.config.data
        path = ctx.database() if data.db != "sample" else build_sample_db(ctx.paths.sample_db, seed=data.seed, overwrite=True)
        stats = store_stats(path)
        return {"database": str(path), "events": stats.events, "synthetic": stats.synthetic}

    @staticmethod
    def outputs(ctx: StageContext) -> list[Path]:
        return [ctx.paths.sample_db] if ctx.config.data.db == "sample" else []


class CheckStage:
    """`db check`: refuse a database the pipeline cannot use."""

    name = "check"

    @staticmethod
    def inputs(ctx: StageContext) -> dict[str, Any]:
        return {"db": ctx.database_fingerprint()}

    @staticmethod
    def run(ctx: StageContext, _resume: bool) -> dict[str, Any]:
        from finqlora.store.db import check_db

        report = check_db(ctx.database())
        if not report.ok:
            problems = "; ".join(p.describe() for p in report.problems if p.severity == "fatal")
            raise FinqloraError(
                f"{report.path} cannot feed the pipeline: {problems}",
                hint=f"see `finqlora db check --db {report.path}`; `--migrate` adds what finqlora can add (after a backup)",
            )
        return {"warnings": [p.describe() for p in report.problems], "counts": report.counts}

    @staticmethod
    def outputs(_ctx: StageContext) -> list[Path]:
        return []


class BuildStage:
    """The instruction dataset (train/val/test by event time)."""

    name = "build"

    @staticmethod
    def inputs(ctx: StageContext) -> dict[str, Any]:
        data, train = ctx.config.data, ctx.config.train
        return {"data": data.model_dump(), "db": ctx.database_fingerprint(), "tokenizer": data.tokenizer or train.model,
                "max_length": train.max_length}

    @staticmethod
    def run(ctx: StageContext, _resume: bool) -> dict[str, Any]:
        from finqlora.dataset.build_config import BuildConfig
        from finqlora.dataset.builder import build_dataset
        from finqlora.dataset.teacher import enrich_from_config

        data = ctx.config.data
        result = build_dataset(BuildConfig.from_run(ctx.config, db=None if data.templates_only else ctx.database(), output=ctx.paths.dataset))
        for notice in result.notices:
            print(f"  note: {notice}")
        enrich_from_config(ctx.paths.dataset, data, progress=False)
        return {"records": len(result.records), "by_split": result.stats.get("by_split")}

    @staticmethod
    def outputs(ctx: StageContext) -> list[Path]:
        return [ctx.paths.dataset]


class EvalBaseStage:
    """The base model on the test prompts (generations cached for the fine-tuned run)."""

    name = "eval_base"

    @staticmethod
    def inputs(ctx: StageContext) -> dict[str, Any]:
        # The report's language is the report stage's input only: a new one must not rerun the models.
        return {"dataset": fingerprint_path(ctx.paths.dataset), "eval": ctx.config.eval.model_dump(exclude={"report_lang"}),
                "model": ctx.config.train.model}

    @staticmethod
    def run(ctx: StageContext, _resume: bool) -> dict[str, Any]:
        from finqlora.evaluate.evaluation import EvalOptions, evaluate

        options = EvalOptions.from_run(ctx.config, output=ctx.paths.eval_dir, data=ctx.paths.dataset, variants=("base",))
        result = evaluate(options)
        return {"timings": result["meta"].get("timings", {})}

    @staticmethod
    def outputs(ctx: StageContext) -> list[Path]:
        return [ctx.paths.eval_dir / name for name in BASE_EVAL_FILES]


class TrainStage:
    """LoRA / QLoRA fine-tuning (resumes an interrupted run)."""

    name = "train"

    @staticmethod
    def inputs(ctx: StageContext) -> dict[str, Any]:
        settings = ctx.config.train.model_dump(exclude={"dataset", "output_dir", "resume_from_checkpoint"})
        return {"dataset": fingerprint_path(ctx.paths.dataset), "train": settings}

    @staticmethod
    def run(ctx: StageContext, interrupted: bool) -> dict[str, Any]:
        from finqlora.train.checkpoints import fingerprint_differences, list_checkpoints, training_fingerprint
        from finqlora.train.training import train

        paths = ctx.paths
        run_cfg = ctx.config.model_copy(deep=True)
        run_cfg.train.dataset = str(paths.dataset)
        run_cfg.train.output_dir = str(paths.adapter)
        run_cfg.train.resume_from_checkpoint = "auto" if interrupted else None
        fingerprint = training_fingerprint(run_cfg.train, fingerprint_path(paths.dataset))
        for _, folder in list_checkpoints(paths.adapter):
            if not interrupted:
                shutil.rmtree(folder, ignore_errors=True)  # a fresh start resumes nothing
                continue
            # An interrupted run resumes only its own checkpoints, told by the settings and data
            # each one records, not by the state file: a run killed after the engine marked this
            # stage "started" but before the cleanup above left another configuration's
            # checkpoints here, and they must never pass for this run's.
            stale = fingerprint_differences(folder, fingerprint)
            if stale is not None:
                print(f"  note: removing {folder.name}, it is not this configuration's: {stale}")
                shutil.rmtree(folder, ignore_errors=True)
        result = train(run_cfg)
        if result.status != "completed":
            raise FinqloraError(
                f"training was interrupted at step {result.global_step}; a checkpoint was saved",
                hint="run the same `finqlora run` command again to resume from it",
            )
        return {"steps": result.global_step, "best_step": result.best_step, "best_val_loss": result.best_val_loss,
                "final_train_loss": result.final_train_loss, "resumed": result.info.get("resumed_from") is not None}

    @staticmethod
    def outputs(ctx: StageContext) -> list[Path]:
        return [ctx.paths.adapter / name for name in ADAPTER_FILES]


class EvalFinetunedStage:
    """The fine-tuned model on the same prompts, then the metrics."""

    name = "eval_finetuned"

    @staticmethod
    def inputs(ctx: StageContext) -> dict[str, Any]:
        adapter = [fingerprint_path(ctx.paths.adapter / name) for name in ADAPTER_FILES[:2]]
        return {**EvalBaseStage.inputs(ctx), "adapter": adapter}

    @staticmethod
    def run(ctx: StageContext, _resume: bool) -> dict[str, Any]:
        from finqlora.evaluate.evaluation import EvalOptions, evaluate

        paths = ctx.paths
        metrics = evaluate(EvalOptions.from_run(ctx.config, output=paths.eval_dir, data=paths.dataset, adapter=str(paths.adapter)))
        return {"metrics": str(paths.eval_dir / "metrics.json"), "rows": len(metrics.get("table", []))}

    @staticmethod
    def outputs(ctx: StageContext) -> list[Path]:
        return [ctx.paths.eval_dir / "generations_finetuned.jsonl"]


class ReportStage:
    """report.html / report.md from the evaluation's metrics.json and the training log."""

    name = "report"

    @staticmethod
    def inputs(ctx: StageContext) -> dict[str, Any]:
        eval_dir = ctx.paths.eval_dir
        caches = [fingerprint_path(eval_dir / name) for name in (*BASE_EVAL_FILES, "generations_finetuned.jsonl", "metrics.json")]
        return {"eval": caches, "training": fingerprint_path(ctx.paths.adapter / "training_info.json"), "lang": ctx.config.eval.report_lang}

    @staticmethod
    def run(ctx: StageContext, _resume: bool) -> dict[str, Any]:
        from finqlora.report import i18n
        from finqlora.report.report import build_report

        paths, lang = ctx.paths, ctx.config.eval.report_lang
        title = i18n.text(lang, "run_title", name=ctx.config.name, model=ctx.config.train.model)
        report = build_report(paths.eval_dir, paths.report_dir, training_dir=paths.adapter, title=title, lang=lang)
        return {"html": str(report.html)}

    @staticmethod
    def outputs(ctx: StageContext) -> list[Path]:
        return [ctx.paths.report_dir / "report.html", ctx.paths.report_dir / "report.md"]


STAGE_CLASSES = (DatabaseStage, CheckStage, BuildStage, EvalBaseStage, TrainStage, EvalFinetunedStage, ReportStage)


def _bind(stage: type, ctx: StageContext) -> Stage:
    return Stage(
        stage.name,
        inputs=lambda: stage.inputs(ctx),
        run=lambda resume: stage.run(ctx, resume),
        outputs=lambda: stage.outputs(ctx),
    )


def make_stages(config: RunConfig, paths: RunPaths) -> list[Stage]:
    """The stages of `finqlora run` over `paths`, in the engine's order (`engine.STAGES`)."""
    ctx = StageContext(config, paths)
    stages = [_bind(stage, ctx) for stage in STAGE_CLASSES]
    assert tuple(s.name for s in stages) == STAGES, "engine.STAGES and STAGE_CLASSES disagree"
    return stages


def headline(paths: RunPaths) -> dict[str, Any]:
    """The before/after numbers worth a line in the summary (from metrics.json, if any)."""
    metrics_file = paths.eval_dir / "metrics.json"
    if not metrics_file.exists():
        return {}
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    return {row["key"]: row for row in metrics.get("table", []) if "key" in row}
