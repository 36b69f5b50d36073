"""The evaluation report: report.html (one self-contained file), report.md, slide PNGs.

`build_report(run_dir, output_dir)` reads an evaluation folder (metrics.json, items.jsonl,
generations_*.jsonl, per_item.jsonl, eval_config.json) and, when it can find it, the
training folder (training_info.json, training_log.jsonl) of the adapter that was evaluated,
and writes:

* `report.html` -- inline CSS, charts as base64 PNG: opens offline in any browser, nothing
  fetched from the network;
* `report.md` -- the same content for a thesis appendix or a repository page (it links the
  PNGs, which sit beside it);
* `loss_curve.png`, `metrics_chart.png`, `metrics_table.png`, `confusion.png` -- for slides.

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
import html
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finqlora.core.errors import FinqloraError
from finqlora.evaluate.evaluation import read_cache
from finqlora.core.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

CHART_LABELS = {"利好": "bullish", "利空": "bearish", "中性": "neutral"}
ROUGE_TIE_MARGIN = 0.05
RATE_SUFFIXES = ("accuracy", "macro_f1", "parse_rate", "rouge_l")


@dataclass(frozen=True)
class ReportPaths:
    html: Path
    markdown: Path
    metrics: Path
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


def _loss_points(training_dir: Path | None) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    if training_dir is None:
        return [], []
    info_path = training_dir / "training_info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text(encoding="utf-8"))
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


def loss_chart(train: list[tuple[float, float]], val: list[tuple[float, float]]) -> bytes | None:
    if not train and not val:
        return None
    fig, ax = _figure(7, 3.6)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", color="#4c78a8", linewidth=1.5)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], label="validation loss", color="#e45756", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


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
        if "correct" in base and "correct" in tuned:
            group = "win" if tuned["correct"] and not base["correct"] else "loss" if base["correct"] and not tuned["correct"] else "tie"
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
# Sections shared by HTML and Markdown


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
    pairs = [
        ("test data", str(meta.get("data"))),
        ("test data sha256", str(meta.get("data_sha256"))),
        ("split", str(meta.get("split"))),
        ("items evaluated", str(metrics.get("n_items"))),
        ("items by task", ", ".join(f"{k}: {v}" for k, v in (metrics.get("items_by_task") or {}).items())),
    ]
    news = (metrics.get("tasks") or {}).get("news_impact")
    if news:
        pairs.append(("news impact labels", ", ".join(f"{k}: {v}" for k, v in news["label_counts"].items())))
    if training_info and training_info.get("dataset"):
        ds = training_info["dataset"]
        pairs.append(("training data", f"{ds.get('path')} (train {ds.get('train_records')}, val {ds.get('val_records')}, sha256 {str(ds.get('sha256'))[:16]})"))
    generation = meta.get("generation") or {}
    if generation:
        pairs.append(("generation (both models)", ", ".join(f"{k}={v}" for k, v in generation.items()) + f", batch_size={meta.get('batch_size')}"))
    pairs.append(("model", f"{meta.get('model')} + adapter {meta.get('adapter')}"))
    pairs.append(("device", f"{meta.get('device')} ({meta.get('dtype')})"))
    for variant, cost in (metrics.get("generation_cost") or {}).items():
        pairs.append((
            f"generation ({variant})",
            f"{cost['items']} answers, {cost['seconds']} s, {cost['new_tokens']} new tokens ({cost['tokens_per_s']} tokens/s), "
            f"{cost['hit_max_new_tokens']} stopped at max_new_tokens",
        ))
    return pairs


def _verdict_summary(metrics: dict[str, Any]) -> list[str]:
    lines = []
    for row in metrics.get("table", []):
        if row.get("test") == "McNemar exact":
            mc = row.get("mcnemar") or {}
            lines.append(
                f"{row['name']}: {format_value(row, row['base'])} -> {format_value(row, row['finetuned'])} "
                f"({format_value(row, row['delta'], signed=True)}); McNemar exact p = {format_p(row.get('p_value'))} "
                f"(base only right: {mc.get('base_only')}, fine-tuned only right: {mc.get('finetuned_only')}) -- {row['verdict']}."
            )
    return lines


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:-apple-system,"Segoe UI","PingFang SC","Microsoft YaHei","Noto Sans CJK SC",sans-serif;margin:2rem auto;max-width:1150px;color:#1f2933;line-height:1.5;padding:0 1rem}
h1{font-size:1.7rem;margin-bottom:.2rem}h2{border-bottom:2px solid #e4e7eb;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse;width:100%;font-size:.9rem;margin:.6rem 0}th,td{border:1px solid #d9dee3;padding:.35rem .5rem;text-align:left;vertical-align:top}
th{background:#f0f4f8}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.better{color:#1b7f3b;font-weight:600}.worse{color:#b42318;font-weight:600}.same{color:#52606d}
.muted{color:#616e7c;font-size:.88rem}img{max-width:100%;border:1px solid #e4e7eb;border-radius:4px;margin:.4rem 0}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:.6rem}.box{background:#f8fafc;border:1px solid #e4e7eb;border-radius:4px;padding:.5rem;white-space:pre-wrap;font-size:.86rem;overflow-wrap:anywhere}
.example{border:1px solid #cbd2d9;border-radius:6px;padding:.7rem;margin:1rem 0}.tag{display:inline-block;padding:0 .45rem;border-radius:3px;font-size:.8rem;color:#fff}
.win{background:#1b7f3b}.loss{background:#b42318}.tie{background:#7b8794}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _kv_table(pairs: list[tuple[str, str]]) -> str:
    if not pairs:
        return "<p class='muted'>not available</p>"
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs) + "</table>"


def _verdict_class(verdict: str) -> str:
    return "better" if "better" in verdict else "worse" if "worse" in verdict else "same"


def _metrics_table_html(table: list[dict[str, Any]]) -> str:
    head = "<tr><th>metric</th><th>n</th><th>base [95% CI]</th><th>fine-tuned [95% CI]</th><th>delta [95% CI]</th><th>test</th><th>p</th><th>verdict</th></tr>"
    body = []
    for row in table:
        body.append(
            "<tr>"
            f"<td>{_e(row['name'])}</td><td class='num'>{row['n']}</td>"
            f"<td class='num'>{_e(format_value(row, row['base']))} <span class='muted'>{_e(format_interval(row, row['base_ci']))}</span></td>"
            f"<td class='num'>{_e(format_value(row, row['finetuned']))} <span class='muted'>{_e(format_interval(row, row['finetuned_ci']))}</span></td>"
            f"<td class='num'>{_e(format_value(row, row['delta'], signed=True))} <span class='muted'>{_e(format_interval(row, row['delta_ci'], signed=True))}</span></td>"
            f"<td>{_e(row['test'])}</td><td class='num'>{_e(format_p(row.get('p_value')))}</td>"
            f"<td class='{_verdict_class(row['verdict'])}'>{_e(row['verdict'])}</td>"
            "</tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _baselines_html(tasks: dict[str, Any]) -> str:
    parts = []
    blocks = [("news_impact", tasks.get("news_impact"))] + [(f"benchmark {k}", v) for k, v in (tasks.get("benchmarks") or {}).items()]
    for name, block in blocks:
        if not block:
            continue
        base = block["baselines"]
        parts.append(
            f"<tr><td>{_e(name)}</td><td class='num'>{base['majority']['accuracy'] * 100:.1f}% (always {_e(base['majority']['class'])})</td>"
            f"<td class='num'>{base['majority']['macro_f1'] * 100:.1f}%</td><td class='num'>{base['random']['accuracy'] * 100:.1f}%</td>"
            f"<td class='num'>{base['random']['macro_f1'] * 100:.1f}%</td></tr>"
        )
    if not parts:
        return ""
    return ("<h3>Baselines</h3><table><tr><th>task</th><th>majority accuracy</th><th>majority macro-F1</th><th>random accuracy</th><th>random macro-F1 (expected)</th></tr>"
            + "".join(parts) + "</table>")


def _breakdown_html(block: dict[str, Any] | None) -> str:
    if not block or not block.get("by_ticker_window"):
        return ""
    rows = "".join(
        f"<tr><td>{_e(group)}</td><td class='num'>{values['n']}</td><td class='num'>{values['base']['accuracy'] * 100:.1f}%</td>"
        f"<td class='num'>{values['finetuned']['accuracy'] * 100:.1f}%</td><td class='num'>{values['base']['macro_f1'] * 100:.1f}%</td>"
        f"<td class='num'>{values['finetuned']['macro_f1'] * 100:.1f}%</td></tr>"
        for group, values in block["by_ticker_window"].items()
    )
    return ("<h3>News impact by ticker and window</h3><table><tr><th>ticker @ window</th><th>n</th><th>base accuracy</th><th>fine-tuned accuracy</th>"
            f"<th>base macro-F1</th><th>fine-tuned macro-F1</th></tr>{rows}</table>")


def _examples_html(examples: dict[str, dict[str, Any]], outputs: dict[str, dict[str, str]], per_item: dict[str, dict[str, Any]], per_group: int, seed: int) -> str:
    parts = [
        f"<p class='muted'>Rule: each item is a win (fine-tuned right, base wrong), loss (base right, fine-tuned wrong) or tie; "
        f"tasks without a right/wrong label use ROUGE-L (difference &gt; {ROUGE_TIE_MARGIN} either way, else tie). "
        f"Up to {per_group} items per group are drawn at random (seed {seed}); nothing is picked by hand.</p>"
    ]
    for task, chosen in examples.items():
        counts = chosen["counts"]
        parts.append(f"<h3>{_e(task)} <span class='muted'>(wins {counts['win']}, losses {counts['loss']}, ties {counts['tie']})</span></h3>")
        for group in ("win", "loss", "tie"):
            for item in chosen["shown"][group]:
                scores = per_item.get(item["id"], {})
                returns = _returns_text(item)
                parts.append(
                    f"<div class='example'><span class='tag {group}'>{group}</span> <b>{_e(item['id'])}</b>"
                    f"<div class='box'>{_e(question_text(item))}</div>"
                    + (f"<p><b>Realized returns</b></p><div class='box'>{_e(returns)}</div>" if returns else "")
                    + f"<p><b>Reference</b></p><div class='box'>{_e(item.get('reference', ''))}</div>"
                    f"<div class='pair'><div><b>Base</b> <span class='muted'>parsed: {_e(scores.get('base', {}).get('parsed'))}</span>"
                    f"<div class='box'>{_e(outputs['base'].get(item['id'], ''))}</div></div>"
                    f"<div><b>Fine-tuned</b> <span class='muted'>parsed: {_e(scores.get('finetuned', {}).get('parsed'))}</span>"
                    f"<div class='box'>{_e(outputs['finetuned'].get(item['id'], ''))}</div></div></div></div>"
                )
    return "".join(parts)


def _img(images: dict[str, bytes], name: str, alt: str) -> str:
    if name not in images:
        return ""
    data = base64.b64encode(images[name]).decode("ascii")
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{data}'>"


# ---------------------------------------------------------------------------------------------
# Markdown


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", "<br>")


def _markdown(title: str, metrics: dict[str, Any], hyper: list[tuple[str, str]], card: list[tuple[str, str]], images: dict[str, Path],
              examples: dict[str, dict[str, Any]], outputs: dict[str, dict[str, str]], per_group: int, seed: int) -> str:
    lines = [f"# {title}", "", f"Generated {metrics.get('meta', {}).get('created_utc', '')}. Significance level {metrics['significance_level']}; "
             f"intervals: 95% percentile bootstrap ({metrics['bootstrap']['resamples']} resamples, paired for deltas).", ""]
    lines += ["## Summary", ""] + [f"- {line}" for line in _verdict_summary(metrics)] + [""]
    lines += ["## Metrics", "", "| metric | n | base [95% CI] | fine-tuned [95% CI] | delta [95% CI] | test | p | verdict |", "|---|---:|---:|---:|---:|---|---:|---|"]
    for row in metrics["table"]:
        lines.append(
            f"| {_md_cell(row['name'])} | {row['n']} | {format_value(row, row['base'])} {format_interval(row, row['base_ci'])} | "
            f"{format_value(row, row['finetuned'])} {format_interval(row, row['finetuned_ci'])} | "
            f"{format_value(row, row['delta'], signed=True)} {format_interval(row, row['delta_ci'], signed=True)} | {row['test']} | {format_p(row.get('p_value'))} | {row['verdict']} |"
        )
    lines.append("")
    for name, path in images.items():
        lines += [f"![{name}]({path.name})", ""]
    lines += ["## Hyperparameters", ""] + ([f"- **{_md_cell(k)}**: {_md_cell(v)}" for k, v in hyper] or ["not available (no training_info.json found)"]) + [""]
    lines += ["## Data card", ""] + [f"- **{_md_cell(k)}**: {_md_cell(v)}" for k, v in card] + [""]
    lines += ["## Examples", "", f"Rule: win = fine-tuned right and base wrong, loss = the reverse, tie = both right or both wrong (ROUGE-L margin {ROUGE_TIE_MARGIN} "
              f"for tasks without a right/wrong label); up to {per_group} per group drawn at random with seed {seed}.", ""]
    for task, chosen in examples.items():
        counts = chosen["counts"]
        lines += [f"### {task} (wins {counts['win']}, losses {counts['loss']}, ties {counts['tie']})", ""]
        for group in ("win", "loss", "tie"):
            for item in chosen["shown"][group]:
                lines += [f"#### {group}: {item['id']}", "", "**Prompt**", "", "```text", question_text(item), "```", ""]
                returns = _returns_text(item)
                if returns:
                    lines += ["**Realized returns**", "", "```text", returns, "```", ""]
                lines += ["**Reference**", "", "```text", item.get("reference", ""), "```", "",
                          "| base | fine-tuned |", "|---|---|", f"| {_md_cell(outputs['base'].get(item['id'], ''))} | {_md_cell(outputs['finetuned'].get(item['id'], ''))} |", ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Entry point


def build_report(
    run_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    training_dir: str | Path | None = None,
    title: str | None = None,
    examples_per_group: int = 2,
    seed: int = 0,
    recompute: bool = True,
) -> ReportPaths:
    """Write report.html, report.md, metrics.json (recomputed from the caches) and PNGs."""
    from finqlora.evaluate.evaluation import compute_metrics

    eval_dir = find_eval_dir(Path(run_dir))
    output = Path(output_dir) if output_dir is not None else eval_dir
    output.mkdir(parents=True, exist_ok=True)
    if recompute and (eval_dir / "items.jsonl").exists():
        metrics = compute_metrics(eval_dir, seed=seed)
    else:
        metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    meta = metrics.get("meta") or {}
    train_dir = Path(training_dir) if training_dir else find_training_dir(Path(run_dir), meta)
    training_info = json.loads((train_dir / "training_info.json").read_text(encoding="utf-8")) if train_dir and (train_dir / "training_info.json").exists() else None

    items = read_cache(eval_dir / "items.jsonl")
    per_item = {row["id"]: row for row in read_cache(eval_dir / "per_item.jsonl")}
    outputs = {v: {row["id"]: row["output"] for row in read_cache(eval_dir / f"generations_{v}.jsonl")} for v in ("base", "finetuned")}
    examples = select_examples(items, per_item, per_group=examples_per_group, seed=seed)

    train_points, val_points = _loss_points(train_dir)
    charts = {
        "loss_curve": loss_chart(train_points, val_points),
        "metrics_chart": metrics_chart(metrics["table"]),
        "metrics_table": table_chart(metrics["table"]),
        "confusion": confusion_chart(metrics["tasks"]["news_impact"]) if "news_impact" in metrics.get("tasks", {}) else None,
    }
    images = {name: data for name, data in charts.items() if data is not None}
    image_paths = {name: atomic_write_bytes(output / f"{name}.png", data) for name, data in images.items()}

    title = title or f"finqlora evaluation: {meta.get('model', 'model')} before vs after fine-tuning"
    hyper = _hyperparameters(training_info)
    card = _data_card(metrics, training_info)
    summary = "".join(f"<li>{_e(line)}</li>" for line in _verdict_summary(metrics))
    page = (
        "<!DOCTYPE html><html lang='zh-CN'><head><meta charset='utf-8'><meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class='muted'>Generated {_e(meta.get('created_utc', ''))}. Significance level {metrics['significance_level']}; "
        f"intervals are 95% percentile bootstrap ({metrics['bootstrap']['resamples']} resamples of test items, paired for deltas).</p>"
        + (f"<h2>Summary</h2><ul>{summary}</ul>" if summary else "")
        + "<h2>Metrics</h2>" + _metrics_table_html(metrics["table"]) + _img(images, "metrics_chart", "base vs fine-tuned metrics")
        + _baselines_html(metrics.get("tasks", {})) + _breakdown_html(metrics.get("tasks", {}).get("news_impact"))
        + _img(images, "confusion", "confusion matrices")
        + "<h2>Training</h2>" + (_img(images, "loss_curve", "loss curves") or "<p class='muted'>no training log found</p>")
        + "<h3>Hyperparameters</h3>" + _kv_table(hyper)
        + "<h2>Data card</h2>" + _kv_table(card)
        + "<h2>Examples</h2>" + _examples_html(examples, outputs, per_item, examples_per_group, seed)
        + "</body></html>"
    )
    html_path = atomic_write_text(output / "report.html", page)
    md_path = atomic_write_text(output / "report.md", _markdown(title, metrics, hyper, card, image_paths, examples, outputs, examples_per_group, seed))
    # metrics.json carries the run's hyperparameters and data card too (for other tools).
    metrics["training"] = {"dir": str(train_dir) if train_dir else None, "hyperparameters": dict(hyper), "data_card": dict(card)}
    metrics_path = atomic_write_json(eval_dir / "metrics.json", metrics)
    if output != eval_dir:
        metrics_path = atomic_write_json(output / "metrics.json", metrics)
    return ReportPaths(html_path, md_path, metrics_path, image_paths)
