"""`finqlora ui`: rating storage and statistics, run-folder reading, and the pages in headless Chromium.

The browser tests drive Debian's /usr/bin/chromium through Python Playwright (no browser is
downloaded) and skip with a reason when either is missing. They take the screenshots of
docs/images/ui-*.png (written there only with FINQLORA_UPDATE_SCREENSHOTS=1). All text in the
fixture folders is written for these tests.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips these tests with the reason
    expect = None

from finqlora.core.errors import FinqloraError
from finqlora.evaluate import ratings as R
from finqlora.evaluate.human_eval import LOSS, TIE, WIN, cohen_kappa, fleiss_kappa
from finqlora.serve.server import start_in_thread
from finqlora.ui import runs as run_info
from finqlora.ui.app import create_ui_app
from finqlora.ui.jobs import JobManager
from finqlora.ui.launch import LOOPBACK_HOSTS, deepseek_client, make_state

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
OWNER = "owner-token-for-tests-0123456789"
# Waits use Playwright's locator assertions, which run no JavaScript from a string: the app's
# Content-Security-Policy (script-src 'self') forbids eval, so wait_for_function could not poll.
UI_TIMEOUT_MS = 30_000
# Generous: two models answer at once on a CPU that other work may share (a timeout is a failure).
STREAM_TIMEOUT_MS = 300_000

QUESTIONS = [
    "某公司宣布回购10亿元股份，股价可能如何反应？",
    "人民币兑美元汇率单周升值1.5%，出口企业受何影响？",
    "某省发布基建投资计划，规模5000亿元，哪些板块受益？",
]
BASE_ANSWERS = ["回购通常是利好。", "出口企业收入可能减少。", "建材板块可能受益。"]
TUNED_ANSWERS = [
    "回购表明管理层认为股价被低估，短期内股价大概率上涨，但需关注回购资金来源。",
    "升值使以美元计价的收入折算成人民币后减少，纺织等低毛利出口企业压力更大。",
    "水泥、钢铁和工程机械板块直接受益，地方城投债的信用也会得到支撑。",
]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_eval(eval_dir: Path) -> None:
    items = [{"id": f"q{i}", "task": "market_analysis", "messages": [{"role": "system", "content": "你是金融分析师。"},
              {"role": "user", "content": q}]} for i, q in enumerate(QUESTIONS)]
    write_jsonl(eval_dir / "items.jsonl", items)
    write_jsonl(eval_dir / "generations_base.jsonl", [{"id": f"q{i}", "output": a} for i, a in enumerate(BASE_ANSWERS)])
    write_jsonl(eval_dir / "generations_finetuned.jsonl", [{"id": f"q{i}", "output": a} for i, a in enumerate(TUNED_ANSWERS)])


def metric_row(key: str, name: str, base: float, tuned: float) -> dict:
    return {"key": key, "name": name, "n": 3, "unit": "", "higher_is_better": True, "base": base, "base_ci": [base - 0.1, base + 0.1],
            "finetuned": tuned, "finetuned_ci": [tuned - 0.1, tuned + 0.1], "delta": tuned - base, "delta_ci": [tuned - base - 0.15, tuned - base + 0.15],
            "test": "paired bootstrap", "p_value": 0.04, "verdict": "significantly better"}


def make_run(root: Path, name: str = "demo", *, training_live: bool = False) -> Path:
    """A finished (or, with training_live, a training) pipeline run folder, without a model."""
    run = root / name
    write_eval(run / "eval")
    state = {stage: {"status": "done", "seconds": 1.5, "inputs": "x"} for stage in run_info.STAGES}
    if training_live:
        for stage in ("train", "eval_finetuned", "report"):
            state.pop(stage)
        state["train"] = {"status": "started", "inputs": "x"}
    (run / "pipeline_state.json").write_text(json.dumps(state), encoding="utf-8")
    (run / "run_config.yaml").write_text(f"name: {name}\ntrain:\n  model: tiny\n  max_steps: 10\n  num_epochs: 1\n", encoding="utf-8")
    now = time.time()
    stamp = lambda seconds_ago: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - seconds_ago))  # noqa: E731
    log = [{"step": s, "epoch": s / 10, "loss": 2.5 - 0.2 * s, "time": stamp(40 - 10 * s)} for s in (1, 2, 3, 4)]
    log.append({"step": 4, "epoch": 0.4, "eval_loss": 2.0, "time": stamp(0)})
    write_jsonl(run / "training_log.jsonl", log)
    (run / "dataset").mkdir(exist_ok=True)
    (run / "dataset" / "instructions.card.md").write_text("# Dataset card: instructions.jsonl\n\n300 条合成记录（测试用）。\n", encoding="utf-8")
    if not training_live:
        metrics = {"n_items": 3, "table": [metric_row("news_impact.accuracy", "news impact accuracy", 0.41, 0.63),
                                            metric_row("market_analysis.bleu", "market analysis BLEU", 3.2, 7.9)]}
        (run / "eval" / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
        (run / "report").mkdir(exist_ok=True)
        (run / "report" / "report.html").write_text("<html><body><h1>report of demo</h1></body></html>", encoding="utf-8")
    return run


# ---------------------------------------------------------------------------------------------
# Rating rounds: storage and statistics


def test_round_statistics_match_human_eval(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    rating_round = R.create_round(run / "eval", ["r1", "r2"], name="round1", seed=3)
    assert len(rating_round.pairs) == 3
    scores = {"A": {"professional": 4, "accuracy": 3}, "B": {"professional": 2, "accuracy": 5}}
    choices = {"r1": ["A", "A", "B"], "r2": ["A", "tie", "B"]}
    expected: dict[str, list[str]] = {}
    for rater, picks in choices.items():
        for pair, choice in zip(rating_round.pairs, picks):
            R.save_rating(rating_round, rater, pair["item"], choice, scores)
        a_is = rating_round.raters[rater]["a_is"]
        expected[rater] = [TIE if c == "tie" else (WIN if (a_is[p["item"]] == "finetuned") == (c == "A") else LOSS)
                           for p, c in zip(rating_round.pairs, picks)]
    (summary,) = R.summarize_rounds(run)
    pooled = Counter(expected["r1"] + expected["r2"])
    assert (summary["ratings"], summary["wins"], summary["ties"], summary["losses"]) == (6, pooled[WIN], pooled[TIE], pooled[LOSS])
    assert summary["win_rate"] == pytest.approx(pooled[WIN] / 6, abs=1e-4)
    assert summary["win_ci_low"] <= summary["win_rate"] <= summary["win_ci_high"]
    assert summary["fleiss_kappa"] == pytest.approx(fleiss_kappa(list(zip(expected["r1"], expected["r2"]))), abs=1e-4)
    assert summary["cohen_by_pair"]["r1 vs r2"] == pytest.approx(cohen_kappa(expected["r1"], expected["r2"]), abs=1e-4)
    assert summary["cohen_kappa"] == summary["cohen_by_pair"]["r1 vs r2"]  # the mean over one pair of raters
    assert summary["agreement_items"] == 3 and summary["raters"] == 2 and summary["pairs"] == 3
    assert R.summarize_rounds(run / "eval") == [summary]  # the evaluation folder finds the same rounds


def test_wilson_interval_known_values() -> None:
    low, high = R.wilson_interval(3, 3)
    assert (round(low, 3), high) == (0.439, 1.0)  # the textbook 95% Wilson interval for 3 of 3
    low, high = R.wilson_interval(5, 10)
    assert (round(low, 3), round(high, 3)) == (0.237, 0.763)


def test_ratings_are_saved_per_rater_and_replace_earlier_ones(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    rating_round = R.create_round(run / "eval", ["张三"], name="r")
    item = rating_round.pairs[0]["item"]
    good = {"A": {"professional": 5, "accuracy": 5}, "B": {"professional": 1, "accuracy": 1}}
    R.save_rating(rating_round, "张三", item, "B", good)
    R.save_rating(rating_round, "张三", item, "A", good)
    stored = json.loads(rating_round.rater_file("张三").read_text(encoding="utf-8"))
    assert list(stored["ratings"]) == [item] and stored["ratings"][item]["choice"] == "A"
    shown_a = rating_round.raters["张三"]["a_is"][item]
    assert stored["ratings"][item]["scores"][shown_a] == {"professional": 5, "accuracy": 5}
    again = R.load_round(rating_round.folder)
    assert R.load_ratings(again, "张三")[item]["outcome"] == (WIN if shown_a == "finetuned" else LOSS)


@pytest.mark.parametrize("choice, scores", [("C", {}), ("A", {"A": {"professional": 6, "accuracy": 1}, "B": {"professional": 1, "accuracy": 1}}),
                                            ("tie", {"A": {"professional": 3}, "B": {"professional": 1, "accuracy": 1}})])
def test_bad_ratings_are_refused(tmp_path: Path, choice: str, scores: dict) -> None:
    run = make_run(tmp_path)
    rating_round = R.create_round(run / "eval", ["r1"], name="r")
    with pytest.raises(FinqloraError):
        R.save_rating(rating_round, "r1", rating_round.pairs[0]["item"], choice, scores)
    assert not rating_round.rater_file("r1").exists()


@pytest.mark.parametrize("name", ["../up", "a/b", "", "x y", "x" * 65])
def test_round_and_rater_names_cannot_be_paths(tmp_path: Path, name: str) -> None:
    run = make_run(tmp_path)
    with pytest.raises(FinqloraError):
        R.create_round(run / "eval", ["r1"], name=name or "-")
    with pytest.raises(FinqloraError):
        R.create_round(run / "eval", [name or "/"], name="ok")


def test_each_rater_gets_an_own_random_order(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    write_eval(tmp_path / "big")
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"问题{i}"}]} for i in range(40)]
    write_jsonl(tmp_path / "big" / "items.jsonl", rows)
    for variant in R.VARIANTS:
        write_jsonl(tmp_path / "big" / f"generations_{variant}.jsonl", [{"id": r["id"], "output": f"{variant}-{r['id']}"} for r in rows])
    rating_round = R.create_round(tmp_path / "big", ["r1", "r2"], name="big")
    orders = [rating_round.raters[r]["a_is"] for r in ("r1", "r2")]
    assert orders[0] != orders[1]
    assert 8 < Counter(orders[0].values())["base"] < 32
    shown = rating_round.shown_pairs("r1")[0]
    assert {shown["answer_A"], shown["answer_B"]} == {"base-q0", "finetuned-q0"} and "base" not in shown


# ---------------------------------------------------------------------------------------------
# Run folders and jobs


def test_live_training_progress_has_step_and_eta(tmp_path: Path) -> None:
    run = make_run(tmp_path, training_live=True)
    detail = run_info.run_detail("demo", run)
    assert detail["current"] == "train"
    progress = detail["progress"]
    assert (progress["step"], progress["total_steps"], progress["share"]) == (4, 10, 0.4)
    assert progress["eta_s"] == pytest.approx(60, abs=3)  # 10 s per step, 6 steps left, last log just now
    assert detail["loss"]["val"] == [[4, 2.0]] and len(detail["loss"]["train"]) == 4


def test_jobs_start_only_offered_configs_and_log_failures(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "broken.yaml").write_text(f"name: broken\ndata:\n  db: {tmp_path / 'missing.db'}\n", encoding="utf-8")
    jobs = JobManager(tmp_path)
    assert jobs.configs({}) == ["configs/broken.yaml"]
    with pytest.raises(FinqloraError, match="not one the app offers"):
        jobs.start("../../etc/passwd", {})
    job = jobs.start("configs/broken.yaml", {})
    job.process.wait(timeout=50)
    assert job.to_dict()["status"] == "failed (2)"
    assert "database not found" in job.to_dict()["log_tail"]
    jobs.stop_all()


# ---------------------------------------------------------------------------------------------
# The app over HTTP (no browser)


@pytest.fixture()
def runs_app(tmp_path: Path):
    make_run(tmp_path / "runs")
    make_run(tmp_path / "runs", "live", training_live=True)
    state = make_state(runs_root=tmp_path / "runs", owner_token=OWNER, workdir=tmp_path)
    running = start_in_thread(create_ui_app(state, allowed_hosts=LOOPBACK_HOSTS))
    yield running, state, tmp_path
    running.stop()


def test_owner_token_guards_pages_and_apis(runs_app) -> None:
    running, state, root = runs_app
    rating_round = R.create_round(root / "runs" / "demo" / "eval", ["r1"], name="r")
    rater = rating_round.raters["r1"]["token"]
    owner_only = ["/compare", "/runs", "/runs/demo", "/rating", "/api/runs", "/api/runs/demo", "/api/rounds", "/runs/demo/report.html"]
    with httpx.Client(base_url=running.url) as client:
        for path in owner_only:
            assert client.get(path).status_code == 403, path
            assert client.get(path, headers={"Authorization": f"Bearer {rater}"}).status_code == 403, path
            with httpx.Client(base_url=running.url, cookies={"finqlora_owner": rater}) as with_rater_cookie:
                assert with_rater_cookie.get(path).status_code == 403, path
            assert client.get(path, headers={"Authorization": f"Bearer {OWNER}"}).status_code == 200, path
        assert client.get(f"/login?token={rater}").status_code == 403
        assert client.post("/api/jobs", json={"config": "configs/x.yaml"}).status_code == 403
        assert client.get(f"/rate/{rater}").status_code == 200
        assert client.get("/rate/not-a-token").status_code == 404
        assert client.get("/api/rate/not-a-token").status_code == 404
        # No request names a path: runs are looked up by name only.
        owner = {"Authorization": f"Bearer {OWNER}"}
        for path in ["/api/runs/..%2F..%2Fetc", "/runs/..%2Fdemo/report.html", "/static/..%2F..%2Fapp.py", "/api/runs/%2Fetc"]:
            assert client.get(path, headers=owner).status_code == 404, path
        # DNS rebinding: a foreign Host header is refused.
        assert client.get("/compare", headers={**owner, "Host": "evil.example"}).status_code == 400
        response = client.get("/runs", headers=owner)
        assert "default-src 'self'" in response.headers["content-security-policy"]


# ---------------------------------------------------------------------------------------------
# The pages in headless Chromium


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """Where the screenshots go. docs/images/ui-*.png are made by these tests with
    FINQLORA_UPDATE_SCREENSHOTS=1 (on a machine with a CJK font); otherwise a temporary folder,
    so that a test run never changes the repository."""
    if os.environ.get("FINQLORA_UPDATE_SCREENSHOTS") == "1":
        return REPO / "docs" / "images"
    return tmp_path_factory.mktemp("screenshots")


class RequestLog:
    """Every request a page makes, to prove that none leaves 127.0.0.1."""

    def __init__(self, page) -> None:
        self.urls: list[str] = []
        page.on("request", lambda request: self.urls.append(request.url))

    def foreign(self) -> list[str]:
        return [u for u in self.urls if not u.startswith("data:") and urlparse(u).hostname != "127.0.0.1"]


def owner_page(browser, url: str):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN")
    page = context.new_page()
    requests = RequestLog(page)
    page.goto(f"{url}/login?token={OWNER}")
    return context, page, requests


def test_runs_page_shows_loss_chart_and_metrics(browser, runs_app, images) -> None:
    running, _state, _root = runs_app
    context, page, requests = owner_page(browser, running.url)
    page.goto(f"{running.url}/runs")
    page.locator("tr[data-run=demo] a").first.click()
    page.wait_for_selector("#loss-svg path.series-train")
    page.wait_for_selector("#metrics tbody tr")
    rows = page.locator("#metrics tbody tr")
    assert rows.count() == 2
    assert "63.0%" in rows.nth(0).inner_text() and "[53.0%, 73.0%]" in rows.nth(0).inner_text()
    assert page.locator("#loss-svg circle").count() == 1  # the single validation point is drawn as a dot
    assert "300 条合成记录" in page.locator("#dataset-card").inner_text()
    assert page.locator("#dataset-card h1").inner_text() == "Dataset card: instructions.jsonl"  # Markdown rendered, not raw
    assert "新闻影响方向：准确率" in rows.nth(0).inner_text() and "显著更好" in rows.nth(0).inner_text()  # report.i18n's words
    assert page.locator("li[data-stage=report]").get_attribute("class") == "status-done"
    page.screenshot(path=str(images / "ui-runs.png"), full_page=True)
    page.goto(f"{running.url}/runs/demo?lang=en")  # the language toggle: metric names and verdicts follow it
    expect(page.locator("#metrics tbody tr").first).to_contain_text("significantly better", timeout=UI_TIMEOUT_MS)
    assert "News direction: accuracy" in page.locator("#metrics tbody tr").first.inner_text()
    page.goto(f"{running.url}/runs/demo?lang=zh")
    with page.expect_popup() as popup:
        page.goto(f"{running.url}/runs")
        page.locator("tr[data-run=demo] td a[target=_blank]").click()
    assert "report of demo" in popup.value.content()
    # A run in the middle of training shows its stage, step and ETA.
    page.goto(f"{running.url}/runs/live")
    expect(page.locator("#progress .label")).to_contain_text("步 4/10", timeout=UI_TIMEOUT_MS)
    assert "训练" in page.locator("#progress .label").inner_text() and "预计剩余" in page.locator("#progress .label").inner_text()
    assert requests.foreign() == []
    context.close()


def rate_pairs(browser, link: str, picks: list[str], screenshot: Path | None = None) -> None:
    """A rater (no owner cookie) makes the given choices on their link's page, one pair each."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN")
    page = context.new_page()
    requests = RequestLog(page)
    page.goto(link)
    for choice in picks:
        expect(page.locator("#question")).not_to_have_text("", timeout=UI_TIMEOUT_MS)
        page.check(f"input[name=choice][value={choice}]")
        for side, values in (("A", (4, 3)), ("B", (3, 4))):
            page.check(f"input[name={side}-professional][value='{values[0]}']")
            page.check(f"input[name={side}-accuracy][value='{values[1]}']")
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
            screenshot = None
        with page.expect_response(lambda r: r.request.method == "POST" and "/api/rate/" in r.url) as response:
            page.click("#submit")
        # The page shows the next pair only after it has read the reply; choosing before that
        # would be undone when it renders, so wait for the saved count it prints last.
        rated = response.value.json()["rated"]
        expect(page.locator("#rate-status")).to_contain_text(f"({rated}/", timeout=UI_TIMEOUT_MS)
    assert requests.foreign() == []
    # The rater's own token does not open the owner's pages.
    for path in ("/rating", "/runs", "/compare"):
        page.goto(urlparse(link)._replace(path=path).geturl())
        assert page.locator("#forbidden").is_visible(), path
    context.close()


def test_two_raters_rate_and_the_owner_sees_win_rate_and_kappa(browser, runs_app, images) -> None:
    running, _state, root = runs_app
    context, page, requests = owner_page(browser, running.url)
    page.goto(f"{running.url}/rating")
    page.wait_for_selector("#round-run option[value=demo]", state="attached")
    page.select_option("#round-run", "demo")
    page.fill("#round-raters", "李老师, 王老师")
    page.fill("#round-name", "defence")
    page.click("#create-round")
    page.wait_for_selector("#new-links .rater-link")
    links = {li.get_attribute("data-rater"): li.locator(".rater-link").inner_text() for li in page.locator("#new-links li").all()}
    assert set(links) == {"李老师", "王老师"}
    rate_pairs(browser, links["李老师"], ["A", "A", "B"], screenshot=images / "ui-rate.png")
    rate_pairs(browser, links["王老师"], ["A", "tie"])
    # The second rater comes back later and resumes at the third pair.
    resume = browser.new_context(locale="zh-CN").new_page()
    resume.goto(links["王老师"])
    expect(resume.locator("#position")).to_contain_text("3 / 3", timeout=UI_TIMEOUT_MS)
    assert resume.locator("#all-done").is_hidden()
    resume.context.close()
    rate_pairs(browser, links["王老师"], ["B"])

    (expected,) = R.summarize_rounds(root / "runs" / "demo")
    assert expected["ratings"] == 6 and expected["fleiss_kappa"] is not None
    page.reload()
    card = page.locator(".round[data-round=defence]")
    card.wait_for()
    assert card.locator(".win-rate").inner_text() == f"{expected['win_rate'] * 100:.1f}%"
    assert card.locator(".win-ci").inner_text() == f"[{expected['win_ci_low'] * 100:.1f}%, {expected['win_ci_high'] * 100:.1f}%]"
    assert card.locator(".fleiss").inner_text() == f"{expected['fleiss_kappa']:.3f}"
    card.locator("summary").click()
    page.screenshot(path=str(images / "ui-rating.png"), full_page=True)
    assert requests.foreign() == []
    context.close()


def sharpened_copy(tiny_model_dir: Path, out: Path) -> Path:
    """The tiny random Llama with larger weights, so that greedy answers are varied text, not blanks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(params=["tiny", pytest.param("builtin:smollm2-135m-instruct", marks=pytest.mark.slow)])
def compare_app(request, tmp_path: Path):
    """An engine with a small random LoRA adapter, a stand-in for a trained one (only the
    mechanics are tested). The tiny random Llama is fast; SmolLM2 writes readable text for
    the screenshot."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finqlora.models.loading import load_model
    from finqlora.serve.server import ServingEngine

    model = request.param
    if model == "tiny":
        model = str(sharpened_copy(request.getfixturevalue("tiny_model_dir"), tmp_path / "sharp"))
    run = make_run(tmp_path / "runs", "demo-adapter")
    loaded = load_model(model, device="cpu")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(loaded.model, lora).save_pretrained(run, safe_serialization=True)
    engine = ServingEngine.load(model, {"demo-adapter": run}, device="cpu")
    state = make_state(runs=[run], runs_root=tmp_path / "runs", engine=engine, owner_token=OWNER, workdir=tmp_path)
    running = start_in_thread(create_ui_app(state, allowed_hosts=LOOPBACK_HOSTS))
    # The third column through the real FinLLMClient, pointed at this app's own
    # OpenAI-compatible endpoint in place of api.deepseek.com (no network here).
    # The tiny model only: fast enough for three columns.
    if request.param == "tiny":
        state.deepseek = deepseek_client({"DEEPSEEK_API_KEY": OWNER, "DEEPSEEK_BASE_URL": f"{running.url}/llm/v1", "DEEPSEEK_MODEL": "base"})
    yield running, request.param != "tiny"
    running.stop()
    engine.shutdown()


def test_compare_streams_base_and_finetuned_side_by_side(browser, compare_app, images) -> None:
    running, take_screenshot = compare_app
    context, page, requests = owner_page(browser, running.url)
    page.wait_for_selector("#send:not([disabled])")
    page.click("details summary")
    # SmolLM2 repeats the question first: 40 tokens reach where the random adapter changes the text.
    page.fill("#max_tokens", "40" if take_screenshot else "24")
    # Count how often each answer's text changes: streaming means many small updates. Count the
    # mutation records, not the observer's calls: pieces that arrive in one network read are
    # appended in one task, and the observer reports them in one call.
    page.evaluate("""() => { window.updates = {}; for (const id of ['col-base', 'col-finetuned']) {
        window.updates[id] = 0; new MutationObserver((records) => { window.updates[id] += records.length; })
          .observe(document.querySelector('#' + id + ' .text'), {childList: true, characterData: true, subtree: true}); } }""")
    page.click("#send")
    page.wait_for_selector("#col-base[data-state=done]", timeout=STREAM_TIMEOUT_MS)
    page.wait_for_selector("#col-finetuned[data-state=done]", timeout=STREAM_TIMEOUT_MS)
    base, tuned = (page.locator(f"#{c} .text").inner_text() for c in ("col-base", "col-finetuned"))
    assert base.strip() and tuned.strip() and base != tuned
    if not take_screenshot:
        page.wait_for_selector("#col-deepseek[data-state=done]", timeout=STREAM_TIMEOUT_MS)
        # The same base model, greedy, asked through FinLLMClient.stream.
        assert page.locator("#col-deepseek .text").inner_text() == base
    updates = page.evaluate("window.updates")
    assert updates["col-base"] > 3 and updates["col-finetuned"] > 3, updates
    assert "首个 token" in page.locator("#col-base .meta").inner_text()
    if take_screenshot:
        page.screenshot(path=str(images / "ui-compare.png"), full_page=True)
    assert requests.foreign() == []
    context.close()


def test_cli_starts_on_loopback_and_prints_the_owner_link(tmp_path: Path) -> None:
    """`finqlora ui --no-model` as a user starts it: the printed link logs in, nothing else does."""
    import re
    import subprocess
    import sys

    make_run(tmp_path / "runs")
    (tmp_path / "token").write_text(OWNER + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "finqlora", "ui", "--no-model", "--port", "0", "--runs-root", str(tmp_path / "runs"),
               "--owner-token-file", str(tmp_path / "token")]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, line = time.monotonic() + 55, ""
        while "/login?token=" not in line and time.monotonic() < deadline:
            line = process.stdout.readline()
        link = re.search(r"http://127\.0\.0\.1:\d+/login\?token=\S+", line)
        assert link, line
        with httpx.Client(follow_redirects=True) as browser_like:
            assert browser_like.get(link.group(0)).status_code == 200  # /login sets the cookie, then /compare
            runs = browser_like.get(link.group(0).split("/login")[0] + "/api/runs").json()
        assert [run["name"] for run in runs["runs"]] == ["demo"]
        assert httpx.get(link.group(0).split("/login")[0] + "/api/runs").status_code == 403
    finally:
        process.terminate()
        process.wait(timeout=30)
