"""Issue 18 item 5: every resume verifies the checkpoint's SHA-256 sums and says what is wrong.

One tiny run (module fixture) leaves checkpoint-2 and checkpoint-4; each test corrupts a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.train.test_training import tiny_config, write_dataset

from finqlora.core.errors import FinqloraError
from finqlora.train.checkpoints import CHECKPOINT_MARKER, checkpoint_is_complete, find_latest_checkpoint
from finqlora.train.training import train


@pytest.fixture(scope="module")
def checkpointed_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    data = write_dataset(root / "data.jsonl", 16, 2, 0)  # 16 / batch 4 = 4 steps
    train(tiny_config(tiny_model_dir, data, root / "out", eval_steps=2, keep_checkpoints=3, load_best_at_end=False),
          progress=False)
    return root / "out", data


def _copy(checkpointed_run: tuple[Path, Path], tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(checkpointed_run[0], out)
    return out


def _overwrite_same_size(path: Path) -> None:
    """Flip bytes in the middle of a file, keeping its size (what a size check cannot see)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def test_item5_marker_records_sha256_of_every_file(checkpointed_run, tmp_path: Path) -> None:
    import hashlib

    folder = checkpointed_run[0] / "checkpoint-4"
    listed = json.loads((folder / CHECKPOINT_MARKER).read_text())["files"]
    on_disk = {p.name for p in folder.iterdir() if p.is_file() and p.name != CHECKPOINT_MARKER}
    assert set(listed) == on_disk and {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= on_disk
    for name, entry in listed.items():
        assert entry["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest(), name
        assert entry["size"] == (folder / name).stat().st_size


def test_item5_same_size_overwrite_is_refused(checkpointed_run, tmp_path: Path) -> None:
    out = _copy(checkpointed_run, tmp_path)
    newest = out / "checkpoint-4"
    _overwrite_same_size(newest / "adapter_model.safetensors")
    assert not checkpoint_is_complete(newest)
    # auto resume picks the newest *verified* checkpoint, and leaves the changed one for inspection.
    assert find_latest_checkpoint(out) == (out / "checkpoint-2", [newest])


def test_item5_explicit_resume_is_verified(checkpointed_run, tmp_path: Path) -> None:
    out = _copy(checkpointed_run, tmp_path)
    newest = out / "checkpoint-4"
    _overwrite_same_size(newest / "adapter_model.safetensors")
    cfg = tiny_config(Path("unused-model"), checkpointed_run[1], out, resume_from_checkpoint=str(newest))
    with pytest.raises(FinqloraError, match=r"adapter_model\.safetensors.*SHA-256") as caught:
        train(cfg, progress=False)  # refused before any model is loaded
    assert "checkpoint-4" in str(caught.value) and "auto" in caught.value.hint


def test_item5_explicit_resume_without_marker_is_refused(checkpointed_run, tmp_path: Path) -> None:
    out = _copy(checkpointed_run, tmp_path)
    (out / "checkpoint-4" / CHECKPOINT_MARKER).unlink()
    cfg = tiny_config(Path("unused-model"), checkpointed_run[1], out, resume_from_checkpoint=str(out / "checkpoint-4"))
    with pytest.raises(FinqloraError, match="no completion marker"):
        train(cfg, progress=False)


def test_item5_truncated_file_message(checkpointed_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(checkpointed_run, tmp_path)
    newest = out / "checkpoint-4"
    with open(newest / "optimizer.pt", "r+b") as handle:
        handle.truncate(100)
    cfg = tiny_config(Path("unused-model"), checkpointed_run[1], out, resume_from_checkpoint=str(newest))
    with pytest.raises(FinqloraError, match=r"file optimizer\.pt is truncated: 100 bytes") as caught:
        train(cfg, progress=False)
    assert "marker" not in str(caught.value)  # the marker is there; the file is short

    from finqlora.train.checkpoints import resolve_resume

    recorded = json.loads((out / "checkpoint-2" / CHECKPOINT_MARKER).read_text())["fingerprint"]
    chosen = resolve_resume(cfg.model_copy(update={"resume_from_checkpoint": "auto"}), out, recorded)
    assert chosen == out / "checkpoint-2"
    err = capsys.readouterr().err
    assert "optimizer.pt is truncated" in err and "no completion marker" not in err
    assert newest.is_dir()  # only a folder without a marker (an interrupted save) is removed


@pytest.mark.slow
def test_item5_auto_resume_skips_a_changed_checkpoint(checkpointed_run, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = _copy(checkpointed_run, tmp_path)
    _overwrite_same_size(out / "checkpoint-4" / "adapter_model.safetensors")
    cfg = tiny_config(tiny_model_dir, checkpointed_run[1], out, eval_steps=2, keep_checkpoints=3, load_best_at_end=False,
                      resume_from_checkpoint="auto")
    result = train(cfg, progress=False)
    assert result.status == "completed" and result.info["resumed_from"].endswith("checkpoint-2")
    assert all(l["loss"] == l["loss"] for l in result.info["train_losses"])  # no NaN from broken weights
    assert checkpoint_is_complete(out / "checkpoint-4")  # step 4 trained again and saved over the bad copy
