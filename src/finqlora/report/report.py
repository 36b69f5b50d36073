"""The evaluation report: report.html (one self-contained file), report.md, slide PNGs.

`build_report(run_dir, output_dir)` reads an evaluation folder -- metrics.json (written by
the eval stage, `finqlora.evaluate.scoring.compute_metrics`), items.jsonl, the generation and
choice caches, per_item.jsonl -- and, when it can find it, the training folder
(training_info.json, training_log.jsonl) of the adapter that was evaluated. It never writes
into the evaluation folder's files; it writes only its own:

* `report.html` -- inline CSS, charts as base64 PNG: opens offline in any browser, nothing
  fetched from the network;
* `report.md` -- the same content for a thesis appendix or a repository page (it links the
  PNGs, which sit beside it);
* `loss_curve.png`, `metrics_chart.png`, `metrics_table.png`, `confusion.png` -- for slides.

Both pages are rendered from the jinja2 templates in `finqlora/report/templates/` with
autoescaping on, so a model's answer can never inject markup.

Examples are chosen by a fixed rule, never by hand: each item of a task is a *win*
(fine-tuned right, base wrong), a *loss* (base right, fine-tuned wrong) or a *tie* (both
right or both wrong); for tasks without a right/wrong label, ROUGE-L decides (difference
above 0.05 either way, else a tie). From each group `examples_per_group` items are drawn at
random with a fixed seed, and the group sizes are printed beside them, so the reader sees
how typical the shown examples are.

Charts use English labels (the class names are mapped: 利好 bullish, 利空 bearish, 中性
neutral) because a machine without CJK fonts would draw Chinese as empty boxes.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_bytes, atomic_write_text
from finqlora.core.lock import lock_enclosing_run
from finqlora.evaluate.scoring import read_cache, read_json_file

CHART_LABELS = {"利好": "bullish", "利空": "bearish", "中性": "neutral"}
ROUGE_TIE_MARGIN = 0.05
RATE_SUFFIXES = ("accuracy", "macro_f1", "parse_rate", "rouge_l")
VARIANTS = ("base", "finetuned")


@dataclass(frozen=True)
class ReportPaths:
    html: Path
    markdown: Path
    images: dict[str, Path]


# ---------------------------------------------------------------------------------------------
# Inputs


def find_eval_dir(run_dir: Path) -> Path:
    """The folder holding the evaluation caches: `run_dir` itself or one level below it."""
    if (run_dir / "items.jsonl").exists() or (run_dir / "metrics.json").exists():
        return run_dir
    candidates = sorted(p.parent for p in run_dir.glob("*/items.jsonl")) or sorted(p.parent for p in run_dir.glob("*/metrics.json"))
    if not candidates:
        raise FinqloraError(
            f"{run_dir} holds no evaluation (no metrics.json or items.jsonl in it or its subfolders)",
            hint="run `finqlora eval --model M --adapter A --data test.jsonl --output DIR` first, then `finqlora report --run DIR`",
        )
    return candidates[0]


def find_training_dir(run_dir: Path, meta: dict[str, Any]) -> Path | None:
    adapter = meta.get("adapter")
    if adapter:
        # The adapter folder itself, or the run folder of a checkpoint-N adapter.
        for candidate in (Path(adapter), Path(adapter).parent):
            if (candidate / "training_info.json").exists():
                return candidate
    for candidate in [run_dir, *sorted(p.parent for p in run_dir.glob("*/training_info.json")), *sorted(p.parent for p in run_dir.parent.glob("*/training_info.json"))]:
        if (candidate / "training_info.json").exists():
            return candidate
    return None


def _loss_points(training_dir: Path | None, info: dict[str, Any] | None) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    if training_dir is None:
        return [], []
    if info:
        train = [(p["step"], p["loss"]) for p in info.get("train_losses") or []]
        val = [(p["step"], p["loss"]) for p in info.get("val_losses") or []]
        if train or val:
            return train, val
    train, val = [], []
    for row in read_cache(training_dir / "training_log.jsonl"):
        if "loss" in row and "step" in row:
            train.append((row["step"], row["loss"]))
        if "eval_loss" in row and "step" in row:
            val.append((row["step"], row["eval_loss"]))
    return train, val


def _read_metrics(eval_dir: Path) -> dict[str, Any]:
    path = eval_dir / "metrics.json"
    if not path.exists():
        raise FinqloraError(
            f"{eval_dir} has no metrics.json",
            hint=f"run `finqlora eval ... --output {eval_dir}` (it reuses the cached answers and writes the metrics), then the report",
        )
    return read_json_file(path)


# ---------------------------------------------------------------------------------------------
# Formatting


def is_rate(row: dict[str, Any]) -> bool:
    return row["key"].endswith(RATE_SUFFIXES)


def format_value(row: dict[str, Any], value: float | None, *, signed: bool = False) -> str:
    """How the report prints a metric: rates in % with one decimal, BLEU and perplexity with two."""
    if value is None:
        return "n/a"
    sign = "+" if signed and value > 0 else ""
    if is_rate(row):
        return f"{sign}{value * 100:.1f}%"
    return f"{sign}{value:.2f}"


def format_interval(row: dict[str, Any], interval: Sequence[float | None] | None, *, signed: bool = False) -> str:
    if not interval or interval[0] is None or interval[1] is None:
        return "n/a"
    return f"[{format_value(row, interval[0], signed=signed)}, {format_value(row, interval[1], signed=signed)}]"


def format_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Charts


def _figure(width: float, height: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def metrics_chart(table: list[dict[str, Any]]) -> bytes | None:
    rows = [row for row in table if is_rate(row) and row.get("base") is not None and row.get("finetuned") is not None]
    if not rows:
        return None
    import numpy as np

    fig, ax = _figure(7.5, 0.55 * len(rows) + 1.4)
    y = np.arange(len(rows))
    for offset, variant, color in ((-0.2, "base", "#9aa5b1"), (0.2, "finetuned", "#4c78a8")):
        values = [row[variant] * 100 for row in rows]
        errors = [
            [max(0.0, (row[variant] - (row[f"{variant}_ci"][0] or row[variant])) * 100) for row in rows],
            [max(0.0, ((row[f"{variant}_ci"][1] or row[variant]) - row[variant]) * 100) for row in rows],
        ]
        ax.barh(y + offset, values, height=0.38, xerr=errors, color=color, label="fine-tuned" if variant == "finetuned" else "base", capsize=3)
    ax.set_yticks(y)
    ax.set_yticklabels([_ascii_name(row) for row in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("% (bars: 95% bootstrap interval)")
    ax.set_xlim(0, 105)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Base vs fine-tuned")
    return _png(fig)


def _ascii_name(row: dict[str, Any]) -> str:
    """The English part of a metric name (before any Chinese in parentheses)."""
    name = row["name"]
    cut = [i for i, ch in enumerate(name) if ord(ch) > 0x2E7F]
    if cut:
        name = name[: cut[0]].rstrip(" (")
    return name


def confusion_chart(block: dict[str, Any]) -> bytes | None:
    import numpy as np

    fig, axes = _figure(9, 3.6)
    fig.clf()
    axes = fig.subplots(1, 2)
    for ax, variant in zip(axes, ("base", "finetuned")):
        confusion = block[variant]["confusion"]
        matrix = np.array(confusion["matrix"])
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(confusion["columns"])))
        ax.set_xticklabels([CHART_LABELS.get(c, c) for c in confusion["columns"]], rotation=30, fontsize=8)
        ax.set_yticks(range(len(confusion["labels"])))
        ax.set_yticklabels([CHART_LABELS.get(c, c) for c in confusion["labels"]], fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("realized")
        ax.set_title("fine-tuned" if variant == "finetuned" else "base")
        for (r, c), value in np.ndenumerate(matrix):
            ax.text(c, r, str(value), ha="center", va="center", color="white" if value > matrix.max() / 2 else "black")
    fig.suptitle("News impact direction: confusion matrices")
    return _png(fig)


def table_chart(table: list[dict[str, Any]]) -> bytes | None:
    if not table:
        return None
    cells = [
        [_ascii_name(row), format_value(row, row["base"]), format_value(row, row["finetuned"]),
         format_value(row, row["delta"], signed=True), format_interval(row, row["delta_ci"], signed=True), format_p(row.get("p_value")), row["verdict"]]
        for row in table
    ]
    fig, ax = _figure(13, 0.36 * len(cells) + 0.8)
    ax.axis("off")
    rendered = ax.table(cellText=cells, colLabels=["metric", "base", "fine-tuned", "delta", "95% CI of delta", "p", "verdict"], loc="center", cellLoc="left")
    rendered.auto_set_font_size(False)
    rendered.set_fontsize(8)
    rendered.auto_set_column_width(list(range(7)))
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# Examples


def select_examples(
    items: list[dict[str, Any]], per_item: dict[str, dict[str, Any]], *, per_group: int = 2, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """{task: {"counts": {win, loss, tie}, "shown": {group: [items]}}}; see the module docstring."""
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for item in items:
        scores = per_item.get(item["id"], {})
        base, tuned = scores.get("base", {}), scores.get("finetuned", {})
        # Right/wrong of the generated answer, or of the chosen option where nothing was generated.
        key = "correct" if "correct" in base and "correct" in tuned else "choice_correct"
        if key in base and key in tuned:
            group = "win" if tuned[key] and not base[key] else "loss" if base[key] and not tuned[key] else "tie"
        elif "rouge_l" in base and "rouge_l" in tuned:
            diff = tuned["rouge_l"] - base["rouge_l"]
            group = "win" if diff > ROUGE_TIE_MARGIN else "loss" if diff < -ROUGE_TIE_MARGIN else "tie"
        else:
            continue
        task = item["benchmark"] if item["task"] == "benchmark" else item["task"]
        by_task.setdefault(task, {"win": [], "loss": [], "tie": []})[group].append(item)
    chosen = {}
    for task, groups in sorted(by_task.items()):
        rng = random.Random(f"{seed}:{task}")
        chosen[task] = {
            "counts": {group: len(members) for group, members in groups.items()},
            "shown": {group: sorted(rng.sample(members, min(per_group, len(members))), key=lambda it: it["id"]) for group, members in groups.items()},
        }
    return chosen


def question_text(item: dict[str, Any]) -> str:
    return "\n\n".join(m["content"] for m in item["messages"] if m["role"] != "system")


def _returns_text(item: dict[str, Any]) -> str:
    label = item.get("label") or {}
    returns = label.get("returns") or {}
    parts = []
    for ticker, by_window in returns.items():
        windows = sorted(by_window.items(), key=lambda kv: int(kv[0]))
        shown = ", ".join(f"{int(w):+d}min {r * 100:+.2f}%" for w, r in windows if r is not None)
        parts.append(f"{ticker}: {shown}")
    if label.get("direction"):
        parts.append(f"label: {label['direction']} ({label.get('ticker')} @ {label.get('window_min')} min, threshold {label.get('threshold')})")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# What the templates show


def _hyperparameters(training_info: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not training_info:
        return []
    pairs = []
    for key, value in (training_info.get("hyperparameters") or {}).items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
            if len(value) > 80:
                continue
        pairs.append((key, str(value)))
    base = training_info.get("base_model")
    if base:
        pairs.insert(0, ("base model", base if isinstance(base, str) else json.dumps(base, ensure_ascii=False)[:120]))
    timing = training_info.get("timing") or {}
    if "train_seconds" in timing:
        pairs.append(("train time (s)", str(timing["train_seconds"])))
    if training_info.get("best_val_loss") is not None:
        pairs.append(("best val loss", f"{training_info['best_val_loss']:.4f} (step {training_info.get('best_step')})"))
    return pairs


def _data_card(metrics: dict[str, Any], training_info: dict[str, Any] | None) -> list[tuple[str, str]]:
    meta = metrics.get("meta") or {}
    tasks = metrics.get("tasks") or {}
    pairs = [
        ("test data", str(meta.get("data"))),
        ("test data sha256", str(meta.get("data_sha256"))),
        ("split", str(meta.get("split"))),
        ("items evaluated", str(metrics.get("n_items"))),
        ("items by task", ", ".join(f"{k}: {v}" for k, v in (metrics.get("items_by_task") or {}).items())),
        ("scoring of closed-option tasks", str(meta.get("scoring", "generate"))),
    ]
    if tasks.get("news_impact"):
        pairs.append(("news impact labels", ", ".join(f"{k}: {v}" for k, v in tasks["news_impact"]["label_counts"].items())))
    if training_info and training_info.get("dataset"):
        ds = training_info["dataset"]
        pairs.append(("training data", f"{ds.get('path')} (train {ds.get('train_records')}, val {ds.get('val_records')}, sha256 {str(ds.get('sha256'))[:16]})"))
    generation = meta.get("generation") or {}
    if generation:
        pairs.append(("generation (both models)", ", ".join(f"{k}={v}" for k, v in generation.items()) + f", batch_size={meta.get('batch_size')}"))
    pairs.append(("model", f"{meta.get('model')} + adapter {meta.get('adapter')}" + (" (merged for evaluation)" if meta.get("adapter_merged") else "")))
    pairs.append(("device", f"{meta.get('device')} ({meta.get('dtype')})"))
    for variant in VARIANTS:
        cost = (metrics.get("generation_cost") or {}).get(variant)
        if cost and cost.get("items"):
            pairs.append((f"generation ({variant})", f"{cost['items']} answers, {cost['seconds']} s, {cost['new_tokens']} new tokens "
                                                     f"({cost['tokens_per_s']} tokens/s), {cost['hit_max_new_tokens']} stopped at max_new_tokens"))
    speed = (meta.get("timings") or {}).get("generation_speed")
    if speed:
        pairs.append(("generation speed, same run", f"fine-tuned {speed['finetuned_tokens_per_s']} vs base {speed['base_tokens_per_s']} tokens/s (ratio {speed['ratio']})"))
    if (tasks.get("overlap") or {}).get("bleu_signature"):
        pairs.append(("BLEU (sacreBLEU signature)", tasks["overlap"]["bleu_signature"]))
    return pairs


NO_CAPABILITY_GAIN = (
    "No closed-label capability metric (accuracy on a labelled task, McNemar exact) is significantly better "
    "after fine-tuning in this evaluation. Overlap (ROUGE-L, BLEU) and reference perplexity measure closeness "
    "to the wording of the training answers, not capability."
)


def _verdict_summary(metrics: dict[str, Any]) -> list[str]:
    """One line per closed-label accuracy test, and a plain statement when none of them improved."""
    lines = []
    closed_label = [row for row in metrics.get("table", []) if row.get("test") == "McNemar exact"]
    for row in closed_label:
        mc = row.get("mcnemar") or {}
        lines.append(
            f"{row['name']}: {format_value(row, row['base'])} -> {format_value(row, row['finetuned'])} "
            f"({format_value(row, row['delta'], signed=True)}); McNemar exact p = {format_p(row.get('p_value'))} "
            f"(base only right: {mc.get('base_only')}, fine-tuned only right: {mc.get('finetuned_only')}) -- {row['verdict']}."
        )
    if closed_label and not any("better" in row["verdict"] for row in closed_label):
        lines.append(NO_CAPABILITY_GAIN)
    return lines


def _metric_rows(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{
        "name": row["name"], "n": row["n"], "test": row["test"], "p": format_p(row.get("p_value")), "verdict": row["verdict"],
        "tone": "better" if "better" in row["verdict"] else "worse" if "worse" in row["verdict"] else "same",
        "base": format_value(row, row["base"]), "base_ci": format_interval(row, row["base_ci"]),
        "finetuned": format_value(row, row["finetuned"]), "finetuned_ci": format_interval(row, row["finetuned_ci"]),
        "delta": format_value(row, row["delta"], signed=True), "delta_ci": format_interval(row, row["delta_ci"], signed=True),
    } for row in table]


def _baseline_rows(tasks: dict[str, Any]) -> list[dict[str, str]]:
    blocks = [("news_impact", tasks.get("news_impact")), ("market_analysis", tasks.get("market_analysis"))]
    blocks += [(f"benchmark {name}", block) for name, block in (tasks.get("benchmarks") or {}).items()]
    blocks += [(f"{name} (choice)", block) for name, block in (tasks.get("choice") or {}).items()]
    rows = []
    for name, block in blocks:
        if not block:
            continue
        majority, chance = block["baselines"]["majority"], block["baselines"]["random"]
        rows.append({"task": name, "majority_accuracy": f"{majority['accuracy'] * 100:.1f}% (always {majority['class']})",
                     "majority_f1": f"{majority['macro_f1'] * 100:.1f}%", "random_accuracy": f"{chance['accuracy'] * 100:.1f}%",
                     "random_f1": f"{chance['macro_f1'] * 100:.1f}%"})
    return rows


def _breakdown_rows(block: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not block or not block.get("by_ticker_window"):
        return []
    return [{"group": group, "n": values["n"], **{f"{v}_{m}": f"{values[v][m] * 100:.1f}%" for v in VARIANTS for m in ("accuracy", "macro_f1")}}
            for group, values in block["by_ticker_window"].items()]


def _example_views(examples: dict[str, dict[str, Any]], outputs: dict[str, dict[str, str]], per_item: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    views = []
    for task, chosen in examples.items():
        shown = []
        for group in ("win", "loss", "tie"):
            for item in chosen["shown"][group]:
                scores = per_item.get(item["id"], {})
                answers = {}
                for v in VARIANTS:
                    s = scores.get(v, {})
                    note = f"parsed: {s.get('parsed')}" if "parsed" in s else ""
                    if "choice" in s:
                        note = (note + "; " if note else "") + f"choice: {s['choice']}"
                    answers[v] = {"text": outputs[v].get(item["id"], "(not generated: choice scoring only)"), "note": note}
                shown.append({"group": group, "id": item["id"], "question": question_text(item), "returns": _returns_text(item),
                              "reference": item.get("reference", ""), "answers": answers})
        views.append({"task": task, "counts": chosen["counts"], "shown": shown})
    return views


def _blind_ratings(run_dir: Path) -> list[dict[str, Any]]:
    """Rounds of the browser's blind A/B rating (`finqlora ui`), when that module is installed."""
    if importlib.util.find_spec("finqlora.evaluate.ratings") is None:
        return []
    from finqlora.evaluate.ratings import summarize_rounds

    def percent(value: Any) -> str:
        return "n/a" if value is None else f"{value * 100:.1f}%"

    views = []
    for round_ in summarize_rounds(run_dir):
        kappas = [f"{key}: {value:.3f}" if isinstance(value, (int, float)) else f"{key}: {value}"
                  for key, value in round_.items() if "kappa" in key and value is not None]
        means = round_.get("mean_scores") or {}
        scores = [f"{field}: {means.get('base', {}).get(field)} → {means.get('finetuned', {}).get(field)}" for field in ("professional", "accuracy")]
        views.append({**round_, "win_rate_text": percent(round_.get("win_rate")),
                      "win_ci_text": f"[{percent(round_.get('win_ci_low'))}, {percent(round_.get('win_ci_high'))}]",
                      "kappa_text": "; ".join(kappas) or "n/a", "scores_text": "; ".join(scores) if means else "n/a"})
    return views


def _environment() -> Any:
    import jinja2

    def md_cell(value: Any) -> Any:
        # Escape first (autoescape's rule), then keep the Markdown table intact.
        return jinja2.utils.markupsafe.Markup(str(jinja2.utils.markupsafe.escape(str(value))).replace("|", "\\|").replace("\n", "<br>"))

    env = jinja2.Environment(loader=jinja2.PackageLoader("finqlora.report", "templates"),
                             autoescape=jinja2.select_autoescape(enabled_extensions=("html", "md")), trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["md_cell"] = md_cell
    return env


def _charts(metrics: dict[str, Any], train_dir: Path | None, training_info: dict[str, Any] | None, output: Path) -> dict[str, Path]:
    from finqlora.core.loss_plot import plot_losses

    images: dict[str, Path] = {}
    train_points, val_points = _loss_points(train_dir, training_info)
    if train_points or val_points:
        best = (training_info or {}).get("best_step")
        images["loss_curve"] = plot_losses(train_points, val_points, output / "loss_curve.png", best_step=best)
    tasks = metrics.get("tasks") or {}
    charts = {
        "metrics_chart": metrics_chart(metrics["table"]),
        "metrics_table": table_chart(metrics["table"]),
        "confusion": confusion_chart(tasks["news_impact"]) if "news_impact" in tasks else None,
    }
    images.update({name: atomic_write_bytes(output / f"{name}.png", data) for name, data in charts.items() if data is not None})
    return images


def build_report(
    run_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    training_dir: str | Path | None = None,
    title: str | None = None,
    examples_per_group: int = 2,
    seed: int = 0,
) -> ReportPaths:
    """Write report.html, report.md and the PNGs into `output_dir` (default: the eval folder).

    Refused while another process holds the run folder the report goes into (finqlora.core.lock).
    """
    with lock_enclosing_run(Path(output_dir) if output_dir is not None else Path(run_dir)):
        return _build_report(run_dir, output_dir, training_dir=training_dir, title=title,
                             examples_per_group=examples_per_group, seed=seed)


def _build_report(run_dir: str | Path, output_dir: str | Path | None, *, training_dir: str | Path | None,
                  title: str | None, examples_per_group: int, seed: int) -> ReportPaths:
    eval_dir = find_eval_dir(Path(run_dir))
    output = Path(output_dir) if output_dir is not None else eval_dir
    output.mkdir(parents=True, exist_ok=True)
    metrics = _read_metrics(eval_dir)
    meta = metrics.get("meta") or {}
    train_dir = Path(training_dir) if training_dir else find_training_dir(Path(run_dir), meta)
    info_file = train_dir / "training_info.json" if train_dir else None
    training_info = read_json_file(info_file) if info_file and info_file.exists() else None

    items = read_cache(eval_dir / "items.jsonl")
    per_item = {row["id"]: row for row in read_cache(eval_dir / "per_item.jsonl")}
    outputs = {v: {row["id"]: row["output"] for row in read_cache(eval_dir / f"generations_{v}.jsonl")} for v in VARIANTS}
    examples = select_examples(items, per_item, per_group=examples_per_group, seed=seed)
    images = _charts(metrics, train_dir, training_info, output)
    choice_blocks = (metrics.get("tasks") or {}).get("choice") or {}
    page = {
        "title": title or f"finqlora evaluation: {meta.get('model', 'model')} before vs after fine-tuning",
        "created": meta.get("created_utc", ""), "significance": metrics["significance_level"], "resamples": metrics["bootstrap"]["resamples"],
        "summary": _verdict_summary(metrics), "rows": _metric_rows(metrics["table"]), "baselines": _baseline_rows(metrics.get("tasks") or {}),
        "breakdown": _breakdown_rows((metrics.get("tasks") or {}).get("news_impact")),
        "choice_note": next((block["normalisation"] for block in choice_blocks.values()), None),
        "hyper": _hyperparameters(training_info), "card": _data_card(metrics, training_info), "ratings": _blind_ratings(eval_dir),
        "examples": _example_views(examples, outputs, per_item), "per_group": examples_per_group, "seed": seed, "margin": ROUGE_TIE_MARGIN,
    }
    env = _environment()
    embedded = {name: base64.b64encode(path.read_bytes()).decode("ascii") for name, path in images.items()}
    html_path = atomic_write_text(output / "report.html", env.get_template("report.html").render(**page, images=embedded))
    md_path = atomic_write_text(output / "report.md", env.get_template("report.md").render(**page, images={name: path.name for name, path in images.items()}))
    return ReportPaths(html_path, md_path, images)
