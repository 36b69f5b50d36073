"""Training on the CPU with the tiny random Llama (tiny_model_dir): mechanics, not answer quality."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

from finqlora.core.chat_format import assistant_turn_suffix, render_prompt, record_to_chat
from finqlora.core.config import TrainConfig
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import sha256_file
from finqlora.train.checkpoints import CHECKPOINT_MARKER, check_free_space, checkpoint_is_complete, find_latest_checkpoint
from finqlora.train.collate import make_data_collator
from finqlora.train.data import encode_records, load_splits
from finqlora.train.profiles import get_profile
from finqlora.train.setup import resolve_plan
from finqlora.train.training import train

REPO = Path(__file__).resolve().parents[2]
ANSWERS = ["利好。降息降低融资成本。", "利空。业绩大幅下滑。", "中性。影响有限，市场已有预期。"]


def write_dataset(path: Path, n_train: int, n_val: int = 4, n_test: int = 2, *, splits: bool = True) -> Path:
    rows = []
    for i in range(n_train + n_val + n_test):
        split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        row = {
            "id": f"t{i}",
            "type": "news_impact",
            "instruction": "判断这条新闻对相关资产的影响方向。",
            "input": f"第{i}条快讯：公司公告季度业绩。",
            "output": ANSWERS[i % 3],
            "event_id": None,
            "event_time": None,
            "label": {},
        }
        if splits:
            row["split"] = split
        rows.append(row)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_config(model_dir: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        model=str(model_dir),
        dataset=str(data),
        output_dir=str(out),
        batch_size=4,
        max_length=96,
        num_epochs=1,
        learning_rate=2e-3,
        seed=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


class SignalAtStep(TrainerCallback):
    """Sends a real signal to this process at the end of a given step (exercises the handler)."""

    def __init__(self, step: int, signum: int = signal.SIGINT) -> None:
        self.step = step
        self.signum = signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)
            time.sleep(0.05)  # let the interpreter run the Python-level handler now


# ----------------------------------------------------------------------------- data and masking


def test_prompt_is_masked_and_answer_ends_with_end_of_turn(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = write_dataset(tmp_path / "d.jsonl", 3, 0, 0)
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    dataset, stats = encode_records(tokenizer, records, max_length=256)
    end_ids = tokenizer.encode(assistant_turn_suffix(tokenizer), add_special_tokens=False)
    assert end_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    for record, example in zip(records, dataset.examples):
        prompt_ids = tokenizer.encode(render_prompt(tokenizer, record_to_chat(record).messages), add_special_tokens=False)
        ids, labels = example["input_ids"], example["labels"]
        assert ids[: len(prompt_ids)] == prompt_ids
        assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
        answer_labels = labels[len(prompt_ids) :]
        assert answer_labels == ids[len(prompt_ids) :]
        assert answer_labels[-1] == end_ids[0]  # the model learns to stop where inference stops
        assert tokenizer.decode(answer_labels[:-1]) == record["output"]
    assert stats.examples == 3 and stats.trimmed == 0

    batch = make_data_collator(tokenizer, get_profile("default"))(dataset.examples)
    lengths = [len(e["input_ids"]) for e in dataset.examples]
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].sum().item() == n
        assert (batch["labels"][row, n:] == -100).all()


def test_splits_from_field_and_hold_out(tmp_path: Path) -> None:
    with_split = load_splits(write_dataset(tmp_path / "a.jsonl", 10, 3, 2), val_fraction=0.1, seed=0)
    assert (len(with_split.train), len(with_split.val), with_split.test_records) == (10, 3, 2)
    no_split = load_splits(write_dataset(tmp_path / "b.jsonl", 16, 2, 2, splits=False), val_fraction=0.1, seed=0)
    assert (len(no_split.train), len(no_split.val)) == (18, 2)
    again = load_splits(tmp_path / "b.jsonl", val_fraction=0.1, seed=0)
    assert [r["id"] for r in again.val] == [r["id"] for r in no_split.val]  # seeded, repeatable


def test_bad_dataset_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{not json\n', encoding="utf-8")
    with pytest.raises(FinqloraError, match=r"bad\.jsonl:2: not valid JSON"):
        load_splits(path, val_fraction=0.1, seed=0)
    path.write_text('{"instruction": "a", "output": ""}\n', encoding="utf-8")
    with pytest.raises(FinqloraError, match=r"bad\.jsonl:1: .*empty answer"):
        load_splits(path, val_fraction=0.1, seed=0)
    path.write_text('{"instruction": "a", "output": "b", "split": "dev"}\n', encoding="utf-8")
    with pytest.raises(FinqloraError, match="split"):
        load_splits(path, val_fraction=0.1, seed=0)


def test_4bit_training_on_cpu_is_refused() -> None:
    with pytest.raises(FinqloraError, match="gradients"):
        resolve_plan(TrainConfig(device="cpu", load_in_4bit=True))
    plan = resolve_plan(TrainConfig(device="cpu"))
    assert (plan.load_in_4bit, plan.dtype_name, plan.optim) == (False, "fp32", "adamw_torch")
    with pytest.raises(FinqloraError, match="CUDA"):
        resolve_plan(TrainConfig(device="cpu", optim="paged_adamw_8bit"))


def test_optimizer_auto_takes_the_speed_profiles_choice_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from finqlora.core.config import load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the plan only; nothing runs on a GPU
    for config in ("deepseek-7b-qlora.yaml", "deepseek-7b-qlora-t4.yaml"):
        cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / config).train
        assert resolve_plan(cfg, get_profile("default")).optim == "paged_adamw_8bit"
        assert resolve_plan(cfg, get_profile("compiled")).optim == "adamw_torch_fused"
        assert resolve_plan(cfg, get_profile("t4-compiled")).optim == "adamw_torch_fused"
        explicit = cfg.model_copy(update={"optim": "paged_adamw_8bit"})
        assert resolve_plan(explicit, get_profile("compiled")).optim == "paged_adamw_8bit"


def test_free_space_check(tmp_path: Path) -> None:
    check_free_space(tmp_path / "not" / "yet" / "made", 1024)
    with pytest.raises(FinqloraError, match="free disk space"):
        check_free_space(tmp_path, 10**18)


# ----------------------------------------------------------------------------- training runs


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["default", "cpu"])
def test_loss_falls_on_a_repeated_batch(tiny_model_dir: Path, tmp_path: Path, profile: str) -> None:
    # The same 4 samples 25 times over: one epoch of 25 steps that all see the same data.
    data = write_dataset(tmp_path / "d.jsonl", 4, 2, 0)
    lines = data.read_text(encoding="utf-8").splitlines()
    data.write_text("\n".join(lines[:4] * 25 + lines[4:]) + "\n", encoding="utf-8")
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "out", max_steps=25, learning_rate=1e-2, lora_dropout=0.0, profile=profile)
    result = train(cfg, progress=False)
    losses = [p["loss"] for p in result.info["train_losses"]]
    assert len(losses) == 25 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    assert sum(losses[-5:]) < sum(losses[:5]) - 1.5, losses
    grad_norms = [json.loads(line).get("grad_norm") for line in (tmp_path / "out" / "training_log.jsonl").read_text().splitlines()]
    assert all(g > 0 for g in grad_norms if g is not None)
    # The LoRA B matrices start at zero: non-zero now means gradients reached them.
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, object, Path]:
    root = tmp_path_factory.mktemp("run")
    data = write_dataset(root / "data.jsonl", 12, 4, 3)
    cfg = tiny_config(tiny_model_dir, data, root / "out", num_epochs=2, eval_steps=2, keep_checkpoints=2, save_adapter_bin=True,
                      eval_on_start=True, max_val_samples=3)
    return cfg, train(cfg, progress=False), root / "out"


@pytest.mark.slow
def test_every_output_is_present_and_truthful(finished_run, tiny_model_dir: Path) -> None:
    cfg, result, out = finished_run
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "adapter_model.bin",
        "tokenizer_config.json",
        "tokenizer.json",
        "training_info.json",
        "training_log.jsonl",
        "loss.png",
        "run_config.yaml",
    ):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template

    info = json.loads((out / "training_info.json").read_text(encoding="utf-8"))
    assert info["status"] == "completed"
    hp = info["hyperparameters"]
    for key in ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "batch_size", "max_length",
                "num_epochs", "lr_scheduler", "warmup_ratio", "optim", "seed", "eval_steps"):
        assert hp[key] == cfg.model_dump(mode="json")[key], key
    assert hp["resolved_device"] == "cpu" and hp["resolved_load_in_4bit"] is False and hp["resolved_optim"] == "adamw_torch"
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == cfg.lora_r and adapter_config["lora_alpha"] == cfg.lora_alpha

    weights_digest = __import__("hashlib").sha256(
        f"model.safetensors:{sha256_file(tiny_model_dir / 'model.safetensors')}\n".encode()
    ).hexdigest()
    assert info["base_model"]["weights_sha256"] == weights_digest
    assert info["base_model"]["architecture"] == "LlamaForCausalLM"

    ds = info["dataset"]
    assert ds["sha256"] == sha256_file(cfg.dataset)
    assert (ds["records"], ds["train_records"], ds["val_records"], ds["test_records_ignored"]) == (19, 12, 4, 3)
    assert ds["val_records_used"] == 3

    for lib in ("torch", "transformers", "peft"):
        assert info["libraries"][lib] == importlib.metadata.version(lib)
    assert info["device"].startswith("CPU")
    assert info["memory"]["peak_process_rss_gib"] > 0.05
    assert info["throughput"]["tokens_per_second"] > 0

    # 12 samples / batch 4 = 3 steps per epoch, 2 epochs; each epoch timed.
    assert result.global_step == info["global_step"] == 6
    assert [e["steps"] for e in info["timing"]["epochs"]] == [3, 3]
    assert all(e["seconds"] > 0 for e in info["timing"]["epochs"])

    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text(encoding="utf-8").splitlines()]
    step_rows = [r for r in log if "loss" in r]
    assert [r["step"] for r in step_rows] == list(range(1, 7))
    assert [r["loss"] for r in step_rows] == [p["loss"] for p in info["train_losses"]]
    assert all(r["learning_rate"] is not None and r["grad_norm"] is not None and r["tokens_per_s"] > 0 for r in step_rows)
    # Validation before training, every 2 steps and at each epoch end (step 3 and 6), once per step.
    val_steps = [r["step"] for r in log if "eval_loss" in r]
    assert val_steps == [0, 2, 3, 4, 6] == [v["step"] for v in info["val_losses"]]

    best = min(info["val_losses"], key=lambda v: v["loss"])
    assert info["best_step"] == best["step"] and info["best_val_loss"] == pytest.approx(best["loss"])
    # The saved adapter is the best checkpoint's.
    best_dir = Path(info["best_checkpoint"])
    assert best_dir.name == f"checkpoint-{best['step']}" and best_dir.is_dir()
    final = load_file(out / "adapter_model.safetensors")
    at_best = load_file(best_dir / "adapter_model.safetensors")
    assert final.keys() == at_best.keys()
    assert all(torch.equal(final[k], at_best[k]) for k in final)
    bin_weights = torch.load(out / "adapter_model.bin", weights_only=True)
    assert all(torch.equal(final[k], bin_weights[k]) for k in final)
    # At most keep_checkpoints, plus the best one, and all complete.
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert 2 <= len(checkpoints) <= 3 and all(checkpoint_is_complete(c) for c in checkpoints)


@pytest.mark.slow
def test_half_written_checkpoint_is_skipped(finished_run, tmp_path: Path) -> None:
    import shutil

    _, _, out = finished_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    latest, incomplete = find_latest_checkpoint(copy)
    assert latest is not None and incomplete == []
    # A crash mid-save: the newest folder exists but its marker was never written.
    half = copy / "checkpoint-99"
    shutil.copytree(latest, half)
    (half / CHECKPOINT_MARKER).unlink()
    assert find_latest_checkpoint(copy) == (latest, [half])
    # A truncated file in a folder whose marker exists is caught by the recorded sizes.
    shutil.copy(latest / CHECKPOINT_MARKER, half / CHECKPOINT_MARKER)
    with open(half / "optimizer.pt", "r+b") as handle:
        handle.truncate(10)
    assert not checkpoint_is_complete(half)
    assert find_latest_checkpoint(copy)[0] == latest


@pytest.mark.slow
def test_resume_gives_the_same_adapter_as_a_straight_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 24, 4, 0)  # 24 / batch 4 = 6 steps in one epoch
    common = dict(lora_dropout=0.1, warmup_ratio=0.2)  # dropout + warmup: RNG and schedule must resume too
    straight = train(tiny_config(tiny_model_dir, data, tmp_path / "a", **common), progress=False)
    assert straight.status == "completed" and straight.global_step == 6

    first = train(tiny_config(tiny_model_dir, data, tmp_path / "b", **common), callbacks=[SignalAtStep(3)], progress=False)
    assert first.status == "interrupted" and first.global_step == 3 and first.info["interrupted_by"] == "SIGINT"
    assert checkpoint_is_complete(tmp_path / "b" / "checkpoint-3")
    assert not (tmp_path / "b" / "adapter_model.safetensors").exists()
    resumed = train(
        tiny_config(tiny_model_dir, data, tmp_path / "b", resume_from_checkpoint="auto", **common), progress=False
    )
    assert resumed.status == "completed" and resumed.global_step == 6
    assert resumed.info["resumed_from"].endswith("checkpoint-3")

    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    losses_a = [p["loss"] for p in straight.info["train_losses"]]
    losses_b = [p["loss"] for p in resumed.info["train_losses"]]
    assert losses_b == pytest.approx(losses_a, rel=1e-5)
    log_rows = [json.loads(x) for x in (tmp_path / "b" / "training_log.jsonl").read_text().splitlines()]
    log_steps = [row["step"] for row in log_rows if "loss" in row]
    assert log_steps == [1, 2, 3, 4, 5, 6]  # the log continues, without duplicated steps


@pytest.mark.slow
def test_sigterm_to_the_cli_saves_a_checkpoint_and_exits(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 40, 4, 0)
    out = tmp_path / "out"
    command = [
        sys.executable, "-c", "from finqlora.cli import main; main()",
        "train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
        "--batch_size", "2", "--max_length", "96", "--set", "train.max_steps=2000", "--no-progress",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    log = out / "training_log.jsonl"
    logged = 0
    deadline = time.monotonic() + 300  # a busy shared CPU can take minutes for the first steps
    while time.monotonic() < deadline and process.poll() is None and logged < 3:
        logged = sum(1 for line in log.read_text().splitlines() if '"loss"' in line) if log.exists() else 0
        time.sleep(0.2)
    assert process.poll() is None and logged >= 3, process.communicate()
    process.send_signal(signal.SIGTERM)  # within step 4 or later: the last complete step is saved
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM received" in stderr and "--resume_from_checkpoint auto" in stderr
    info = json.loads((out / "training_info.json").read_text(encoding="utf-8"))
    assert info["status"] == "interrupted" and info["interrupted_by"] == "SIGTERM"
    latest, _ = find_latest_checkpoint(out)
    assert latest is not None and latest.name == f"checkpoint-{info['global_step']}"
    assert 3 <= info["global_step"] < 2000


@pytest.mark.slow
def test_non_finite_loss_stops_with_advice(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 8, 2, 0)
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "out", max_steps=6, learning_rate=1e30, warmup_ratio=0.0, max_grad_norm=1e30)
    with pytest.raises(FinqloraError, match=r"loss became nan at step 2") as caught:
        train(cfg, progress=False)
    assert "learning_rate" in caught.value.hint
    info = json.loads((tmp_path / "out" / "training_info.json").read_text())
    assert info["status"].startswith("failed") and info["global_step"] == 2
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # broken weights are never checkpointed


@pytest.mark.slow
def test_out_of_memory_is_caught_with_advice(tiny_model_dir: Path, tmp_path: Path) -> None:
    class RunOutOfMemory(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    data = write_dataset(tmp_path / "d.jsonl", 8, 2, 0)
    with pytest.raises(FinqloraError, match="out of memory") as caught:
        train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_steps=4), callbacks=[RunOutOfMemory()], progress=False)
    assert "batch_size (now 4)" in caught.value.hint and "max_length (now 96)" in caught.value.hint
    assert "gradient_checkpointing" in caught.value.hint


def test_demo_config_names_a_cpu_run() -> None:
    from finqlora.core.config import load_config

    run = load_config(REPO / "configs" / "demo-cpu.yaml")
    assert run.train.model == "builtin:qwen2.5-coder-0.5b-instruct"
    assert run.train.load_in_4bit is False and run.train.device == "cpu"
    profile = get_profile(run.train.profile)
    plan = resolve_plan(run.train, profile)
    assert plan.device == "cpu" and not plan.load_in_4bit and plan.optim == "adamw_torch"
    # compute_dtype auto: the profile picks bf16 on CPUs with fast bf16 (AMX / AVX512-BF16), else fp32
    assert plan.dtype_name == profile.compute_dtype


@pytest.mark.slow
def test_lora_layers_adapts_only_the_last_blocks(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 8, 2, 0)
    result = train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_steps=2, lora_layers=1), progress=False)
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert adapter and all(".layers.1." in name for name in adapter)
    # all seven linear layers of the block, as all-linear would choose
    assert {name.split(".layers.1.")[1].split(".lora")[0] for name in adapter} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    }
    assert result.info["parameters"]["trainable"] == sum(t.numel() for t in adapter.values())
    with pytest.raises(FinqloraError, match="has 2 transformer blocks"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "out2", max_steps=1, lora_layers=3), progress=False)


@pytest.mark.slow  # a subprocess that imports torch + transformers
def test_guide_script_runs_the_same_command(tmp_path: Path) -> None:
    script = REPO / "scripts" / "qlora" / "train_qlora.py"
    completed = subprocess.run(
        [sys.executable, str(script), "--data_path", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "o"),
         "--num_epochs", "1", "--learning_rate", "1e-4"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert completed.returncode == 2, completed.stderr
    assert "dataset not found" in completed.stderr and "missing.jsonl" in completed.stderr
