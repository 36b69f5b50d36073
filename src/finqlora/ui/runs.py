"""What the Runs page shows about a run folder, read from the files the pipeline writes.

Nothing here runs a model: the stage status comes from `pipeline_state.json`, the loss curve
and the live step from `training_log.jsonl` (appended at every logged step), the final numbers
from `training_info.json` and `eval/metrics.json`, the evaluation's progress from how many lines
its generation caches have, and the dataset card from `dataset/instructions.card.md`.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from finqlora.core.fileio import iter_jsonl
from finqlora.core.safe_input import yaml_load
from finqlora.pipeline.engine import STAGES, STATE_FILE, RunPaths
from finqlora.report import i18n
from finqlora.report.report import format_delta, format_delta_interval, format_interval, format_p, format_value, render_markdown

# Files that make a folder a run folder (any one of them).
RUN_MARKERS = (STATE_FILE, "training_info.json", "training_log.jsonl", "eval/items.jsonl", "items.jsonl")
STAGE_LABELS = {
    "database": "数据库", "check": "检查", "build": "构建数据集", "eval_base": "评估基座模型",
    "train": "训练", "eval_finetuned": "评估微调模型", "report": "报告",
}


def is_run_folder(folder: Path) -> bool:
    return folder.is_dir() and any((folder / marker).exists() for marker in RUN_MARKERS)


def eval_dir_of(run_dir: Path) -> Path | None:
    """The run's evaluation folder: `eval/` of a pipeline run, or the folder of `finqlora eval --output`."""
    for candidate in (RunPaths(run_dir).eval_dir, run_dir):
        if (candidate / "items.jsonl").is_file():
            return candidate
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep to be ours
        return None  # absent, or being replaced right now (atomic writes make this rare)
    return value if isinstance(value, dict) else None


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError:
        return 0


def _epoch_seconds(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def training_log(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "training_log.jsonl"
    if not path.is_file():
        return []
    # The trainer appends while we read: a half-written last line is skipped, not an error.
    return [row for _number, row in iter_jsonl(path, what="training log", torn_tail=True)]


def loss_points(run_dir: Path, info: dict[str, Any] | None) -> dict[str, list[list[float]]]:
    """Train and validation loss as [step, loss] pairs: the live log, else training_info.json."""
    rows = training_log(run_dir)
    train = [[row["step"], row["loss"]] for row in rows if isinstance(row.get("loss"), (int, float))]
    val = [[row["step"], row["eval_loss"]] for row in rows if isinstance(row.get("eval_loss"), (int, float))]
    if not train and info:
        train = [[p["step"], p["loss"]] for p in info.get("train_losses", [])]
        val = [[p["step"], p["loss"]] for p in info.get("val_losses", [])]
    return {"train": train, "val": val}


def _train_settings(run_dir: Path) -> dict[str, Any]:
    try:
        config = yaml_load((run_dir / "run_config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return {}
    return config.get("train") or {} if isinstance(config, dict) else {}


def training_progress(run_dir: Path) -> dict[str, Any] | None:
    """Step, share done and ETA of a training run from its log (None before the first step)."""
    rows = [row for row in training_log(run_dir) if "loss" in row]
    if not rows:
        return None
    last = rows[-1]
    settings = _train_settings(run_dir)
    max_steps, epochs = settings.get("max_steps") or -1, settings.get("num_epochs") or 0
    if isinstance(max_steps, int) and max_steps > 0:
        share = last["step"] / max_steps
    else:
        share = float(last.get("epoch") or 0) / float(epochs) if epochs else 0.0
    share = min(max(share, 0.0), 1.0)
    total = round(last["step"] / share) if share > 0 else None
    first_time, last_time = _epoch_seconds(rows[0].get("time")), _epoch_seconds(last.get("time"))
    eta = None
    if total and first_time is not None and last_time is not None and last["step"] > rows[0]["step"]:
        # Seconds per step between the first and the last logged step, times the steps left.
        per_step = (last_time - first_time) / (last["step"] - rows[0]["step"])
        eta = max(0.0, per_step * (total - last["step"]) - (time.time() - last_time))
    return {"step": last["step"], "total_steps": total, "share": round(share, 4), "loss": last["loss"], "eta_s": eta}


def eval_progress(run_dir: Path, variant: str) -> dict[str, Any]:
    eval_dir = eval_dir_of(run_dir) or RunPaths(run_dir).eval_dir
    total = _count_lines(eval_dir / "items.jsonl")
    done = min(_count_lines(eval_dir / f"generations_{variant}.jsonl"), total) if total else 0
    return {"done": done, "total": total, "share": round(done / total, 4) if total else 0.0}


def stage_rows(run_dir: Path) -> list[dict[str, Any]]:
    state = _read_json(run_dir / STATE_FILE) or {}
    rows = []
    for name in STAGES:
        record = state.get(name) or {}
        rows.append({
            "name": name,
            "label": STAGE_LABELS[name],
            "status": record.get("status", "pending"),
            "seconds": record.get("seconds"),
            "finished_at": record.get("finished_at"),
        })
    return rows


def metrics_rows(metrics: dict[str, Any] | None, lang: str = i18n.DEFAULT_LANG) -> list[dict[str, Any]]:
    """The before/after table, formatted and named the way report.html does it (report.i18n)."""
    rows = []
    for row in (metrics or {}).get("table", []):
        try:
            rows.append({
                "key": row["key"], "name": i18n.metric_name(row, lang), "n": row["n"],
                "base": format_value(row, row["base"]), "base_ci": format_interval(row, row.get("base_ci")),
                "finetuned": format_value(row, row["finetuned"]), "finetuned_ci": format_interval(row, row.get("finetuned_ci")),
                "delta": format_delta(row, row["delta"], lang), "delta_ci": format_delta_interval(row, row.get("delta_ci"), lang),
                "test": i18n.test_name(row.get("test"), lang), "p": format_p(row.get("p_value")), "verdict": i18n.verdict(row.get("verdict"), lang),
            })
        except (KeyError, TypeError):
            continue  # a row of another metrics.json version: leave it to report.html
    return rows


def current_stage(stages: list[dict[str, Any]]) -> str | None:
    return next((row["name"] for row in stages if row["status"] == "started"), None)


def run_overview(name: str, run_dir: Path) -> dict[str, Any]:
    """The short form for the list of runs."""
    stages = stage_rows(run_dir)
    info = _read_json(run_dir / "training_info.json") or {}
    return {
        "name": name,
        "stages": stages,
        "current": current_stage(stages),
        "done": sum(row["status"] == "done" for row in stages),
        "training_status": info.get("status"),
        "has_report": (RunPaths(run_dir).report_dir / "report.html").is_file(),
    }


def run_detail(name: str, run_dir: Path, lang: str = i18n.DEFAULT_LANG) -> dict[str, Any]:
    """Everything the run page shows (polled while the run is live), in `lang` (zh | en)."""
    paths = RunPaths(run_dir)
    info = _read_json(run_dir / "training_info.json")
    eval_dir = eval_dir_of(run_dir)
    metrics = _read_json(eval_dir / "metrics.json") if eval_dir else None
    card_file = paths.dataset.with_name(paths.dataset.stem + ".card.md")
    detail = run_overview(name, run_dir)
    current = detail["current"]
    progress: dict[str, Any] | None = None
    if current == "train":
        progress = training_progress(run_dir)
    elif current in ("eval_base", "eval_finetuned"):
        progress = eval_progress(run_dir, current.removeprefix("eval_"))
    detail.update(
        progress=progress,
        loss=loss_points(run_dir, info),
        metrics=metrics_rows(metrics, lang),
        n_items=(metrics or {}).get("n_items"),
        # Rendered here with raw HTML disabled (report.render_markdown), so the page may insert it as HTML.
        dataset_card_html=render_markdown(card_file.read_text(encoding="utf-8")) if card_file.is_file() else None,
        training={key: (info or {}).get(key) for key in ("status", "global_step", "max_steps", "best_step", "best_val_loss", "adapter_is")},
    )
    return detail
