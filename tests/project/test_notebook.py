"""The Colab notebook, executed as on Colab (simulated, CPU, tiny model), and what it states.

scripts/colab_sim.py runs the notebook's Colab branch in a kernel of its own: a stand-in
`google.colab` (Drive mounted on a temporary folder, downloads recorded), a venv whose
preinstalled packages are this environment's (so the install cell's pip writes into that venv
only), and the install cell as written, cloning REPO_URL from a `file://` snapshot of this tree.
FINQLORA_NOTEBOOK_SMOKE=1 shrinks every stage (CPU, fp32, 3 eval prompts); the test swaps in the
tiny random Llama of conftest and 60 steps (FINQLORA_NOTEBOOK_SET) so that it runs in minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finqlora.core import versions

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO_ROOT / "notebooks" / "colab_qlora.ipynb"
SIMULATOR = REPO_ROOT / "scripts" / "colab_sim.py"


def _cells(kind: str) -> str:
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == kind)


def test_notebook_is_chinese_and_covers_the_users_steps() -> None:
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    markdown, code = _cells("markdown"), _cells("code")
    for heading in ("检查 GPU", "挂载 Google Drive", "安装", "数据库", "TensorBoard", "运行整个流程", "报告", "打包"):
        assert heading in markdown, heading
    assert 'finq("run", "--config", CONFIG' in code and 'CONFIG = "configs/deepseek-7b-qlora-t4.yaml"' in code
    assert "drive.mount" in code and 'os.environ["HF_HOME"]' in code and "files.download" in code
    assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), "commit the notebook without outputs"


def test_notebook_never_installs_torch_and_has_no_dead_default() -> None:
    code = _cells("code")
    assert "YOUR-ACCOUNT" not in code and "torch==" not in code and "-e" not in code.split()
    assert 'os.environ.get("FINQLORA_REPO_URL", "")' in code  # no made-up repository as the default


def test_notebook_without_a_source_says_what_to_set(tmp_path: Path) -> None:
    """The install cell, given neither REPO_URL nor an uploaded zip, stops with a Chinese + English message."""
    cells = [c for c in json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    install = next("".join(c["source"]) for c in cells if '"pip", "install"' in "".join(c["source"]))
    namespace = {"IN_COLAB": True, "CONTENT": tmp_path, "WORK": tmp_path / "MyDrive" / "finqlora", "REPO_URL": ""}
    namespace["WORK"].mkdir(parents=True)
    with pytest.raises(RuntimeError) as caught:
        exec(compile(install, "install-cell", "exec"), namespace)
    message = str(caught.value)
    assert "请在第一个单元格设置 REPO_URL" in message and "set REPO_URL in the first cell" in message
    assert "finqlora*.zip" in message and str(namespace["WORK"]) in message


def test_one_torch_cuda_statement_everywhere() -> None:
    """README, README.zh-CN, docs/installation.md and the notebook carry versions.py's statement verbatim."""
    statement = versions.torch_cuda_statement()
    for page in ("README.md", "README.zh-CN.md", "docs/installation.md"):
        text = (REPO_ROOT / page).read_text(encoding="utf-8")
        assert statement in text, f"{page}: paste versions.torch_cuda_statement() (python -c 'from finqlora.core.versions import torch_cuda_statement as s; print(s())')"
        for tag in ("cu124", "cu126"):
            assert tag not in text, f"{page} names {tag}; the CUDA 12 wheels are {versions.TORCH_INDEX_FOR_DRIVER_CUDA[12]}"
    # The notebook prints the statement from versions.py itself (so it cannot drift).
    assert "print(versions.SUPPORTED_TORCH_STATEMENT)" in _cells("code")
    assert versions.SUPPORTED_TORCH_STATEMENT == statement


def _snapshot_repository(tmp_path: Path) -> str:
    """A git repository of this working tree as it is now (uncommitted changes included)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    snapshot = tmp_path / "finqlora-src"
    for name in listed.stdout.splitlines():
        source = REPO_ROOT / name
        if source.is_file():
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, snapshot / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-C", str(snapshot)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "snapshot"], check=True)
    return snapshot.as_uri()


@pytest.mark.slow
@pytest.mark.timeout(600)  # 216 s (+27 s fixture) on this 2-core machine at load average 15, 2026-12-07
def test_notebook_colab_branch_runs_streams_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO_ROOT / "src")  # the simulator's own imports; the kernel gets none of it
    command = [sys.executable, str(SIMULATOR), "run", "--workdir", str(tmp_path / "sim"), "--out", str(out),
               "--repo-url", _snapshot_repository(tmp_path), "--smoke", "--interrupt-at-step", "1", "--cell-timeout", "300",
               # The tiny random Llama (conftest) instead of SmolLM2-135M: every stage the same, each a few
               # seconds; 12 steps so that the interrupt (at step 1) lands mid-training.
               "--set", f"train.model={tiny_model_dir};train.max_steps=12"]
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=580)
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    checks = result["checks"]
    detail = finished.stdout[-4000:] + finished.stderr[-2000:]
    assert set(checks) == {"torch_kept", "same_kernel_import", "streamed_while_running", "report_inline",
                           "adapter_zip_downloaded", "interrupt_then_resume"}, detail
    failed = {name: item for name, item in checks.items() if not item["ok"]}
    assert not failed, json.dumps(failed, indent=1, default=str)[:4000] + detail
    assert finished.returncode == 0, detail
    # Evidence beyond the verdicts: torch untouched, the rerun went on after the interrupted step.
    assert checks["torch_kept"]["before"] == checks["torch_kept"]["after"]
    assert checks["interrupt_then_resume"]["steps_logged_after_rerun"][-1] == 12
