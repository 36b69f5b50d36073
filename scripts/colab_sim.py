"""Execute notebooks/colab_qlora.ipynb as Colab would, on a machine that is not Colab, and check it.

Used by tests/project/test_notebook.py (CPU, the notebook's SMOKE settings) and by
scripts/gpu_notebook_check.sh (a GPU without network, the T4 settings with a tiny random model).

What stands in for Colab:
- a Python environment of its own (a venv whose `.pth` file lists the host's package folders,
  like Colab's preinstalled packages), so the install cell's `pip install` writes into this
  venv and never into the host's environment, and a finqlora found on the host's PYTHONPATH
  cannot make the notebook's import pass;
- a `google.colab` package imported when the kernel starts (Colab preloads it): `drive.mount`
  links `<mountpoint>/MyDrive` to a folder of this run, `files.download` records its argument;
- `/content` is a folder of this run (FINQLORA_COLAB_CONTENT, which the notebook reads).

The install cell runs as written; the finqlora source comes from a git URL (`--repo-url`, e.g.
a `file://` clone) or from a source zip of the repository put on the simulated Drive
(`--source-zip`), the two ways the READMEs give. `--interrupt-at-step N` interrupts the kernel
(the stop button) when the run cell prints training step N, then runs that cell again, as a user
does after a disconnect. result.json gets what happened and the checks (all must hold).

    python scripts/colab_sim.py run --out DIR [--repo-url URL | --source-zip] [--smoke]
        [--set "train.model=...;train.max_steps=4"] [--interrupt-at-step 1] [--host-path DIR]
    python scripts/colab_sim.py make-model --tokenizer .whl/tok --out /tmp/tiny-deepseek
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_qlora.ipynb"
INSTALL_CELL = '"pip", "install"'  # text that finds the install cell

_DRIVE = '''"""Stand-in for google.colab.drive: MyDrive is a folder of the simulation."""
import os, pathlib


def mount(mountpoint, force_remount=False, **_):
    root = pathlib.Path(mountpoint)
    root.mkdir(parents=True, exist_ok=True)
    link = root / "MyDrive"
    if not link.exists():
        link.symlink_to(os.environ["COLAB_SIM_DRIVE"], target_is_directory=True)
    print(f"Mounted at {mountpoint}")
'''
_FILES = '''"""Stand-in for google.colab.files: download() records what the browser would get."""
import json, os, pathlib


def download(filename):
    path = pathlib.Path(filename)
    if not path.is_file():
        raise FileNotFoundError(f"Cannot find file: {filename}")
    with open(os.environ["COLAB_SIM_DOWNLOADS"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"path": str(path), "bytes": path.stat().st_size}) + "\\n")
'''


# ------------------------------------------------------------------------------------------------
# The stand-in Colab
# ------------------------------------------------------------------------------------------------


def _host_package_dirs(extra: list[str]) -> list[str]:
    """This interpreter's package folders (extra first), without any folder that holds a finqlora source."""
    dirs = [*extra, *(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))]
    keep = []
    for entry in dirs:
        path = Path(entry)
        if path.is_dir() and not (path / "finqlora" / "__init__.py").exists() and str(path) not in keep:
            keep.append(str(path))
    return keep


def make_runtime(root: Path, host_paths: list[str]) -> Path:
    """The venv that plays Colab's Python; returns its interpreter."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # Plain path lines: the host's own .pth files (an editable finqlora among them) are not run.
    Path(purelib, "_colab_preinstalled.pth").write_text("\n".join(_host_package_dirs(host_paths)) + "\n", encoding="utf-8")
    return python


def make_colab_package(root: Path) -> Path:
    stub = root / "colab_stub"
    package = stub / "google" / "colab"  # `google` stays a namespace package (protobuf lives there too)
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Stand-in for Colab\'s google.colab (scripts/colab_sim.py)."""\n', encoding="utf-8")
    (package / "drive.py").write_text(_DRIVE, encoding="utf-8")
    (package / "files.py").write_text(_FILES, encoding="utf-8")
    return stub


def make_kernelspec(root: Path, python: Path, env: dict[str, str]) -> Path:
    kernels = root / "kernels"
    spec = kernels / "colabsim"
    spec.mkdir(parents=True)
    argv = [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}", "--IPKernelApp.exec_lines=import google.colab"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "colab-sim", "language": "python", "env": env}),
                                      encoding="utf-8")
    return kernels


def source_zip(destination: Path) -> Path:
    """A zip of the repository's files as the user would upload it (GitHub's "Download ZIP" layout)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True)
    except OSError:  # no git on this machine
        listed = subprocess.CompletedProcess([], 1, "", "")
    if listed.returncode == 0:
        files = [REPO / line for line in listed.stdout.splitlines() if line and (REPO / line).is_file()]
    else:  # a copy without .git (the GPU machine gets the working tree only)
        skip = {".git", ".whl", ".gl", ".venv", "runs", "data", "build", "dist", "__pycache__", ".pytest_cache", ".bench", ".cache"}
        files = [p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)]
    destination.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            archive.write(path, f"finqlora-main/{path.relative_to(REPO)}")
    return destination


def torch_fingerprint(python: Path) -> dict[str, Any]:
    probe = "import json, os, torch; print(json.dumps({'version': torch.__version__, 'file': torch.__file__, 'mtime': os.path.getmtime(torch.__file__)}))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return json.loads(subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True, env=env).stdout)


# ------------------------------------------------------------------------------------------------
# Execution
# ------------------------------------------------------------------------------------------------


def _cell_index(cells: list[Any], needle: str) -> int:
    return next(i for i, cell in enumerate(cells) if cell.cell_type == "code" and needle in cell.source)


async def _execute(notebook: Any, kernels: Path, workdir: Path, cell_timeout: int, interrupt_at: int | None,
                   record: dict[str, Any]) -> None:
    """Run every code cell in order (the run cell twice with an interrupt); fills `record` as it goes."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    events: list[dict[str, Any]] = record.setdefault("events", [])  # every stream message: time, cell run, text
    state = {"run": "", "interrupt_sent": None}
    record["state"] = state

    class RecordingClient(NotebookClient):
        def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
            if msg["msg_type"] == "stream":
                events.append({"t": time.monotonic(), "run": state["run"], "text": msg["content"]["text"]})
            return super().process_message(msg, cell, cell_index)

    km = AsyncKernelManager(kernel_name="colabsim", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    client = RecordingClient(notebook, km=km, timeout=cell_timeout, resources={"metadata": {"path": str(workdir)}})
    run_cell = _cell_index(notebook.cells, 'finq("run"')
    runs: dict[str, dict[str, Any]] = record.setdefault("runs", {})
    record["run_cell"] = run_cell

    async def execute(index: int, label: str) -> None:
        state["run"] = label
        started = time.monotonic()
        error = None
        try:
            await client.async_execute_cell(notebook.cells[index], index)
        except CellExecutionError as exc:
            error = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        runs[label] = {"cell": index, "started": started, "ended": time.monotonic(), "error": error}
        if error and label != "run-interrupted":
            raise RuntimeError(f"cell {index} ({label}) failed: {error}")

    async def interrupt_when_step(step: int) -> None:
        pattern = re.compile(rf"^step {step}/\d+", re.M)
        while not any(e["run"] == "run-interrupted" and pattern.search(e["text"]) for e in events):
            await asyncio.sleep(0.2)
        state["interrupt_sent"] = time.monotonic()
        await km.interrupt_kernel()

    async with client.async_setup_kernel():
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            if index == run_cell and interrupt_at is not None:
                watcher = asyncio.create_task(interrupt_when_step(interrupt_at))
                await execute(index, "run-interrupted")
                watcher.cancel()
                notebook.cells[index].outputs = []
                await execute(index, "run")
            else:
                await execute(index, "run" if index == run_cell else f"cell-{index}")


def _text(events: list[dict[str, Any]], run: str) -> str:
    return "".join(e["text"] for e in events if e["run"] == run)


def check(result: dict[str, Any], notebook: Any, content: Path, drive: Path, interrupt_at: int | None) -> dict[str, dict[str, Any]]:
    """What the notebook must show (each: ok + evidence)."""
    events, runs = result["events"], result["runs"]
    checks: dict[str, dict[str, Any]] = {}
    before, after = result["torch_before"], result["torch_after"]
    install_cell = f"cell-{_cell_index(notebook.cells, INSTALL_CELL)}"
    install = _text(events, install_cell)
    torch_lines = [line for line in install.splitlines() if re.search(r"^(Collecting|Downloading|Installing collected packages:.*)\b.*\btorch\b", line)
                   or re.search(r"Successfully installed .*\btorch-\d", line)]
    checks["torch_kept"] = {"ok": before == after and not torch_lines and "Successfully installed" in install,
                            "before": before, "after": after, "pip_lines_about_torch": torch_lines,
                            "pip_installed": [line for line in install.splitlines() if line.startswith("Successfully installed")]}
    probe = _text(events, f"cell-{len(notebook.cells) - 1}")
    where = re.search(r"FINQLORA_FILE (\S+)", probe)
    checks["same_kernel_import"] = {"ok": bool(where) and str(result["venv"]) in where.group(1) and runs.get(
        install_cell, {}).get("error") is None, "finqlora_file_in_kernel": where and where.group(1)}

    run_events = [e for e in events if e["run"] == "run"]
    step_lines = [e for e in run_events if re.search(r"^step \d+/\d+", e["text"], re.M)]
    later = [e for e in run_events if "[run ] eval_finetuned" in e["text"]]
    checks["streamed_while_running"] = {
        "ok": bool(step_lines) and bool(later) and later[0]["t"] - step_lines[0]["t"] > 0.5
        and len({round(e["t"], 1) for e in step_lines}) > 1,
        "first_step_line_s_before_eval_finetuned_line": later and step_lines and round(later[0]["t"] - step_lines[0]["t"], 2),
        "stream_messages_in_run_cell": len(run_events),
    }
    report_cell = notebook.cells[_cell_index(notebook.cells, "REPORT =")]
    shown = "".join(out.get("data", {}).get("text/html", "") for out in report_cell.outputs if out.output_type == "display_data")
    report_file = next(iter(sorted(drive.glob("runs/*/report/report.html"))), None)
    report_html = report_file.read_text(encoding="utf-8") if report_file else ""
    checks["report_inline"] = {"ok": bool(report_html) and report_html in html.unescape(shown), "report": str(report_file),
                               "html_output_chars": len(shown)}
    downloads_file = content / "downloads.jsonl"
    downloads = [json.loads(line) for line in downloads_file.read_text().splitlines()] if downloads_file.exists() else []
    checks["adapter_zip_downloaded"] = {"ok": any(d["path"].endswith("qlora_weights.zip") for d in downloads), "downloads": downloads}
    if interrupt_at is not None:
        first, second = _text(events, "run-interrupted"), _text(events, "run")
        steps_first = [int(s) for s in re.findall(r"^step (\d+)/\d+", first, re.M)]
        steps_second = [int(s) for s in re.findall(r"^step (\d+)/\d+", second, re.M)]
        checks["interrupt_then_resume"] = {
            "ok": runs["run-interrupted"]["error"] is not None and "resuming an interrupted run" in second
            # The rerun starts right after the last step logged before the interrupt: that step was
            # checkpointed (the stop abandons the step in progress) and training went on from it.
            and bool(steps_first) and bool(steps_second) and max(steps_first) >= interrupt_at
            and min(steps_second) == max(steps_first) + 1
            and all(f"[skip] {stage}" in second for stage in ("database", "check", "build", "eval_base")),
            "interrupted_cell_error": runs["run-interrupted"]["error"],
            "steps_logged_before_interrupt": steps_first,
            "steps_logged_after_rerun": steps_second,
            "rerun_lines": [line for line in second.splitlines() if line.startswith(("[skip]", "[run ]")) or "resum" in line],
        }
    return checks


def run(args: argparse.Namespace) -> int:
    import nbformat

    root = Path(args.workdir or tempfile.mkdtemp(prefix="colab-sim-")).resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    content, drive = root / "content", root / "drive"
    (drive / "finqlora").mkdir(parents=True, exist_ok=True)
    content.mkdir(parents=True, exist_ok=True)
    python = make_runtime(root, args.host_path)
    stub = make_colab_package(root)
    if args.source_zip:
        source_zip(drive / "finqlora" / "finqlora-main.zip")
    env = {
        "PYTHONPATH": str(stub),  # only the stand-in google.colab: finqlora must come from the install cell
        "FINQLORA_COLAB_CONTENT": str(content),
        "COLAB_SIM_DRIVE": str(drive),
        "COLAB_SIM_DOWNLOADS": str(content / "downloads.jsonl"),
        "FINQLORA_REPO_URL": args.repo_url or "",
        "FINQLORA_NOTEBOOK_SMOKE": "1" if args.smoke else "0",
        "FINQLORA_NOTEBOOK_SET": args.set or "",
        # Everything the notebook needs is preinstalled here, as on Colab; a missing package fails
        # at once instead of being fetched (the GPU machine has no network at all).
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }
    kernels = make_kernelspec(root, python, env)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import finqlora\nprint('FINQLORA_FILE', finqlora.__file__)"))
    result: dict[str, Any] = {"venv": str(root / "venv"), "torch_before": torch_fingerprint(python)}
    started = time.monotonic()
    try:
        asyncio.run(_execute(notebook, kernels, content, args.cell_timeout, args.interrupt_at_step, result))
        failure = None
    except Exception as exc:  # keep what ran (stream.txt, executed.ipynb); the verdict is a failure
        failure = f"{type(exc).__name__}: {exc}"
    result.setdefault("events", [])
    result["interrupt_sent"] = result.get("state", {}).get("interrupt_sent")
    result["seconds"] = round(time.monotonic() - started, 1)
    result["torch_after"] = torch_fingerprint(python)
    nbformat.write(notebook, out / "executed.ipynb")
    checks = check(result, notebook, content, drive / "finqlora", args.interrupt_at_step) if failure is None else {
        "executed": {"ok": False, "error": failure}}
    summary = {"seconds": result["seconds"], "checks": checks, "runs": result.get("runs"),
               "interrupt_sent": result.get("interrupt_sent")}
    (out / "result.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    (out / "stream.txt").write_text("".join(f"[{e['run']} +{e['t'] - started:7.2f}s] {e['text']}" for e in result["events"]),
                                    encoding="utf-8")
    for name, item in checks.items():
        print(f"{'PASS' if item['ok'] else 'FAIL'} {name}: " + json.dumps({k: v for k, v in item.items() if k != 'ok'}, default=str)[:600])
    print(f"notebook executed in {result['seconds']} s; outputs in {out}")
    return 0 if checks and all(item["ok"] for item in checks.values()) else 1


# ------------------------------------------------------------------------------------------------
# The tiny random-weight model of the GPU check
# ------------------------------------------------------------------------------------------------


def make_model(args: argparse.Namespace) -> int:
    """A Llama-architecture model shaped like deepseek-llm-7b (its architecture is LlamaForCausalLM),
    scaled down, with random weights in fp16 as safetensors, and the tokenizer from `--tokenizer`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,  # deepseek-7b's 11008 / 4096 ratio
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,  # deepseek-llm-7b has no grouped-query attention
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float16)
    out = Path(args.out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    files = sorted(p.name for p in out.iterdir())
    print(f"tiny deepseek-shaped Llama: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, fp16, in {out}: {files}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="execute the notebook under a simulated Colab and check it")
    p_run.add_argument("--out", required=True, help="folder for result.json, stream.txt and executed.ipynb")
    p_run.add_argument("--workdir", help="the simulation's folder (default: a new temporary one)")
    p_run.add_argument("--repo-url", help="git URL the install cell clones (REPO_URL)")
    p_run.add_argument("--source-zip", action="store_true", help="put a source zip of this tree on the simulated Drive instead")
    p_run.add_argument("--smoke", action="store_true", help="the notebook's CPU smoke settings (FINQLORA_NOTEBOOK_SMOKE=1)")
    p_run.add_argument("--set", help="FINQLORA_NOTEBOOK_SET: config overrides, 'key=value;key=value'")
    p_run.add_argument("--interrupt-at-step", type=int, help="interrupt the run cell at this training step, then rerun it")
    p_run.add_argument("--host-path", action="append", default=[], help="extra package folder preinstalled in the runtime")
    p_run.add_argument("--cell-timeout", type=int, default=900)
    p_model = sub.add_parser("make-model", help="save a tiny random-weight deepseek-shaped Llama")
    p_model.add_argument("--tokenizer", required=True)
    p_model.add_argument("--out", required=True)
    args = parser.parse_args()
    return run(args) if args.command == "run" else make_model(args)


if __name__ == "__main__":
    sys.exit(main())
