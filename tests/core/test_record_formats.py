"""The formats users bring: Alpaca (JSONL or a JSON array, with history), ShareGPT, OpenAI messages,
LLaMA-Factory's dataset_info.json (read and written) and its training YAML."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from finqlora.cli import app
from finqlora.core.chat_format import record_to_chat
from finqlora.core.config import load_config
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import sha256_file
from finqlora.core.records import read_dataset
from finqlora.train.data import load_splits

ALPACA = [
    {"instruction": "什么是市盈率？", "input": "", "output": "股价除以每股收益。", "system": "你是金融助手。"},
    {"instruction": "那市净率呢？", "input": "", "output": "股价除以每股净资产。", "history": [["什么是市盈率？", "股价除以每股收益。"]]},
    {"instruction": "计算单利。", "input": "本金1000元，年利率3%，2年。", "output": "利息60元。"},
    {"instruction": "什么是久期？", "input": "", "output": "久期衡量债券价格对利率变化的敏感度。"},
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "什么是市盈率？"}, {"from": "gpt", "value": "股价除以每股收益。"},
                       {"from": "human", "value": "那市净率呢？"}, {"from": "gpt", "value": "股价除以每股净资产。"}], "system": "你是金融助手。"},
    {"conversations": [{"from": "system", "value": "简洁回答。"}, {"from": "human", "value": "计算单利：本金1000元，年利率3%，2年。"},
                       {"from": "gpt", "value": "利息60元。"}]},
    {"conversations": [{"from": "human", "value": "什么是久期？"}, {"from": "gpt", "value": "久期衡量债券价格对利率变化的敏感度。"}]},
    {"conversations": [{"from": "human", "value": "降息对银行股的影响？"}, {"from": "gpt", "value": "净息差收窄，利空银行盈利。"}]},
]
MESSAGES = [{"messages": [{"role": "user", "content": "什么是久期？"}, {"role": "assistant", "content": "利率敏感度。"}]}]


def test_layouts_are_detected_in_jsonl_and_json_arrays(tmp_path: Path) -> None:
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps(ALPACA, ensure_ascii=False, indent=2), encoding="utf-8")
    lines = tmp_path / "sharegpt.jsonl"
    lines.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in SHAREGPT), encoding="utf-8")
    chat = tmp_path / "messages.jsonl"
    chat.write_text(json.dumps(MESSAGES[0], ensure_ascii=False) + "\n", encoding="utf-8")

    _, alpaca = read_dataset(array)
    assert alpaca[0][1] == ALPACA[0] or "messages" in alpaca[0][1]
    with_history = record_to_chat(alpaca[1][1])
    assert [m["role"] for m in with_history.messages] == ["user", "assistant", "user"] and with_history.answer == "股价除以每股净资产。"
    assert record_to_chat(alpaca[0][1]).messages[0] == {"role": "system", "content": "你是金融助手。"}

    _, sharegpt = read_dataset(lines)
    first = record_to_chat(sharegpt[0][1])
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant", "user"] and first.answer == "股价除以每股净资产。"
    assert record_to_chat(sharegpt[1][1]).messages[0] == {"role": "system", "content": "简洁回答。"}
    assert record_to_chat(read_dataset(chat)[1][0][1]).answer == "利率敏感度。"


def test_unknown_layouts_name_the_file_and_row(tmp_path: Path) -> None:
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps([ALPACA[0], {"question": "q", "answer": "a"}]), encoding="utf-8")
    with pytest.raises(FinqloraError) as caught:
        read_dataset(odd)
    assert f"{odd}: row 2: unknown record layout (fields: question, answer)" in caught.value.message
    bad_turn = tmp_path / "turn.jsonl"
    bad_turn.write_text(json.dumps({"conversations": [{"from": "robot", "value": "x"}]}) + "\n", encoding="utf-8")
    with pytest.raises(FinqloraError, match=r"row 1: turn 0 of 'conversations' has from 'robot'"):
        read_dataset(bad_turn)


def test_a_dataset_info_entry_is_read_with_its_columns_and_tags(tmp_path: Path) -> None:
    """LLaMA-Factory's documented schema: file_name, formatting, columns, tags (data/README.md)."""
    rows = [{"dialog": [{"speaker": "client", "text": "问题一"}, {"speaker": "advisor", "text": "回答一"}], "sys": "顾问"}] * 3
    (tmp_path / "mine.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    info = {"finance_chat": {"file_name": "mine.json", "formatting": "sharegpt", "columns": {"messages": "dialog", "system": "sys"},
                             "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "client", "assistant_tag": "advisor"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    splits = load_splits(f"{tmp_path / 'dataset_info.json'}:finance_chat", val_fraction=0.34, seed=0)
    record = (splits.train + splits.val)[0]
    assert record["messages"] == [{"role": "system", "content": "顾问"}, {"role": "user", "content": "问题一"}, {"role": "assistant", "content": "回答一"}]
    # As in LLaMA-Factory: an alpaca entry reads `system` only when its columns name it; `openai` is sharegpt with OpenAI names.
    (tmp_path / "alpaca.json").write_text(json.dumps(ALPACA, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "chat.json").write_text(json.dumps(MESSAGES * 3, ensure_ascii=False), encoding="utf-8")
    info.update({"plain": {"file_name": "alpaca.json"}, "with_system": {"file_name": "alpaca.json", "columns": {"system": "system"}},
                 "chat": {"file_name": "chat.json", "formatting": "openai"}})
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    spec = str(tmp_path / "dataset_info.json")
    assert [m["role"] for m in read_dataset(f"{spec}:plain")[1][0][1]["messages"]] == ["user", "assistant"]
    assert [m["role"] for m in read_dataset(f"{spec}:with_system")[1][0][1]["messages"]] == ["system", "user", "assistant"]
    assert record_to_chat(read_dataset(f"{spec}:chat")[1][0][1]).answer == "利率敏感度。"
    with pytest.raises(FinqloraError, match="no dataset named 'other'") as caught:
        read_dataset(f"{tmp_path / 'dataset_info.json'}:other")
    assert "finance_chat" in caught.value.hint


def _llamafactory_loader():
    """LLaMA-Factory's own dataset loader, when its source is at hand (FINQLORA_LLAMAFACTORY_SRC = an unpacked wheel).

    Its package __init__ imports torchaudio and gradio, which this environment lacks; the loader
    modules themselves need neither, so they are imported without it.
    """
    root = os.environ.get("FINQLORA_LLAMAFACTORY_SRC")
    if not root or not (Path(root) / "llamafactory" / "data" / "loader.py").is_file():
        return None
    for name in ("llamafactory", "llamafactory.data", "llamafactory.hparams"):
        module = types.ModuleType(name)
        module.__path__ = [str(Path(root, *name.split(".")))]
        sys.modules.setdefault(name, module)
    from llamafactory.data.loader import _load_single_dataset
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams.data_args import DataArguments
    from transformers import Seq2SeqTrainingArguments

    def load(folder: Path, name: str) -> list[dict]:
        data_args = DataArguments(dataset=name, dataset_dir=str(folder), template="default")
        training_args = Seq2SeqTrainingArguments(output_dir=str(folder / "lf-out"))
        model_args = types.SimpleNamespace(cache_dir=None, hf_hub_token=None)  # only these are read for local files
        return list(_load_single_dataset(get_dataset_list([name], str(folder))[0], model_args, data_args, training_args))

    return load


@pytest.mark.parametrize("record_format", ["sharegpt", "alpaca", "messages"])
def test_built_dataset_loads_with_llamafactorys_loader(record_format: str, tmp_path: Path) -> None:
    out = tmp_path / "fin.jsonl"
    done = CliRunner().invoke(app, ["build", "--templates-only", "--tokenizer", "chars", "-n", "20", "--format", record_format, "-o", str(out), "-q"])
    assert done.exit_code == 0, done.output
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    info = json.loads((tmp_path / "dataset_info.json").read_text(encoding="utf-8"))
    assert set(info) == {"fin", "fin_val"}
    # The documented schema: file_name beside dataset_info.json, formatting, and for sharegpt its columns and tags.
    entry = info["fin"]
    train_rows = [json.loads(line) for line in (tmp_path / entry["file_name"]).read_text(encoding="utf-8").splitlines()]
    assert len(train_rows) == sum(r["split"] == "train" for r in records)
    if record_format == "alpaca":
        assert entry == {"file_name": "fin_train.jsonl", "formatting": "alpaca"}
        assert all(set(r) == {"instruction", "input", "output"} for r in train_rows)
    else:
        column = entry["columns"]["messages"]
        tags = entry["tags"]
        assert entry["formatting"] == "sharegpt" and all(set(r) == {column} for r in train_rows)
        assert [t[tags["role_tag"]] for t in train_rows[0][column]] == [tags["user_tag"], tags["assistant_tag"]]
    # Our own loader reads the entry back as LLaMA-Factory would.
    ours = load_splits(f"{tmp_path / 'dataset_info.json'}:fin", val_fraction=0.1, seed=0)
    assert len(ours.train) + len(ours.val) == len(train_rows)
    load = _llamafactory_loader()
    if load is None:
        pytest.skip("LLaMA-Factory's source not given (FINQLORA_LLAMAFACTORY_SRC); the documented schema was checked above")
    loaded = load(tmp_path, "fin")
    assert len(loaded) == len(train_rows)
    first = record_to_chat(records[[r["split"] for r in records].index("train")])
    assert loaded[0]["_prompt"] == first.messages and loaded[0]["_response"] == [{"role": "assistant", "content": first.answer}]


@pytest.mark.parametrize("layout", ["alpaca", "sharegpt"])
def test_llamafactory_files_build_and_train(layout: str, tmp_path: Path) -> None:
    """An Alpaca JSON array and a ShareGPT file: mixed into a build, and trained on directly (2 steps, SmolLM2, cpu profile)."""
    file = tmp_path / f"{layout}.json"
    file.write_text(json.dumps(ALPACA if layout == "alpaca" else SHAREGPT, ensure_ascii=False, indent=2), encoding="utf-8")
    built = tmp_path / "built.jsonl"
    done = CliRunner().invoke(app, ["build", "--templates-only", "--tokenizer", "chars", "-n", "6", "--add-dataset", str(file),
                                    "--add-format", layout, "-o", str(built), "-q"])
    assert done.exit_code == 0, done.output
    mixed = [json.loads(line) for line in built.read_text(encoding="utf-8").splitlines() if '"public_data"' in line]
    assert len(mixed) == 4 and any("股价除以每股净资产。" == r["output"] for r in mixed)
    out = tmp_path / "run"
    trained = CliRunner().invoke(app, ["train", "--data", str(file), "--model", "builtin:smollm2-135m-instruct", "--profile", "cpu",
                                       "--output-dir", str(out), "--max-length", "128", "--batch-size", "2", "--no-progress",
                                       "--set", "train.max_steps=2", "--set", "train.device=cpu", "--set", "train.load_in_4bit=false",
                                       "--set", "train.val_fraction=0.25", "--set", "train.lora_layers=2", "--set", "train.max_val_samples=1"])
    assert trained.exit_code == 0, trained.output
    info = json.loads((out / "training_info.json").read_text(encoding="utf-8"))
    assert len(info["train_losses"]) == 2 and info["dataset"]["sha256"] == sha256_file(file)
    assert (out / "adapter_model.safetensors").is_file()


def test_llamafactory_yaml_becomes_a_run_config(tmp_path: Path) -> None:
    lf = {
        "model_name_or_path": "Qwen/Qwen2.5-7B-Instruct", "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 16, "lora_target": "q_proj,v_proj", "quantization_bit": 4, "template": "qwen", "cutoff_len": 1024,
        "dataset": "fin_news,alpaca_en_demo", "dataset_dir": "data", "max_samples": 1000, "output_dir": "saves/qwen-fin",
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 8, "learning_rate": 1.0e-4, "num_train_epochs": 2.0,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": True, "logging_steps": 10, "save_steps": 200, "plot_loss": True,
    }
    source = tmp_path / "lf.yaml"
    source.write_text(yaml.safe_dump(lf), encoding="utf-8")
    target = tmp_path / "ours.yaml"
    done = CliRunner().invoke(app, ["config", "from-llamafactory", str(source), "-o", str(target)])
    assert done.exit_code == 0, done.output
    run = load_config(target)
    t = run.train
    assert (t.model, t.lora_r, t.lora_alpha, t.lora_dropout, t.target_modules) == ("Qwen/Qwen2.5-7B-Instruct", 16, 32, 0.0, ["q_proj", "v_proj"])
    assert (t.load_in_4bit, t.compute_dtype, t.max_length, t.batch_size, t.gradient_accumulation_steps) == (True, "bf16", 1024, 2, 8)
    assert (t.learning_rate, t.num_epochs, t.lr_scheduler, t.warmup_ratio, t.seed) == (1e-4, 2.0, "cosine", 0.1, 42)
    assert (t.output_dir, t.logging_steps, t.eval_steps, t.dataset) == ("saves/qwen-fin", 10, 200, "data/dataset_info.json:fin_news")
    text = target.read_text(encoding="utf-8")
    for unmapped in ("template: 'qwen'", "max_samples: 1000", "dataset: alpaca_en_demo"):
        assert unmapped in text and unmapped in " ".join(done.output.split())
    assert "plot_loss" not in text  # same behaviour here: not reported as missing
