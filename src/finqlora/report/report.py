"""The evaluation report: report.html (one self-contained file), report.md, slide PNGs.

`build_report(run_dir, output_dir, lang="zh")` reads an evaluation folder -- metrics.json
(written by the eval stage, `finqlora.evaluate.scoring.compute_metrics`), items.jsonl, the
generation and choice caches, per_item.jsonl -- and, when it can find it, the training folder
(training_info.json, training_log.jsonl) of the adapter that was evaluated, and the dataset
card beside the training data. It never writes into the evaluation folder's files; it writes
only its own:

* `report.html` -- inline CSS, charts as base64 PNG: opens offline in any browser, nothing
  fetched from the network;
* `report.md` -- the same content for a thesis appendix or a repository page (it links the
  PNGs, which sit beside it);
* `loss_curve.png`, `metrics_chart.png`, `metrics_table.png`, `confusion*.png` -- for slides.

The words come from `finqlora.report.i18n` (Chinese by default, English with `lang="en"`).
report.html is rendered with autoescaping, so a model's answer can never inject markup;
report.md is rendered without it (Markdown has no entities to decode) and shows model text in
fenced code blocks, where Markdown renders nothing as markup.

Examples are chosen by a fixed rule, never by hand: each item of a task is a *win*
(fine-tuned right, base wrong), a *loss* (base right, fine-tuned wrong) or a *tie* (both
right or both wrong); for tasks without a right/wrong label, ROUGE-L decides (difference
above 0.05 either way, else a tie). From each group `examples_per_group` items are drawn at
random with a fixed seed, and the group sizes are printed beside them, so the reader sees
how typical the shown examples are. An answer whose label was found in the middle of free
text (not stated at its start) is marked as such, and so is a repetitive answer.

Charts draw Chinese with the first CJK font installed (`cjk_font`); without one they fall
back to English labels and the report says so, because matplotlib would draw boxes.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import random
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_bytes, atomic_write_text
from finqlora.core.lock import lock_enclosing_run
from finqlora.evaluate.metrics import UNPARSED
from finqlora.evaluate.scoring import read_cache, read_json_file
from finqlora.report import i18n
from finqlora.report.i18n import DEFAULT_LANG

ROUGE_TIE_MARGIN = 0.05
RATE_SUFFIXES = ("accuracy", "macro_f1", "parse_rate", "rouge_l", "repetition_rate")
VARIANTS = ("base", "finetuned")
# The closed-label tasks of the store records: each has baselines and a confusion chart.
CLOSED_TASKS = ("news_impact", "market_analysis", "market_importance")
NO_CAPABILITY_GAIN = i18n.text("en", "no_gain")
# A parsed label counts as a stated conclusion when it appears this early in the answer.
STATED_WITHIN_CHARS = 24
# An answer with more repeated n-grams than this share is marked repetitive.
REPETITIVE_SHARE = 0.2
# Installed CJK fonts, best first (none is shipped with finqlora: fonts are the system's).
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Micro Hei",
             "WenQuanYi Zen Hei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "SimHei", "Droid Sans Fallback", "AR PL UMing CN")
CJK_FILE_HINTS = ("notosanscjk", "notosanssc", "sourcehansans", "wqy", "msyh", "simhei", "pingfang", "droidsansfallback", "uming")
KEY_HYPERPARAMETERS = ("lora_r", "lora_alpha", "lora_layers", "target_modules", "learning_rate", "max_steps", "num_epochs",
                       "batch_size", "gradient_accumulation_steps", "max_length", "eval_steps")


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


def _dataset_card(training_info: dict[str, Any] | None, meta: dict[str, Any]) -> str | None:
    """The Markdown card `finqlora build` writes beside the instruction file (`X.card.md`)."""
    for data in ((training_info or {}).get("dataset", {}).get("path"), meta.get("data")):
        if data:
            card = Path(data).with_name(Path(data).stem + ".card.md")
            if card.is_file():
                return card.read_text(encoding="utf-8")
    return None


def render_markdown(source: str) -> str:
    """Markdown -> HTML with raw HTML disabled (markdown-it escapes it), tables on: safe to embed."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(source)


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


def format_delta(row: dict[str, Any], value: float | None, lang: str = DEFAULT_LANG, *, long: bool = False) -> str:
    """A difference: of rates in percentage points (百分点), of other metrics in their unit."""
    if value is None:
        return "n/a"
    if not is_rate(row):
        return format_value(row, value, signed=True)
    number = f"{'+' if value > 0 else ''}{value * 100:.1f}"
    return i18n.text(lang, "pp" if long else "pp_short", value=number)


def format_delta_interval(row: dict[str, Any], interval: Sequence[float | None] | None, lang: str = DEFAULT_LANG) -> str:
    if not interval or interval[0] is None or interval[1] is None:
        return "n/a"
    if not is_rate(row):
        return format_interval(row, interval, signed=True)
    low, high = (f"{'+' if v > 0 else ''}{v * 100:.1f}" for v in interval)
    return f"[{low}, {high}]"


def format_interval(row: dict[str, Any], interval: Sequence[float | None] | None, *, signed: bool = False) -> str:
    if not interval or interval[0] is None or interval[1] is None:
        return "n/a"
    return f"[{format_value(row, interval[0], signed=signed)}, {format_value(row, interval[1], signed=signed)}]"


def format_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _p_clause(p: float | None) -> str:
    """`=0.070`, `<0.001` or `=n/a`: what follows "p" in a sentence."""
    text = format_p(p)
    return text if text.startswith("<") else f"={text}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def binomial_greater_p(successes: int, n: int, p0: float) -> float:
    """One-sided exact binomial test, P(X >= successes) for X ~ Binomial(n, p0): scipy's
    `binomtest(alternative="greater")`; 1 with no trials."""
    from scipy.stats import binomtest

    return float(binomtest(successes, n, p0, alternative="greater").pvalue) if n else 1.0


# ---------------------------------------------------------------------------------------------
# Charts


@lru_cache(maxsize=1)
def cjk_font() -> str | None:
    """The first installed font of CJK_FONTS that matplotlib can use, or None."""
    from matplotlib import font_manager

    def known() -> set[str]:
        return {entry.name for entry in font_manager.fontManager.ttflist}

    names = known()
    if not any(name in names for name in CJK_FONTS):
        # matplotlib's font cache predates a font installed later (apt-get after the first import).
        for path in font_manager.findSystemFonts():
            if any(hint in Path(path).name.lower().replace("-", "").replace("_", "") for hint in CJK_FILE_HINTS):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue  # an unreadable font file: try the next
        names = known()
    return next((name for name in CJK_FONTS if name in names), None)


def chart_lang(lang: str) -> str:
    """Charts are in `lang` when it is English or a CJK font exists; else English."""
    return lang if lang == "en" or cjk_font() else "en"


@contextmanager
def _chart_style(lang: str) -> Iterator[None]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    font = cjk_font() if lang == "zh" else None
    style = {"axes.unicode_minus": False}
    if font:
        style.update({"font.family": "sans-serif", "font.sans-serif": [font, "DejaVu Sans"]})
    with matplotlib.rc_context(style):
        yield


def _class_label(name: str, lang: str) -> str:
    if name == UNPARSED:
        return i18n.text(lang, "unparsed")
    return name if lang == "zh" else i18n.ASCII_CLASSES.get(name, name)


def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _figure(width: float, height: float) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _row_baseline(row: dict[str, Any], tasks: dict[str, Any]) -> dict[str, Any] | None:
    """The baselines block of the closed-label task a rate row belongs to, or None."""
    block = _block_of(row["key"], tasks)
    return (block or {}).get("baselines")


def _block_of(key: str, tasks: dict[str, Any]) -> dict[str, Any] | None:
    task, metric = i18n.split_key(key)
    if metric.startswith("choice_"):
        return (tasks.get("choice") or {}).get(task)
    if task.startswith("benchmark."):
        return (tasks.get("benchmarks") or {}).get(task.split(".", 1)[1])
    return tasks.get(task)


def metrics_chart(table: list[dict[str, Any]], tasks: dict[str, Any] | None = None, lang: str = DEFAULT_LANG) -> bytes | None:
    """Rates of both models with their intervals, each bar's value written beside it (a 0 stays
    visible), and the majority (dashed) and random (dotted) baselines of closed-label rows."""
    rows = [row for row in table if is_rate(row) and row.get("base") is not None and row.get("finetuned") is not None]
    if not rows:
        return None
    import numpy as np

    lang = chart_lang(lang)
    with _chart_style(lang):
        fig, ax = _figure(8.5, 0.62 * len(rows) + 1.6)
        y = np.arange(len(rows))
        for offset, variant, color in ((-0.2, "base", "#9aa5b1"), (0.2, "finetuned", "#4c78a8")):
            values = [row[variant] * 100 for row in rows]
            errors = [
                [max(0.0, (row[variant] - (row[f"{variant}_ci"][0] if row[f"{variant}_ci"][0] is not None else row[variant])) * 100) for row in rows],
                [max(0.0, ((row[f"{variant}_ci"][1] if row[f"{variant}_ci"][1] is not None else row[variant]) - row[variant]) * 100) for row in rows],
            ]
            ax.barh(y + offset, values, height=0.38, xerr=errors, color=color, label=i18n.text(lang, variant), capsize=3)
            for position, value, upper in zip(y + offset, values, errors[1]):
                # The value beside every bar (past its interval), so a bar of length 0 still reads 0.
                ax.text(value + upper + 1.0, position, f"{value:.1f}", va="center", fontsize=7, color="#1f2933")
                if value == 0:
                    ax.plot([0, 0], [position - 0.17, position + 0.17], color=color, linewidth=3)
        labelled: set[str] = set()
        for index, row in enumerate(rows):
            baselines = _row_baseline(row, tasks or {})
            if not baselines:
                continue
            metric = "accuracy" if row["key"].endswith("accuracy") else "macro_f1" if row["key"].endswith("macro_f1") else None
            if metric is None:
                continue
            for kind, style in (("majority", "--"), ("random", ":")):
                name = i18n.text(lang, f"chart_{kind}")
                ax.plot([baselines[kind][metric] * 100] * 2, [index - 0.45, index + 0.45], linestyle=style, color="#b42318", linewidth=1.4,
                        label=None if name in labelled else name)
                labelled.add(name)
        ax.set_yticks(y)
        ax.set_yticklabels([i18n.metric_name(row, lang) for row in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(i18n.text(lang, "chart_percent"))
        ax.set_xlim(0, 112)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
        ax.set_title(i18n.text(lang, "chart_metrics"), fontsize=10)
        return _png(fig)


def confusion_chart(block: dict[str, Any], task: str = "news_impact", lang: str = DEFAULT_LANG) -> bytes | None:
    """Both models' confusion matrices side by side; axis labels only where they cannot collide."""
    import numpy as np

    lang = chart_lang(lang)
    with _chart_style(lang):
        import matplotlib.pyplot as plt

        columns = block["base"]["confusion"]["columns"]
        rows = len(block["base"]["confusion"]["labels"])
        fig, axes = plt.subplots(1, 2, figsize=(1.8 + 1.7 * len(columns), 1.9 + 0.85 * rows), constrained_layout=True)
        vmax = max(max(max(r) for r in block[v]["confusion"]["matrix"]) for v in VARIANTS) or 1
        for index, (ax, variant) in enumerate(zip(axes, VARIANTS)):
            confusion = block[variant]["confusion"]
            matrix = np.array(confusion["matrix"])
            ax.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax)
            ax.set_xticks(range(len(confusion["columns"])))
            ax.set_xticklabels([_class_label(c, lang) for c in confusion["columns"]], rotation=35, ha="right", fontsize=8)
            ax.set_yticks(range(len(confusion["labels"])))
            # The right matrix shares the left one's rows: its row names would run into the left plot.
            ax.set_yticklabels([_class_label(c, lang) for c in confusion["labels"]] if index == 0 else [], fontsize=8)
            ax.set_xlabel(i18n.text(lang, "predicted"))
            if index == 0:
                ax.set_ylabel(i18n.text(lang, "realized"))
            ax.set_title(i18n.text(lang, variant))
            for (r, c), value in np.ndenumerate(matrix):
                ax.text(c, r, str(value), ha="center", va="center", color="white" if value > vmax / 2 else "black", fontsize=9)
        fig.suptitle(i18n.text(lang, "chart_confusion", task=i18n.task_name(task, lang)))
        return _png(fig)


def table_chart(table: list[dict[str, Any]], lang: str = DEFAULT_LANG) -> bytes | None:
    if not table:
        return None
    lang = chart_lang(lang)
    cells = [
        [i18n.metric_name(row, lang), format_value(row, row["base"]), format_value(row, row["finetuned"]),
         format_delta(row, row["delta"], lang), format_delta_interval(row, row["delta_ci"], lang), format_p(row.get("p_value")),
         i18n.verdict(row["verdict"], lang)]
        for row in table
    ]
    header = [i18n.text(lang, k) for k in ("metric", "base", "finetuned", "delta_pp")] + ["95% CI", i18n.text(lang, "p"), i18n.text(lang, "verdict")]
    with _chart_style(lang):
        fig, ax = _figure(13, 0.36 * len(cells) + 0.8)
        ax.axis("off")
        rendered = ax.table(cellText=cells, colLabels=header, loc="center", cellLoc="left")
        rendered.auto_set_font_size(False)
        rendered.set_fontsize(8)
        rendered.auto_set_column_width(list(range(7)))
        return _png(fig)


# ---------------------------------------------------------------------------------------------
# Examples


def select_examples(
    items: list[dict[str, Any]], per_item: dict[str, dict[str, Any]], *, per_group: int = 2, seed: int = 0,
    generated: frozenset[str] = frozenset(),
) -> dict[str, dict[str, Any]]:
    """{task: {"counts": {win, loss, tie}, "shown": {group: [items]}}}; see the module docstring.

    Items whose answers both models generated (`generated` ids) are shown first: under choice
    scoring only a few closed-label items are generated, and an example without text shows nothing.
    """
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
            "shown": {group: _sample_generated_first(rng, members, per_group, generated) for group, members in groups.items()},
        }
    return chosen


def _sample_generated_first(rng: random.Random, members: list[dict[str, Any]], count: int, generated: frozenset[str]) -> list[dict[str, Any]]:
    with_text = [item for item in members if item["id"] in generated]
    without = [item for item in members if item["id"] not in generated]
    shown = rng.sample(with_text, min(count, len(with_text)))
    shown += rng.sample(without, min(count - len(shown), len(without)))
    return sorted(shown, key=lambda it: it["id"])


def question_text(item: dict[str, Any]) -> str:
    return "\n\n".join(m["content"] for m in item["messages"] if m["role"] != "system")


def _returns_text(item: dict[str, Any], lang: str = DEFAULT_LANG) -> str:
    label = item.get("label") or {}
    returns = label.get("returns") or {}
    parts = []
    for ticker, by_window in returns.items():
        windows = sorted(by_window.items(), key=lambda kv: int(kv[0]))
        shown = ", ".join(f"{int(w):+d}min {r * 100:+.2f}%" for w, r in windows if r is not None)
        parts.append(f"{ticker}: {shown}")
    if label.get("direction"):
        parts.append(i18n.text(lang, "label_line", direction=label["direction"], ticker=label.get("ticker"), window=label.get("window_min"),
                                threshold=label.get("threshold")))
    return "\n".join(parts)


def label_is_buried(answer: str, scores: dict[str, Any]) -> bool:
    """True when the parsed label was not stated as the answer's conclusion but found in free text.

    News directions say how they were parsed (`method`): a `方向：` key or a ticker line is a
    stated conclusion, a keyword anywhere is not. Other labels count as stated when they appear
    within the answer's first STATED_WITHIN_CHARS characters.
    """
    parsed = scores.get("parsed")
    if parsed is None or not isinstance(parsed, str):
        return False
    method = scores.get("method")
    if method is not None:
        return method not in ("structured", "ticker")
    position = answer.find(parsed)
    return position < 0 or position > STATED_WITHIN_CHARS


def _answer_note(answer: str | None, scores: dict[str, Any], lang: str) -> tuple[str, list[str]]:
    """(what was scored, warnings) for one model's answer."""
    from finqlora.evaluate.metrics import repetition_rate

    parts = []
    if "parsed" in scores:
        parts.append(i18n.text(lang, "parsed", value=i18n.text(lang, "unparsed") if scores["parsed"] is None else scores["parsed"]))
    if "choice" in scores:
        parts.append(i18n.text(lang, "choice", value=scores["choice"]))
    warnings = []
    if answer is not None:
        if label_is_buried(answer, scores):
            warnings.append(i18n.text(lang, "buried"))
        rate = repetition_rate(answer)
        if rate > REPETITIVE_SHARE:
            warnings.append(i18n.text(lang, "repetitive", rate=f"{rate * 100:.0f}%"))
    return "; ".join(parts), warnings


def _example_views(examples: dict[str, dict[str, Any]], outputs: dict[str, dict[str, str]], per_item: dict[str, dict[str, Any]],
                   lang: str) -> list[dict[str, Any]]:
    views = []
    for task, chosen in examples.items():
        shown = []
        for group in ("win", "loss", "tie"):
            for item in chosen["shown"][group]:
                scores = per_item.get(item["id"], {})
                answers = {}
                for v in VARIANTS:
                    answer = outputs[v].get(item["id"])
                    note, warnings = _answer_note(answer, scores.get(v, {}), lang)
                    answers[v] = {"text": answer if answer is not None else i18n.text(lang, "not_generated"), "note": note, "warnings": warnings}
                shown.append({"group": group, "group_name": i18n.text(lang, group), "id": item["id"], "question": question_text(item),
                              "returns": _returns_text(item, lang), "reference": item.get("reference", ""), "answers": answers})
        views.append({"task": i18n.task_name(task, lang), "counts": i18n.text(lang, "counts", **chosen["counts"]), "shown": shown})
    return views


# ---------------------------------------------------------------------------------------------
# What the templates show


def _hyperparameters(training_info: dict[str, Any] | None, lang: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(key rows, the rest): the few settings a reader needs, then everything else (folded)."""
    if not training_info:
        return [], []
    hyper = training_info.get("hyperparameters") or {}
    key_rows, rest = [], []
    base = training_info.get("base_model")
    if base:
        # training_info names the base as resolved (train/setup.model_identity); its spec is what the user wrote.
        key_rows.append((i18n.text(lang, "hp_base_model"), base if isinstance(base, str) else str(base.get("spec") or _short(base))))
    for name in KEY_HYPERPARAMETERS:
        if name in hyper and hyper[name] is not None:
            key_rows.append((name, _short(hyper[name])))
    timing = training_info.get("timing") or {}
    if "train_seconds" in timing:
        key_rows.append((i18n.text(lang, "hp_train_time"), str(timing["train_seconds"])))
    if training_info.get("best_val_loss") is not None:
        key_rows.append((i18n.text(lang, "hp_best_val"), f"{training_info['best_val_loss']:.4f} (step {training_info.get('best_step')})"))
    for name, value in hyper.items():
        if name not in KEY_HYPERPARAMETERS:
            rest.append((name, _short(value)))
    return key_rows, rest


def _choice_normalisation(stored: str, lang: str) -> str:
    """The option-scoring rule in the report's language (metrics.json records it in English)."""
    from finqlora.evaluate.choice import NORMALISATION

    return i18n.text(lang, "choice_norm") if stored.startswith(NORMALISATION) else stored


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 160 else text[:157] + "..."


def _data_card(metrics: dict[str, Any], training_info: dict[str, Any] | None, lang: str) -> list[tuple[str, str]]:
    meta = metrics.get("meta") or {}
    tasks = metrics.get("tasks") or {}

    def t(key: str, **values: Any) -> str:
        return i18n.text(lang, key, **values)

    pairs = [
        (t("card_test_data"), str(meta.get("data"))),
        (t("card_sha"), str(meta.get("data_sha256"))),
        (t("card_split"), str(meta.get("split"))),
        (t("card_items"), str(metrics.get("n_items"))),
        (t("card_by_task"), ", ".join(f"{i18n.task_name(k, lang)}: {v}" for k, v in (metrics.get("items_by_task") or {}).items())),
        (t("card_scoring"), str(meta.get("scoring", "generate"))),
    ]
    labels_block = tasks.get("news_impact") or (tasks.get("choice") or {}).get("news_impact")
    if labels_block:
        pairs.append((t("card_labels"), ", ".join(f"{k}: {v}" for k, v in labels_block["label_counts"].items())))
    if training_info and training_info.get("dataset"):
        ds = training_info["dataset"]
        pairs.append((t("card_training"), f"{ds.get('path')} (train {ds.get('train_records')}, val {ds.get('val_records')}, sha256 {str(ds.get('sha256'))[:16]})"))
    generation = meta.get("generation") or {}
    if generation:
        pairs.append((t("card_generation"), ", ".join(f"{k}={v}" for k, v in generation.items()) + f", batch_size={meta.get('batch_size')}"))
    pairs.append((t("card_model"), f"{meta.get('model')} + adapter {meta.get('adapter')}" + (t("merged") if meta.get("adapter_merged") else "")))
    pairs.append((t("card_device"), f"{meta.get('device')} ({meta.get('dtype')})"))
    for variant in VARIANTS:
        cost = (metrics.get("generation_cost") or {}).get(variant)
        if cost and cost.get("items"):
            pairs.append((t("card_cost", variant=t(variant)), t("cost_value", items=cost["items"], seconds=cost["seconds"], tokens=cost["new_tokens"],
                                                                 rate=cost["tokens_per_s"], capped=cost["hit_max_new_tokens"])))
    speed = (meta.get("timings") or {}).get("generation_speed")
    if speed:
        pairs.append((t("card_speed"), f"fine-tuned {speed['finetuned_tokens_per_s']} vs base {speed['base_tokens_per_s']} tokens/s (ratio {speed['ratio']})"))
    if (tasks.get("overlap") or {}).get("bleu_signature"):
        pairs.append((t("card_bleu"), tasks["overlap"]["bleu_signature"]))
    return pairs


def mcc_values(block: dict[str, Any] | None) -> dict[str, tuple[float, list[float] | None]] | None:
    """{variant: (mcc, [low, high] or None)} when metrics.json holds the direction task's MCC.

    It may sit in each variant's block (`block["base"]["mcc"]`, `["mcc_ci"]`) or in the task
    block keyed by variant (`block["mcc"]["base"]`, `block["mcc_ci"]["base"]`).
    """
    if not block:
        return None
    found = {}
    for v in VARIANTS:
        own = block.get(v) or {}
        if isinstance(own, dict) and own.get("mcc") is not None:
            found[v] = (own["mcc"], own.get("mcc_ci"))
        elif isinstance(block.get("mcc"), dict) and block["mcc"].get(v) is not None:
            found[v] = (block["mcc"][v], (block.get("mcc_ci") or {}).get(v))
    return found if len(found) == len(VARIANTS) else None


def _format_mcc(value: float, interval: Sequence[float | None] | None) -> str:
    if interval and interval[0] is not None and interval[1] is not None:
        return f"{value:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]"
    return f"{value:+.3f}"


def _mcc_rows(tasks: dict[str, Any], lang: str) -> list[dict[str, str]]:
    rows = []
    for name, block in (("news_impact", tasks.get("news_impact")), ("news_impact.choice", (tasks.get("choice") or {}).get("news_impact"))):
        values = mcc_values(block)
        if values:
            scoring = i18n.text(lang, "scoring_choice" if name.endswith("choice") else "scoring_generate")
            rows.append({"task": f"{i18n.task_name('news_impact', lang)} ({scoring})",
                         **{v: _format_mcc(*values[v]) for v in VARIANTS}})
    return rows


def _primary_rows(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One McNemar accuracy row per task: the choice-scored one where both exist (every item
    answers, so it has the most power), else the parsed-generation one."""
    by_task: dict[str, dict[str, Any]] = {}
    for row in table:
        if row.get("test") != "McNemar exact":
            continue
        task, metric = i18n.split_key(row["key"])
        if task not in by_task or metric.startswith("choice_"):
            by_task[task] = row
    return list(by_task.values())


def _verdict_summary(metrics: dict[str, Any], lang: str = "en") -> list[str]:
    """One sentence per closed-label task: fine-tune vs base (McNemar) and vs the majority
    baseline (one-sided exact binomial test), and a plain statement when nothing improved."""
    tasks = metrics.get("tasks") or {}
    level = metrics.get("significance_level", 0.05)
    lines = []
    primary = _primary_rows(metrics.get("table", []))
    for row in primary:
        task, metric = i18n.split_key(row["key"])
        scoring = i18n.text(lang, "scoring_choice" if metric.startswith("choice_") else "scoring_generate")
        sentence = i18n.text(
            lang, "sentence", task=i18n.task_name(task, lang), scoring=scoring, n=row["n"], tuned=format_value(row, row["finetuned"]),
            base=format_value(row, row["base"]), delta=format_delta(row, row["delta"], lang, long=True), p=_p_clause(row.get("p_value")),
            verdict=i18n.verdict(row["verdict"], lang),
        )
        baselines = _row_baseline(row, tasks)
        if baselines and row.get("finetuned") is not None:
            majority = baselines["majority"]
            gap = row["finetuned"] - majority["accuracy"]
            p_majority = binomial_greater_p(round(row["finetuned"] * row["n"]), row["n"], majority["accuracy"])
            gap_text = i18n.text(lang, "higher_by" if gap >= 0 else "lower_by", pp=format_delta(row, abs(gap), lang, long=True).lstrip("+"))
            sentence += i18n.text(lang, "sentence_baseline", majority=_percent(majority["accuracy"]), label=majority["class"],
                                  random=_percent(baselines["random"]["accuracy"]), gap=gap_text, p2=_p_clause(p_majority),
                                  verdict2=i18n.text(lang, "beats" if p_majority < level else "not_beats"))
        elif task == "report_qa":
            sentence += i18n.text(lang, "sentence_numeric")
        if task == "news_impact":
            values = mcc_values(_block_of(row["key"], tasks))
            if values:
                sentence += i18n.text(lang, "sentence_mcc", base=_format_mcc(*values["base"]), tuned=_format_mcc(*values["finetuned"]))
        lines.append(sentence + ("。" if lang == "zh" else "."))
    if primary and not any("better" in row["verdict"] for row in metrics.get("table", []) if row.get("test") == "McNemar exact"):
        lines.append(i18n.text(lang, "no_gain"))
    return lines


def _metric_rows(table: list[dict[str, Any]], lang: str = DEFAULT_LANG) -> list[dict[str, Any]]:
    return [{
        "name": i18n.metric_name(row, lang), "n": row["n"], "test": i18n.test_name(row["test"], lang), "p": format_p(row.get("p_value")),
        "verdict": i18n.verdict(row["verdict"], lang),
        "tone": "better" if "better" in row["verdict"] else "worse" if "worse" in row["verdict"] else "same",
        "base": format_value(row, row["base"]), "base_ci": format_interval(row, row["base_ci"]),
        "finetuned": format_value(row, row["finetuned"]), "finetuned_ci": format_interval(row, row["finetuned_ci"]),
        "delta": format_delta(row, row["delta"], lang), "delta_ci": format_delta_interval(row, row["delta_ci"], lang),
    } for row in table]


def _baseline_rows(tasks: dict[str, Any], lang: str = DEFAULT_LANG) -> list[dict[str, str]]:
    choice = i18n.text(lang, "scoring_choice")
    blocks = [(i18n.task_name(task, lang), tasks.get(task)) for task in CLOSED_TASKS]
    blocks += [(i18n.task_name(f"benchmark.{name}", lang), block) for name, block in (tasks.get("benchmarks") or {}).items()]
    blocks += [(f"{i18n.task_name(name, lang)} ({choice})", block) for name, block in (tasks.get("choice") or {}).items()]
    rows = []
    for name, block in blocks:
        if not block:
            continue
        majority, chance = block["baselines"]["majority"], block["baselines"]["random"]
        rows.append({"task": name, "majority_accuracy": f"{_percent(majority['accuracy'])} ({i18n.text(lang, 'always', label=majority['class'])})",
                     "majority_f1": _percent(majority["macro_f1"]), "random_accuracy": _percent(chance["accuracy"]),
                     "random_f1": _percent(chance["macro_f1"])})
    return rows


def _breakdown_rows(block: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not block or not block.get("by_ticker_window"):
        return []
    return [{"group": group, "n": values["n"], **{f"{v}_{m}": _percent(values[v][m]) for v in VARIANTS for m in ("accuracy", "macro_f1")}}
            for group, values in block["by_ticker_window"].items()]


def _repetition_note(metrics: dict[str, Any], lang: str) -> str | None:
    block = (metrics.get("tasks") or {}).get("repetition")
    if not block:
        return None
    generation = (metrics.get("meta") or {}).get("generation") or {}
    settings = ", ".join(f"{k}={v}" for k, v in generation.items()) or "n/a"
    return i18n.text(lang, "repetition", n=block.get("ngram"), settings=settings)


def _blind_ratings(run_dir: Path) -> list[dict[str, Any]]:
    """Rounds of the browser's blind A/B rating (`finqlora ui`), when that module is installed."""
    if importlib.util.find_spec("finqlora.evaluate.ratings") is None:
        return []
    from finqlora.evaluate.ratings import summarize_rounds

    views = []
    for round_ in summarize_rounds(run_dir):
        kappas = [f"{key}: {value:.3f}" if isinstance(value, (int, float)) else f"{key}: {value}"
                  for key, value in round_.items() if "kappa" in key and value is not None]
        means = round_.get("mean_scores") or {}
        scores = [f"{field}: {means.get('base', {}).get(field)} → {means.get('finetuned', {}).get(field)}" for field in ("professional", "accuracy")]
        views.append({**round_, "win_rate_text": _percent(round_.get("win_rate")),
                      "win_ci_text": f"[{_percent(round_.get('win_ci_low'))}, {_percent(round_.get('win_ci_high'))}]",
                      "kappa_text": "; ".join(kappas) or "n/a", "scores_text": "; ".join(scores) if means else "n/a"})
    return views


def _suite_view(suite: dict[str, Any] | None, lang: str = DEFAULT_LANG) -> dict[str, Any] | None:
    """The suite table (templates suite.html / suite.md): accuracies in %, differences in percentage points."""
    if not suite:
        return None

    def pct(value: Any) -> str:
        return "–" if value is None else f"{value * 100:.1f}"

    def points(value: Any, interval: Any) -> str:
        if value is None:
            return "–"
        bounds = f" [{interval[0] * 100:+.1f}, {interval[1] * 100:+.1f}]" if interval and None not in interval else ""
        return f"{value * 100:+.1f}{bounds}"

    rows = []
    for row in suite["sets"]:
        if not row["evaluated"]:
            rows.append({"set": row["set"], "what": row["what"], "evaluated": False})
            continue
        rows.append({"set": row["set"], "what": row["what"], "evaluated": True, "n": row["n"], "base": pct(row["base"]), "finetuned": pct(row["finetuned"]),
                     "delta": points(row["delta"], row["delta_ci"]), "p": format_p(row.get("p_value")), "verdict": i18n.verdict(row["verdict"], lang), "majority": pct(row.get("majority"))})
    average = suite.get("average")
    return {"title": i18n.text(lang, "suite_title", name=suite["name"]), "rows": rows, "average": average and {
        "label": i18n.text(lang, "suite_average", sets=len(average["sets"])), "n": average["n"], "base": pct(average["base"]), "finetuned": pct(average["finetuned"]),
        "delta": points(average["delta"], average["delta_ci"])}}


def _judge_view(eval_dir: Path, lang: str = DEFAULT_LANG) -> dict[str, Any] | None:
    """The LLM judge's verdict (templates judge.html / judge.md), from EVAL/judge/judge.json."""
    from finqlora.evaluate.judge import read_judge

    verdict = read_judge(eval_dir)
    if not verdict:
        return None

    def pct(value: Any) -> str:
        return i18n.text(lang, "na") if value is None else f"{value * 100:.1f}%"

    return {**verdict, "note": i18n.text(lang, "judge_note", model=verdict["judge_model"]), "win_text": pct(verdict["win_rate"]), "ci_text": f"[{pct(verdict['win_ci_low'])}, {pct(verdict['win_ci_high'])}]",
            "tie_text": pct(verdict["tie_rate"]), "loss_text": pct(verdict["loss_rate"]), "consistency_text": pct(verdict["position_consistency"]),
            "kappa_rows": [{"round": entry["round"], "rater": rater, "pairs": info["items"], "kappa": f"{info['cohen_kappa']:.3f}"}
                           for entry in verdict["agreement_with_raters"] for rater, info in entry["raters"].items()]}


def _fence(text: str) -> str:
    """A Markdown code fence longer than any backtick run in `text`, so the text stays literal."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _environments() -> tuple[Any, Any]:
    """(HTML environment with autoescaping, Markdown environment without it)."""
    import jinja2

    loader = jinja2.PackageLoader("finqlora.report", "templates")
    common = {"loader": loader, "trim_blocks": True, "lstrip_blocks": True, "undefined": jinja2.StrictUndefined}
    html = jinja2.Environment(autoescape=True, **common)
    markdown = jinja2.Environment(autoescape=False, **common)

    def md_cell(value: Any) -> str:
        # A table cell: a `|` would end the cell, a newline the row.
        return str(value).replace("|", "\\|").replace("\n", " ")

    def md_block(value: Any) -> str:
        text = str(value)
        fence = _fence(text)
        return f"{fence}text\n{text}\n{fence}"

    markdown.filters.update(md_cell=md_cell, md_block=md_block)
    return html, markdown


def _charts(metrics: dict[str, Any], train_dir: Path | None, training_info: dict[str, Any] | None, output: Path, lang: str) -> dict[str, Path]:
    from finqlora.core.loss_plot import plot_losses

    images: dict[str, Path] = {}
    train_points, val_points = _loss_points(train_dir, training_info)
    drawn = chart_lang(lang)
    if train_points or val_points:
        best = (training_info or {}).get("best_step")
        labels = {key: i18n.text(drawn, f"chart_{key}", step=best) if key == "best" else i18n.text(drawn, f"chart_{key}")
                  for key in ("train_loss", "val_loss", "best", "step", "loss")}
        with _chart_style(drawn):
            images["loss_curve"] = plot_losses(train_points, val_points, output / "loss_curve.png", best_step=best,
                                               title=i18n.text(drawn, "chart_loss_title"), labels=labels)
    tasks = metrics.get("tasks") or {}
    charts = {
        "metrics_chart": metrics_chart(metrics["table"], tasks, lang),
        "metrics_table": table_chart(metrics["table"], lang),
    }
    # A confusion figure per closed-label task (generation block, else the choice one).
    for task in CLOSED_TASKS:
        block = tasks.get(task) or (tasks.get("choice") or {}).get(task)
        if block:
            name = "confusion" if task == "news_impact" else f"confusion_{task}"
            charts[name] = confusion_chart(block, task, lang)
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
    lang: str = DEFAULT_LANG,
) -> ReportPaths:
    """Write report.html, report.md and the PNGs into `output_dir` (default: the eval folder).

    Refused while another process holds the run folder the report goes into (finqlora.core.lock).
    """
    with lock_enclosing_run(Path(output_dir) if output_dir is not None else Path(run_dir)):
        return _build_report(run_dir, output_dir, training_dir=training_dir, title=title,
                             examples_per_group=examples_per_group, seed=seed, lang=lang)


def _build_report(run_dir: str | Path, output_dir: str | Path | None, *, training_dir: str | Path | None,
                  title: str | None, examples_per_group: int, seed: int, lang: str) -> ReportPaths:
    lang = i18n.check_lang(lang)
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
    generated = frozenset(set(outputs["base"]) & set(outputs["finetuned"]))
    examples = select_examples(items, per_item, per_group=examples_per_group, seed=seed, generated=generated)
    images = _charts(metrics, train_dir, training_info, output, lang)
    tasks = metrics.get("tasks") or {}
    choice_blocks = tasks.get("choice") or {}
    key_hyper, other_hyper = _hyperparameters(training_info, lang)
    card = _dataset_card(training_info, meta)
    val_losses = (training_info or {}).get("val_losses") or []
    eval_steps = ((training_info or {}).get("hyperparameters") or {}).get("eval_steps")
    choice_note = next((block["normalisation"] for block in choice_blocks.values()), None)
    page = {
        "lang": lang, "t": i18n.TEXT[lang],
        "title": title or i18n.text(lang, "title", model=meta.get("model", "model")),
        "generated": i18n.text(lang, "generated", created=meta.get("created_utc", ""), significance=metrics["significance_level"],
                               resamples=metrics["bootstrap"]["resamples"]),
        "summary": _verdict_summary(metrics, lang), "rows": _metric_rows(metrics["table"], lang), "baselines": _baseline_rows(tasks, lang),
        "mcc": _mcc_rows(tasks, lang), "breakdown": _breakdown_rows(tasks.get("news_impact")),
        "choice_note": i18n.text(lang, "choice_note", norm=_choice_normalisation(choice_note, lang)) if choice_note else None,
        "repetition_note": _repetition_note(metrics, lang),
        "font_note": None if chart_lang(lang) == lang else i18n.text(lang, "font_missing"),
        "val_note": i18n.text(lang, "val_points", n=len(val_losses), steps=eval_steps) if val_losses and eval_steps else None,
        "hyper": key_hyper, "hyper_more": other_hyper, "card": _data_card(metrics, training_info, lang),
        "dataset_card": card, "ratings": _blind_ratings(eval_dir),
        "examples": _example_views(examples, outputs, per_item, lang),
        "examples_rule": i18n.text(lang, "examples_rule", margin=ROUGE_TIE_MARGIN, seed=seed, per_group=examples_per_group),
        "suite": _suite_view(metrics.get("suite"), lang), "judge": _judge_view(eval_dir, lang),
    }
    html_env, md_env = _environments()
    embedded = {name: base64.b64encode(path.read_bytes()).decode("ascii") for name, path in images.items()}
    card_html = render_markdown(card) if card else None
    html_path = atomic_write_text(output / "report.html", html_env.get_template("report.html").render(**page, images=embedded, card_html=card_html))
    md_card = re.sub(r"(?m)^(#{1,3}) ", r"###\1 ", card) if card else None  # the card's headings below the report's
    md_path = atomic_write_text(output / "report.md", md_env.get_template("report.md").render(
        **{**page, "dataset_card": md_card}, images={name: path.name for name, path in images.items()}))
    return ReportPaths(html_path, md_path, images)
