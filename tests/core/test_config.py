"""Run configs: defaults, YAML loading, errors that name the key, --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finqlora.core.config import RunConfig, TrainConfig, dump_config, load_config, parse_override
from finqlora.core.errors import FinqloraError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_defaults_are_the_standard_qlora_recipe() -> None:
    train = RunConfig().train
    assert (train.lora_r, train.lora_alpha, train.lora_dropout) == (8, 16, 0.05)
    assert train.target_modules == "all-linear"
    assert (train.num_epochs, train.batch_size, train.learning_rate, train.max_length) == (3, 4, 2e-4, 512)
    assert train.lr_scheduler == "cosine" and train.warmup_ratio > 0
    assert train.optim == "auto"  # paged_adamw_8bit on CUDA, adamw_torch on CPU (tests/train/test_training.py)
    assert RunConfig(name="abc").train.output_dir == str(Path("runs") / "abc")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_load_and_name_everything(path: Path) -> None:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    run = load_config(path)
    assert run.name == raw["name"]
    # A config names every training key, so a run can be repeated from the file alone.
    missing = set(TrainConfig.model_fields) - set(raw["train"]) - {"eval_batch_size", "resume_from_checkpoint",
                                                                    "early_stopping_threshold", "save_adapter_bin",
                                                                    "chat_template", "trust_remote_code",
                                                                    "val_fraction", "max_steps", "lora_layers"}
    assert not missing, f"{path.name} leaves out {sorted(missing)}"


def test_shipped_gpu_configs() -> None:
    t4 = load_config(REPO / "configs" / "deepseek-7b-qlora-t4.yaml").train
    bf16 = load_config(REPO / "configs" / "deepseek-7b-qlora.yaml").train
    for cfg in (t4, bf16):
        assert cfg.model == "deepseek-ai/deepseek-llm-7b-chat"
        # optim auto: paged 8-bit AdamW on CUDA, the profile's own under `compiled` (tests/train/test_training.py)
        assert cfg.load_in_4bit is True and cfg.optim == "auto" and cfg.gradient_checkpointing is True
        assert (cfg.batch_size, cfg.max_length, cfg.lora_r, cfg.lora_alpha) == (4, 512, 8, 16)
    assert t4.compute_dtype == "fp16" and bf16.compute_dtype == "bf16"


def test_unknown_key_names_the_key_and_suggests(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntrain:\n  lora_rr: 4\n", encoding="utf-8")
    with pytest.raises(FinqloraError) as caught:
        load_config(path)
    assert "train.lora_rr" in caught.value.message and str(path) in caught.value.message
    assert "did you mean 'lora_r'" in caught.value.hint


def test_bad_choice_lists_allowed_values(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  optim: adam\n", encoding="utf-8")
    with pytest.raises(FinqloraError) as caught:
        load_config(path)
    message = caught.value.message
    assert "'train.optim'" in message and "'adam'" in message
    assert "paged_adamw_8bit" in message and "adamw_torch" in message


def test_bad_number_and_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 0\n", encoding="utf-8")
    with pytest.raises(FinqloraError, match=r"'train.batch_size'.*greater than or equal to 1.*got 0"):
        load_config(path)
    path.write_text("train:\n  batch_size: [1\n", encoding="utf-8")
    with pytest.raises(FinqloraError, match=r"not valid YAML at line \d+"):
        load_config(path)
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(FinqloraError, match="top level must be a mapping"):
        load_config(path)
    with pytest.raises(FinqloraError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(FinqloraError, match="target_modules"):
        load_config(None, ["train.target_modules=everything"])


def test_set_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: base\ntrain:\n  learning_rate: 1.0e-4\n  batch_size: 2\n", encoding="utf-8")
    run = load_config(path, ["train.learning_rate=3e-4", "max_length=256", "target_modules=[q_proj, v_proj]",
                             "train.load_in_4bit=null", "eval.max_samples=7", "name=other"])
    assert run.train.learning_rate == 3e-4 and run.train.batch_size == 2
    assert run.train.max_length == 256 and run.train.target_modules == ["q_proj", "v_proj"]
    assert run.train.load_in_4bit is None and run.eval.max_samples == 7 and run.name == "other"
    assert parse_override("train.dataset=\"1e5\"") == (["train", "dataset"], "1e5")
    with pytest.raises(FinqloraError, match="not key=value"):
        parse_override("learning_rate")
    with pytest.raises(FinqloraError, match="several sections"):
        parse_override("seed=1")  # data.seed and train.seed
    with pytest.raises(FinqloraError, match="not a known key"):
        parse_override("lerning_rate=1")
    with pytest.raises(FinqloraError, match="unknown section"):
        parse_override("trian.seed=1")


def test_dump_round_trips(tmp_path: Path) -> None:
    run = load_config(REPO / "configs" / "demo-cpu.yaml", ["train.seed=5"])
    path = tmp_path / "again.yaml"
    path.write_text(dump_config(run), encoding="utf-8")
    assert load_config(path) == run
