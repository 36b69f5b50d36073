"""The report: built from cached files, self-contained, rendered by headless Chromium, and
showing the numbers of metrics.json."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from finqlora.core.errors import FinqloraError
from finqlora.evaluate.evaluation import compute_metrics
from finqlora.report import i18n
from finqlora.report.report import NO_CAPABILITY_GAIN, build_report, select_examples

DIRECTIONS = ["利好", "利空", "中性"]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_eval_dir(root: Path) -> tuple[Path, Path]:
    """An evaluation folder + training folder as `finqlora eval` / `finqlora train` write them.

    News items 0..11 cycle through the three labels. Base always answers 利好 (right on
    0, 3, 6, 9); fine-tuned is right except on items 3 and 4 (item 4 unparseable).
    => wins: 1, 2, 5, 7, 8, 10, 11 (7); losses: 3 (1); ties: 0, 4, 6, 9 (4).
    """
    eval_dir, train_dir = root / "eval", root / "adapter"
    eval_dir.mkdir()
    train_dir.mkdir()
    items, base, tuned = [], [], []
    for i in range(12):
        label = DIRECTIONS[i % 3]
        item_id = f"news-{i:02d}"
        items.append({
            "id": item_id, "task": "news_impact", "reference": f"方向：{label}\n说明：样例",
            "messages": [{"role": "user", "content": f"分析快讯{i}对 XAUUSD 的影响。"}],
            "label": {"direction": label, "ticker": "XAUUSD", "window_min": 30 if i % 2 else 120, "directions": {"XAUUSD": label},
                      "returns": {"XAUUSD": {"-120": 0.0012, "5": -0.0004, "30": 0.0031}}, "threshold": 0.0015},
            "event_id": f"ev{i}", "event_time": "2026-06-01T02:00:00Z",
        })
        base.append("方向：利好")
        tuned_answer = f"方向：{label}"
        if i == 3:
            tuned_answer = "方向：利空"
        if i == 4:
            tuned_answer = "我无法判断。"
        tuned.append(tuned_answer)
    for i, (answer, base_answer, tuned_answer) in enumerate([(12.5, "答案：12.50%", "答案：12.50%"), (3.2, "大约 5%", "答案：3.20%"), (40.0, "无法计算", "答案：41.00%")]):
        items.append({"id": f"qa-{i}", "task": "report_qa", "reference": f"答案：{answer:.2f}%", "messages": [{"role": "user", "content": f"计算指标{i}"}],
                      "label": {"metric": "net_margin", "answer": answer, "unit": "%", "tolerance": 0.01}})
        base.append(base_answer)
        tuned.append(tuned_answer)
    _jsonl(eval_dir / "items.jsonl", items)
    for variant, outputs in (("base", base), ("finetuned", tuned)):
        _jsonl(eval_dir / f"generations_{variant}.jsonl",
               [{"id": item["id"], "output": out, "tokens": 5, "finished": True, "seconds": 0.5} for item, out in zip(items, outputs)])
        scale = 1.0 if variant == "base" else 0.5
        _jsonl(eval_dir / f"perplexity_{variant}.jsonl", [{"id": item["id"], "nll": 20.0 * scale + i, "tokens": 10} for i, item in enumerate(items)])
        _jsonl(eval_dir / f"forgetting_{variant}.jsonl", [{"id": f"g{i}", "nll": 30.0 + i * (1.0 if variant == "base" else 1.1), "tokens": 12} for i in range(8)])
    (eval_dir / "eval_config.json").write_text(json.dumps({
        "created_utc": "2026-11-29T00:00:00Z", "model": "builtin:qwen2.5-coder-0.5b-instruct", "adapter": str(train_dir),
        "data": "data/instructions.jsonl", "split": "test", "generation": {"max_new_tokens": 64, "temperature": 0.0}, "batch_size": 8,
        "device": "cpu", "dtype": "torch.float32",
    }), encoding="utf-8")
    (train_dir / "training_info.json").write_text(json.dumps({
        "base_model": "builtin:qwen2.5-coder-0.5b-instruct",
        "hyperparameters": {"lora_r": 8, "lora_alpha": 16, "learning_rate": 0.0002, "num_epochs": 2, "max_length": 512},
        "dataset": {"path": "data/instructions.jsonl", "sha256": "ab" * 32, "train_records": 180, "val_records": 60},
        "timing": {"train_seconds": 512.3},
        "train_losses": [{"step": s, "loss": 2.5 - 0.1 * s} for s in range(1, 11)],
        "val_losses": [{"step": 5, "loss": 2.1}, {"step": 10, "loss": 1.8}],
        "best_step": 10, "best_val_loss": 1.8,
    }), encoding="utf-8")
    return eval_dir, train_dir


RATES = ("accuracy", "macro_f1", "parse_rate", "rouge_l", "repetition_rate")


def _formatted(row: dict, value: float) -> str:
    """An independent statement of the report's number format: rates in %, others 2 decimals."""
    is_rate = any(row["key"].endswith(s) for s in RATES)
    return f"{value * 100:.1f}%" if is_rate else f"{value:.2f}"


def _formatted_delta(row: dict, value: float, unit: str = "百分点") -> str:
    """Differences of rates in percentage points, others signed with 2 decimals."""
    sign = "+" if value > 0 else ""
    if any(row["key"].endswith(s) for s in RATES):
        return f"{sign}{value * 100:.1f} {unit}"
    return f"{sign}{value:.2f}"


@pytest.fixture()
def report_dir(tmp_path: Path) -> Path:
    eval_dir, _ = make_eval_dir(tmp_path)
    compute_metrics(eval_dir)  # the eval stage's job; the report only reads metrics.json
    build_report(tmp_path, tmp_path / "report", seed=0)
    return tmp_path


def test_the_report_reads_metrics_and_writes_only_its_own_folder(tmp_path: Path) -> None:
    eval_dir, _ = make_eval_dir(tmp_path)
    with pytest.raises(FinqloraError, match="has no metrics.json"):
        build_report(eval_dir, tmp_path / "report")
    compute_metrics(eval_dir)
    before = {path.name: path.read_bytes() for path in eval_dir.iterdir()}
    paths = build_report(eval_dir, tmp_path / "report")
    assert {path.name: path.read_bytes() for path in eval_dir.iterdir()} == before  # the eval folder is untouched
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(
        ["report.html", "report.md", "loss_curve.png", "metrics_chart.png", "metrics_table.png", "confusion.png"])
    assert paths.html.parent == tmp_path / "report"


def test_model_text_is_escaped(tmp_path: Path) -> None:
    eval_dir, _ = make_eval_dir(tmp_path)
    generations = eval_dir / "generations_finetuned.jsonl"
    rows = [json.loads(line) for line in generations.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        row["output"] = "<script>alert(1)</script> | 方向：利好"
    _jsonl(generations, rows)
    compute_metrics(eval_dir)
    paths = build_report(eval_dir, tmp_path / "report", examples_per_group=5)
    html = paths.html.read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # Markdown has no entities: the answer stays literal inside a fenced code block, where no
    # Markdown renderer reads it as markup.
    markdown = paths.markdown.read_text(encoding="utf-8")
    assert "```text\n<script>alert(1)</script> | 方向：利好\n```" in markdown
    outside_fences = re.sub(r"(?ms)^```text\n.*?^```$", "", markdown)
    assert "<script>" not in outside_fences


def test_metrics_are_computed_from_the_cache(report_dir: Path) -> None:
    metrics = json.loads((report_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    rows = {row["key"]: row for row in metrics["table"]}
    assert rows["news_impact.accuracy"]["base"] == pytest.approx(4 / 12)
    assert rows["news_impact.accuracy"]["finetuned"] == pytest.approx(10 / 12)
    assert rows["news_impact.parse_rate"]["finetuned"] == pytest.approx(11 / 12)
    mc = rows["news_impact.accuracy"]["mcnemar"]
    assert (mc["base_only"], mc["finetuned_only"]) == (1, 7)
    assert rows["news_impact.accuracy"]["p_value"] == pytest.approx(2 * 9 / 256)  # exact: 2 * P(X <= 1), X ~ Bin(8, 1/2)
    assert rows["report_qa.accuracy"]["base"] == pytest.approx(1 / 3) and rows["report_qa.accuracy"]["finetuned"] == pytest.approx(2 / 3)
    # reference perplexity: exp(mean nll per token)
    import math

    base_nll = sum(20.0 + i for i in range(15)) / 150
    assert rows["perplexity.reference"]["base"] == pytest.approx(math.exp(base_nll))
    assert metrics["tasks"]["news_impact"]["baselines"]["majority"]["accuracy"] == pytest.approx(1 / 3)


def test_examples_follow_the_rule(report_dir: Path) -> None:
    items = [json.loads(line) for line in (report_dir / "eval" / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    per_item = {json.loads(line)["id"]: json.loads(line) for line in (report_dir / "eval" / "per_item.jsonl").read_text(encoding="utf-8").splitlines()}
    chosen = select_examples(items, per_item, per_group=2, seed=0)
    assert chosen["news_impact"]["counts"] == {"win": 7, "loss": 1, "tie": 4}
    assert [item["id"] for item in chosen["news_impact"]["shown"]["loss"]] == ["news-03"]
    wins = {item["id"] for item in chosen["news_impact"]["shown"]["win"]}
    assert len(wins) == 2 and wins <= {"news-01", "news-02", "news-05", "news-07", "news-08", "news-10", "news-11"}
    assert select_examples(items, per_item, per_group=2, seed=0) == chosen  # reproducible


def test_html_is_self_contained_and_shows_the_numbers(report_dir: Path) -> None:
    out = report_dir / "report"
    html = (out / "report.html").read_text(encoding="utf-8")
    metrics = json.loads((report_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    for row in metrics["table"]:
        for key in ("base", "finetuned"):
            assert _formatted(row, row[key]) in html, (row["key"], key)
        assert _formatted_delta(row, row["delta"]) in html, row["key"]
        assert i18n.verdict(row["verdict"], "zh") in html
    assert "0.070" in html  # McNemar p of the news accuracy, 2 * 9 / 256
    # offline: nothing fetched from elsewhere
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", html)
    assert "<script" not in html and "<link" not in html
    assert html.count("data:image/png;base64,") >= 3
    for name in ("loss_curve.png", "metrics_chart.png", "metrics_table.png", "confusion.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "| 指标 | 样本数 |" in markdown and "![loss_curve](loss_curve.png)" in markdown
    assert "胜 7，负 1，平 4" in markdown and "胜 7，负 1，平 4" in html
    assert "lora_r" in html and "512.3" in html  # hyperparameters and training time
    assert "tok:zh" in html and "smooth:exp" in html  # the BLEU is cited by its sacreBLEU signature


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def test_report_renders_in_headless_chromium(report_dir: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine: `bash scripts/setup.sh --test` installs Debian's chromium (needs root and apt)")
    screenshot = tmp_path / "report.png"
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--hide-scrollbars",
        "--window-size=1280,2000", f"--screenshot={screenshot}", (report_dir / "report" / "report.html").as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert screenshot.exists() and screenshot.stat().st_size > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[0] == 2000 and pixels.shape[1] == 1280
    assert pixels[..., :3].std() > 0.05  # a rendered page, not a blank one


def test_blind_rating_rounds_appear_in_the_report(tmp_path: Path) -> None:
    from finqlora.evaluate import ratings

    eval_dir, _ = make_eval_dir(tmp_path)
    compute_metrics(eval_dir)
    html = build_report(eval_dir, tmp_path / "none").html.read_text(encoding="utf-8")
    assert "blind rating" not in html  # no round: no section
    rating_round = ratings.create_round(eval_dir, ["alice", "bob"], name="r1", limit=3, seed=0)
    for rater in ("alice", "bob"):
        for pair in rating_round.pairs:
            a_is = rating_round.raters[rater]["a_is"][pair["item"]]
            pick = "A" if a_is == "finetuned" else "B"  # both raters always prefer the fine-tuned answer
            ratings.save_rating(rating_round, rater, pair["item"], pick, {"A": {"professional": 4, "accuracy": 3}, "B": {"professional": 2, "accuracy": 5}})
    paths = build_report(eval_dir, tmp_path / "rated")
    html, markdown = paths.html.read_text(encoding="utf-8"), paths.markdown.read_text(encoding="utf-8")
    summary = ratings.summarize_rounds(eval_dir)[0]
    assert summary["win_rate"] == 1.0 and summary["ratings"] == 6
    for page in (html, markdown):
        assert "人工盲评 / blind rating" in page and "r1" in page
        assert "100.0%" in page and f"{summary['win_ci_low'] * 100:.1f}%" in page
        assert "cohen_kappa" in page


def test_the_summary_says_plainly_when_no_capability_metric_improved(report_dir: Path) -> None:
    # The fixture's news accuracy rises 4/12 -> 9/12, but 7 wins against 1 loss is McNemar p = 0.07.
    metrics = json.loads((report_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert not any("better" in row["verdict"] for row in metrics["table"] if row["test"] == "McNemar exact")
    assert i18n.text("zh", "no_gain") in (report_dir / "report" / "report.md").read_text(encoding="utf-8")


def test_the_summary_does_not_deny_a_significant_gain(tmp_path: Path) -> None:
    eval_dir, _ = make_eval_dir(tmp_path)
    # Two more copies of the news items make 21 wins against 3 losses: significant.
    items = [json.loads(line) for line in (eval_dir / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    news = [item for item in items if item["task"] == "news_impact"]
    copies = [{**item, "id": f"{item['id']}-{n}"} for n in (1, 2) for item in news]
    _jsonl(eval_dir / "items.jsonl", items + copies)
    for variant in ("base", "finetuned"):
        path = eval_dir / f"generations_{variant}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        by_id = {row["id"]: row for row in rows}
        _jsonl(path, rows + [{**by_id[c["id"].rsplit("-", 1)[0]], "id": c["id"]} for c in copies])
    compute_metrics(eval_dir)
    metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    assert any("better" in row["verdict"] for row in metrics["table"] if row["test"] == "McNemar exact")
    paths = build_report(eval_dir, tmp_path / "report", lang="en")
    markdown = paths.markdown.read_text(encoding="utf-8")
    assert NO_CAPABILITY_GAIN not in markdown
    assert "News direction (parsed generations, n=36): fine-tuned 83.3%, base 33.3%, difference +50.0 percentage points" in markdown


# ---------------------------------------------------------------------------------------------
# Issue 27: the report in Chinese (and English), honest and readable

ENTITY = re.compile(r"&(?:[A-Za-z]+|#\d+|#x[0-9A-Fa-f]+);")


def _with_mcc(eval_dir: Path) -> dict:
    """metrics.json as it is once the direction task carries its MCC (keys mcc, mcc_ci per model)."""
    metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    block = metrics["tasks"]["news_impact"]
    block["base"].update(mcc=0.0, mcc_ci=[0.0, 0.0])
    block["finetuned"].update(mcc=0.775, mcc_ci=[0.41, 1.0])
    (eval_dir / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False), encoding="utf-8")
    return metrics


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_report_md_holds_no_html_entities(tmp_path: Path, lang: str) -> None:
    eval_dir, _ = make_eval_dir(tmp_path)
    generations = eval_dir / "generations_base.jsonl"
    rows = [json.loads(line) for line in generations.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        row["output"] = 'A&B -> "利好" <b>x</b> & 1 < 2'
    _jsonl(generations, rows)
    compute_metrics(eval_dir)
    markdown = build_report(eval_dir, tmp_path / "report", examples_per_group=5, lang=lang).markdown.read_text(encoding="utf-8")
    assert not ENTITY.findall(markdown), ENTITY.findall(markdown)[:5]
    assert 'A&B -> "利好" <b>x</b> & 1 < 2' in markdown
    assert ("财报问答" if lang == "zh" else "Report Q&A") in markdown


def test_the_report_is_chinese_by_default_and_english_with_lang_en(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from finqlora.cli import app

    eval_dir, _ = make_eval_dir(tmp_path)
    compute_metrics(eval_dir)
    runner = CliRunner()
    result = runner.invoke(app, ["report", "--run", str(eval_dir), "--output", str(tmp_path / "zh")])
    assert result.exit_code == 0, result.output
    zh = (tmp_path / "zh" / "report.md").read_text(encoding="utf-8")
    assert "## 结论摘要" in zh and "新闻影响方向：准确率" in zh and "+50.0 百分点" in zh and "无显著差异" in zh
    # Every metric row has its Chinese name (an untranslated key falls back to the English label).
    assert "新闻影响方向：马修斯相关系数 MCC" in zh and "News direction" not in zh
    result = runner.invoke(app, ["report", "--run", str(eval_dir), "--output", str(tmp_path / "en"), "--lang", "en"])
    assert result.exit_code == 0, result.output
    en = (tmp_path / "en" / "report.md").read_text(encoding="utf-8")
    assert "## Summary" in en and "News direction: accuracy" in en and "+50.0 pp" in en and "结论摘要" not in en
    result = runner.invoke(app, ["report", "--run", str(eval_dir), "--output", str(tmp_path / "fr"), "--lang", "fr"])
    # `finqlora` (cli.main) prints a FinqloraError as "error: ... hint: ..."; the runner keeps the exception.
    assert result.exit_code != 0 and isinstance(result.exception, FinqloraError) and "unknown report language 'fr'" in str(result.exception)


def test_report_lang_is_one_config_key_with_one_default(tmp_path: Path) -> None:
    from finqlora.core.config import load_config

    assert load_config().eval.report_lang == "zh"
    assert load_config(overrides=["eval.report_lang=en"]).eval.report_lang == "en"
    with pytest.raises(FinqloraError, match="report_lang"):
        load_config(overrides=["eval.report_lang=fr"])


def test_the_summary_has_one_sentence_per_task_with_baselines_and_mcc(tmp_path: Path) -> None:
    eval_dir, _ = make_eval_dir(tmp_path)
    compute_metrics(eval_dir)
    _with_mcc(eval_dir)
    paths = build_report(eval_dir, tmp_path / "report", lang="zh")
    markdown = paths.markdown.read_text(encoding="utf-8")
    summary = markdown.split("## 结论摘要", 1)[1].split("## ", 1)[0]
    sentences = [line for line in summary.splitlines() if line.startswith("- ")]
    news, qa, no_gain = sentences  # one per closed-label task, then the plain statement
    # 10/12 right, majority (always 利好) 4/12: one-sided binomial P(X >= 10 | 12, 1/3) < 0.001.
    assert "新闻影响方向（解析生成的回答，n=12）：微调模型 83.3%，基座模型 33.3%，差 +50.0 个百分点（McNemar 精确检验 p=0.070，无显著差异）" in news
    assert "多数类基线 33.3%（总是答“利好”），随机基线 33.3%" in news and "p<0.001，显著高于基线" in news
    assert "MCC 基座 +0.000 [+0.000, +0.000] → 微调 +0.775 [+0.410, +1.000]" in news
    assert qa.startswith("- 财报问答") and "数值题没有多数类基线" in qa
    assert no_gain == "- " + i18n.text("zh", "no_gain")
    assert "| 新闻影响方向 (解析生成的回答) | +0.000 [+0.000, +0.000] | +0.775 [+0.410, +1.000] |" in markdown  # MCC table


def test_binomial_baseline_test_matches_a_hand_computed_tail() -> None:
    from finqlora.report.report import binomial_greater_p

    # P(X >= 10) for X ~ Bin(12, 1/3) = sum_{k=10..12} C(12,k) (1/3)^k (2/3)^(12-k)
    import math

    expected = sum(math.comb(12, k) * (1 / 3) ** k * (2 / 3) ** (12 - k) for k in range(10, 13))
    assert binomial_greater_p(10, 12, 1 / 3) == pytest.approx(expected)
    assert binomial_greater_p(0, 12, 0.5) == 1.0


def test_key_hyperparameters_in_a_short_table_and_the_rest_folded(tmp_path: Path) -> None:
    eval_dir, train_dir = make_eval_dir(tmp_path)
    info = json.loads((train_dir / "training_info.json").read_text(encoding="utf-8"))
    info["hyperparameters"].update({"weight_decay": 0.0, "optim": "adamw_torch", "speedups": {"profile": "cpu", "packing": True}})
    # What training writes: the resolved model as a dict; the table names it as the user did.
    info["base_model"] = {"spec": "builtin:qwen2.5-coder-0.5b-instruct", "kind": "builtin", "base_id": "builtin:qwen2.5-coder-0.5b-instruct",
                          "path": "/home/user/.cache/finqlora/models/qwen2.5-coder-0.5b-instruct", "architecture": "Qwen2ForCausalLM"}
    (train_dir / "training_info.json").write_text(json.dumps(info), encoding="utf-8")
    compute_metrics(eval_dir)
    html = build_report(eval_dir, tmp_path / "report").html.read_text(encoding="utf-8")
    key_part, folded = html.split("<details><summary>其余超参数（展开）</summary>", 1)
    assert "<th>lora_r</th>" in key_part and "<th>learning_rate</th>" in key_part and "optim" not in key_part.split("关键超参数")[1]
    assert "<th>optim</th>" in folded.split("</details>")[0] and "<th>weight_decay</th>" in folded.split("</details>")[0]
    assert "<th>基座模型</th><td>builtin:qwen2.5-coder-0.5b-instruct</td>" in key_part.replace("\n", "").replace(" ", "")
    assert "Qwen2ForCausalLM" not in html and "{&#34;spec" not in html


def test_the_option_scoring_rule_is_named_in_the_report_language() -> None:
    from finqlora.evaluate.choice import NORMALISATION
    from finqlora.report.report import _choice_normalisation

    stored = f"{NORMALISATION} (finqlora.evaluate.choice)"  # what metrics.json records
    zh = _choice_normalisation(stored, "zh")
    assert zh == i18n.text("zh", "choice_norm") and "per character" not in zh and "按字符" in zh
    assert _choice_normalisation(stored, "en") == stored
    assert _choice_normalisation("some other rule", "zh") == "some other rule"  # never a wrong translation


def test_a_label_found_inside_a_rambling_answer_is_marked(tmp_path: Path) -> None:
    eval_dir, _ = make_eval_dir(tmp_path)
    generations = eval_dir / "generations_finetuned.jsonl"
    rows = [json.loads(line) for line in generations.read_text(encoding="utf-8").splitlines()]
    labels = {f"news-{i:02d}": DIRECTIONS[i % 3] for i in range(12)}
    for row in rows:
        if row["id"] in labels:  # the right class, but only as a word inside looping text
            row["output"] = "美元与黄金的对比分析：美元与黄金的对比分析：" * 3 + f"总体来看可能{labels[row['id']]}。"
    _jsonl(generations, rows)
    compute_metrics(eval_dir)
    paths = build_report(eval_dir, tmp_path / "report", examples_per_group=12)
    html = paths.html.read_text(encoding="utf-8")
    assert html.count("标签取自冗长回答的中间，不是明确的结论") >= 10  # every shown fine-tuned news answer
    assert "回答有明显重复" in html
    per_item = [json.loads(line) for line in (eval_dir / "per_item.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(row["finetuned"]["method"] == "keyword" for row in per_item if row["id"].startswith("news"))


def test_repetition_rate_counts_repeated_ngrams() -> None:
    from finqlora.evaluate.metrics import repetition_rate

    assert repetition_rate("甲乙丙丁" * 3) == pytest.approx(5 / 9)  # 12 CJK tokens: 9 four-grams, 4 distinct
    assert repetition_rate("方向：利好。说明：美联储加息，金价承压。") == 0.0
    assert repetition_rate("解读：利好。" * 4) > 0.5
    assert repetition_rate("短") == 0.0


def test_metrics_json_has_each_models_repetition_rate(tmp_path: Path) -> None:
    eval_dir, _ = make_eval_dir(tmp_path)
    generations = eval_dir / "generations_finetuned.jsonl"
    rows = [json.loads(line) for line in generations.read_text(encoding="utf-8").splitlines()]
    rows[0]["output"] = "解读：利好。" * 6
    _jsonl(generations, rows)
    metrics = compute_metrics(eval_dir)
    row = next(r for r in metrics["table"] if r["key"] == "generation.repetition_rate")
    assert row["base"] == 0.0 and row["finetuned"] > 0 and row["higher_is_better"] is False
    assert metrics["tasks"]["repetition"]["ngram"] == 4 and metrics["tasks"]["repetition"]["finetuned"] == pytest.approx(row["finetuned"])
    markdown = build_report(eval_dir, tmp_path / "report").markdown.read_text(encoding="utf-8")
    assert "生成质量：重复率" in markdown


def test_generation_settings_carry_the_repetition_controls() -> None:
    from finqlora.core.config import EvalConfig, load_config
    from finqlora.evaluate.evaluation import EvalOptions
    from finqlora.models.generation import GenerationSettings

    cfg = load_config(overrides=["eval.no_repeat_ngram_size=4"])
    options = EvalOptions.from_run(cfg, output=Path("x"), data=Path("d.jsonl"))
    assert options.no_repeat_ngram_size == 4 and options.repetition_penalty == EvalConfig().repetition_penalty
    assert EvalOptions(output=Path("x")).no_repeat_ngram_size == EvalConfig().no_repeat_ngram_size  # one default
    with pytest.raises(FinqloraError, match="no_repeat_ngram_size"):
        GenerationSettings(no_repeat_ngram_size=-1)


def test_charts_draw_chinese_with_an_installed_cjk_font(tmp_path: Path) -> None:
    import warnings

    from finqlora.report.report import cjk_font, confusion_chart, metrics_chart

    if cjk_font() is None:
        pytest.skip("no CJK font installed (Debian: apt-get install fonts-wqy-microhei; scripts/setup.sh --test does it)")
    eval_dir, _ = make_eval_dir(tmp_path)
    metrics = compute_metrics(eval_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing from font.*")  # matplotlib's warning for a box glyph
        assert metrics_chart(metrics["table"], metrics["tasks"], "zh")[:4] == b"\x89PNG"
        assert confusion_chart(metrics["tasks"]["news_impact"], "news_impact", "zh")[:4] == b"\x89PNG"


def test_without_a_cjk_font_the_charts_fall_back_to_english_and_say_so(tmp_path: Path, monkeypatch) -> None:
    import warnings

    from finqlora.report import report as R

    monkeypatch.setattr(R, "cjk_font", lambda: None)  # a machine without CJK fonts (Colab's default image)
    eval_dir, _ = make_eval_dir(tmp_path)
    metrics = compute_metrics(eval_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing from font.*")
        paths = build_report(eval_dir, tmp_path / "report", lang="zh")
    assert i18n.text("zh", "font_missing") in paths.markdown.read_text(encoding="utf-8")
    assert "## 结论摘要" in paths.markdown.read_text(encoding="utf-8")  # the text stays Chinese
    assert metrics["tasks"]["news_impact"]  # and the charts were drawn (no glyph warning raised)


def test_the_dataset_card_is_rendered_as_markdown(tmp_path: Path) -> None:
    eval_dir, train_dir = make_eval_dir(tmp_path)
    data = tmp_path / "data" / "instructions.jsonl"
    data.parent.mkdir()
    data.write_text("", encoding="utf-8")
    (tmp_path / "data" / "instructions.card.md").write_text(
        "# Dataset card\n\n| split | records |\n| --- | --- |\n| train | 180 |\n\n<script>alert(1)</script>\n", encoding="utf-8")
    info = json.loads((train_dir / "training_info.json").read_text(encoding="utf-8"))
    info["dataset"]["path"] = str(data)
    (train_dir / "training_info.json").write_text(json.dumps(info), encoding="utf-8")
    compute_metrics(eval_dir)
    paths = build_report(eval_dir, tmp_path / "report")
    html = paths.html.read_text(encoding="utf-8")
    assert "<h1>Dataset card</h1>" in html and "<td>180</td>" in html  # rendered, not shown as raw Markdown
    assert "<script>alert(1)</script>" not in html  # raw HTML in the card is not markup
    assert "#### Dataset card" in paths.markdown.read_text(encoding="utf-8")  # demoted below the report's headings


def test_the_chinese_report_in_chromium_renders_cjk_and_takes_the_docs_screenshots(tmp_path: Path) -> None:
    """docs/images/report-zh-*.png come from here (with FINQLORA_UPDATE_SCREENSHOTS=1; else a temporary folder)."""
    import os

    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    eval_dir, _ = make_eval_dir(tmp_path)
    compute_metrics(eval_dir)
    _with_mcc(eval_dir)
    html = build_report(eval_dir, tmp_path / "report", lang="zh").html
    images = Path(__file__).resolve().parents[2] / "docs" / "images" if os.environ.get("FINQLORA_UPDATE_SCREENSHOTS") == "1" else tmp_path
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=["--no-sandbox", "--headless", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 1600}, locale="zh-CN")
        page.goto(html.as_uri())
        # Every heading is drawn with a font that has the CJK glyphs (no tofu boxes): the page's
        # text measures wider than the same count of Latin characters would.
        width = page.evaluate("() => { const h = document.querySelector('h2'); const r = document.createRange(); r.selectNodeContents(h); return r.getBoundingClientRect().width; }")
        assert page.locator("h2").first.inner_text() == "结论摘要" and width > 40
        page.screenshot(path=str(images / "report-zh-summary.png"))
        page.locator("h2", has_text="训练").scroll_into_view_if_needed()
        page.evaluate("() => document.evaluate(\"//h2[text()='训练']\", document, null, 9, null).singleNodeValue.scrollIntoView()")
        page.screenshot(path=str(images / "report-zh-training.png"))
        page.evaluate("() => document.evaluate(\"//h2[text()='示例回答']\", document, null, 9, null).singleNodeValue.scrollIntoView()")
        page.screenshot(path=str(images / "report-zh-examples.png"))
        browser.close()
    for name in ("report-zh-summary.png", "report-zh-training.png", "report-zh-examples.png"):
        assert (images / name).stat().st_size > 20_000


def _with_suite_and_judge(eval_dir: Path) -> None:
    """metrics.json with a finance-zh suite block (FinEval evaluated, the other sets not given) and
    judge.json with a rating round to agree with, both written by the eval stage's own functions."""
    import numpy as np

    from finqlora.core.fileio import atomic_write_json
    from finqlora.evaluate import ratings
    from finqlora.evaluate.judge import JUDGE_DIR, outcome, summarize
    from finqlora.evaluate.suite import suite_block

    metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    row = {"key": "benchmark.fineval.accuracy", "n": 8, "base": 0.25, "base_ci": [0.0, 0.5], "finetuned": 1.0, "finetuned_ci": [1.0, 1.0],
           "delta": 0.75, "delta_ci": [0.5, 1.0], "p_value": 2 * 0.5**6, "verdict": "significantly better"}
    tasks = {"benchmarks": {"fineval": {"baselines": {"majority": {"accuracy": 0.25, "class": "A"}}}}}
    correct = {"fineval": {"base": np.array([1, 0, 0, 0, 1, 0, 0, 0]), "finetuned": np.ones(8, dtype=int)}}
    metrics["suite"] = suite_block({"name": "finance-zh", "sets": {"fineval": "/data/fineval"}}, [row], tasks, correct, resamples=200, seed=0)
    (eval_dir / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False), encoding="utf-8")

    rating_round = ratings.create_round(eval_dir, ["alice"], name="r1", limit=3, seed=0)
    judged = []
    for pair in rating_round.pairs:
        a_is = rating_round.raters["alice"]["a_is"][pair["item"]]
        ratings.save_rating(rating_round, "alice", pair["item"], "A" if a_is == "finetuned" else "B", {"A": {"professional": 4, "accuracy": 4}, "B": {"professional": 2, "accuracy": 2}})
        for shown_first in ("base", "finetuned"):  # the judge prefers the fine-tuned answer in both orders
            better = "A" if shown_first == "finetuned" else "B"
            judged.append({"item": pair["item"], "a_is": shown_first, "better": better, "outcome": outcome(better, shown_first),
                           "scores": {"A": {"professional": 4, "accuracy": 4}, "B": {"professional": 3, "accuracy": 3}}})
    atomic_write_json(eval_dir / JUDGE_DIR / "judge.json", summarize(judged, "judge-model", eval_dir))


SUITE_JUDGE_EN = ["set", "base", "fine-tuned", "difference (pp) [95% CI]", "McNemar exact p", "verdict", "majority baseline",
                  "pairs", "judgements (parsed / unparsed)", "fine-tuned win rate [95% CI]", "ties", "losses", "position consistency",
                  "rating round", "rater", "pairs in common", "Cohen's kappa, judge vs rater"]


def _section(page: str, start: str, last: str) -> str:
    """The text from heading `start` to the heading (or image) after heading `last`."""
    begin, after = page.index(start), page.index(last)
    end = re.search(r"\n(?:#|!\[|<h[23]>|<img)", page[after + len(last):])
    return page[begin:after + len(last) + (end.start() if end else len(page))]


def test_suite_and_judge_sections_speak_the_reports_language(tmp_path: Path) -> None:
    from html import unescape

    eval_dir, _ = make_eval_dir(tmp_path)
    compute_metrics(eval_dir)
    _with_suite_and_judge(eval_dir)
    zh = build_report(eval_dir, tmp_path / "zh", lang="zh")
    en = build_report(eval_dir, tmp_path / "en", lang="en")
    zh_md, en_md = zh.markdown.read_text(encoding="utf-8"), en.markdown.read_text(encoding="utf-8")
    zh_html, en_html = unescape(zh.html.read_text(encoding="utf-8")), unescape(en.html.read_text(encoding="utf-8"))

    zh_part = _section(zh_md, "### 金融评测套件 finance-zh", "### 模型评审")
    assert "| 评测集 | 样本数 | 基座模型 | 微调模型 | 差值（百分点）[95% 置信区间] | McNemar 精确检验 p | 结论 | 多数类基线 |" in zh_part
    assert "| fineval | 8 | 25.0 | 100.0 | +75.0 [+50.0, +100.0] | 0.031 | 显著更好 | 25.0 |" in zh_part
    assert "| finfe | – | 未评测（未提供该评测集的副本） |" in zh_part and "| 平均（1 个评测集，等权） | 8 | 25.0 | 100.0 | +75.0 [" in zh_part
    assert "| 回答对数 | 评判次数（可解析 / 不可解析） | 微调胜率 [95% 置信区间] | 平局 | 负 | 位置一致性 |" in zh_part
    assert "| 3 | 6 / 0 | 100.0% [" in zh_part and "| 盲评轮次 | 评审人 | 共同评判的回答对数 | 模型评审与评审人的 Cohen's kappa |" in zh_part
    assert "| r1 | alice | 3 | 1.000 |" in zh_part  # the judge and alice both prefer every fine-tuned answer
    # English words left in the Chinese blocks: set names, proper names and the data's own names only
    allowed = {"finance", "zh", "fineval", "finfe", "cfbenchmark", "sentiment", "event", "industry", "fpb", "cflue", "ceval",
               "cloze", "McNemar", "Cohen", "kappa", "Wilson", "judge", "model", "alice"}
    assert set(re.findall(r"[A-Za-z]{2,}", zh_part)) - allowed == set()
    zh_html = _section(zh_html, "<h3>金融评测套件 finance-zh</h3>", "<h3>模型评审</h3>")
    for name in SUITE_JUDGE_EN:
        assert f"<th>{name}</th>" not in zh_html
    for heading in ("<th>评测集</th>", "<th>差值（百分点）[95% 置信区间]</th>", "<td>显著更好</td>", "<th>位置一致性</th>", "<td colspan=\"7\">未评测（未提供该评测集的副本）</td>"):
        assert heading in zh_html

    en_part = _section(en_md, "### Finance evaluation suite finance-zh", "### LLM judge")
    assert "| set | n | base | fine-tuned | difference (pp) [95% CI] | McNemar exact p | verdict | majority baseline |" in en_part
    assert "| fineval | 8 | 25.0 | 100.0 | +75.0 [+50.0, +100.0] | 0.031 | significantly better | 25.0 |" in en_part
    assert "not evaluated (no copy given)" in en_part and "| average (1 sets, each weighs the same) |" in en_part
    assert "| rating round | rater | pairs in common | Cohen's kappa, judge vs rater |" in en_part
    assert not re.search(r"[\u4e00-\u9fff]", en_part), en_part
    en_html = _section(en_html, "<h3>Finance evaluation suite finance-zh</h3>", "<h3>LLM judge</h3>")
    for name in SUITE_JUDGE_EN:
        assert f"<th>{name}</th>" in en_html
    assert "<td>significantly better</td>" in en_html and not re.search(r"[\u4e00-\u9fff]", en_html)
    for page in (zh_md, en_md):
        assert not ENTITY.findall(page)
