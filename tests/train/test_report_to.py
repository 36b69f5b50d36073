"""train.report_to: the resolved trackers reach the Trainer, and TensorBoard really gets the losses."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from finqlora.core.config import TrainConfig
from finqlora.core.errors import FinqloraError
from finqlora.train.setup import report_targets


def _dataset(path: Path) -> Path:
    rows = [
        {"id": f"r{i}", "type": "news_impact", "instruction": "判断这条新闻对相关资产的影响方向。",
         "input": f"第{i}条快讯：公司公告季度业绩。", "output": ("利好", "利空", "中性")[i % 3],
         "split": "train" if i < 8 else "val" if i < 10 else "test"}
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_auto_is_tensorboard_exactly_when_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.integrations as integrations

    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: True)
    assert report_targets("auto") == ["tensorboard"]
    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: False)
    assert report_targets("auto") == []
    assert report_targets("none") == []
    with pytest.raises(FinqloraError, match="tensorboard package is not installed"):
        report_targets("tensorboard")


def test_a_named_tracker_that_is_not_installed_is_refused_before_training() -> None:
    pytest.importorskip("tensorboard")
    if importlib.util.find_spec("swanlab") is not None:
        pytest.skip("swanlab is installed here: nothing to refuse")
    assert report_targets(["tensorboard"]) == ["tensorboard"]
    with pytest.raises(FinqloraError) as caught:
        report_targets(["tensorboard", "swanlab"])
    assert "swanlab" in caught.value.message and "pip install swanlab" in caught.value.hint


def test_config_refuses_an_unknown_tracker() -> None:
    with pytest.raises(Exception, match="report_to"):
        TrainConfig(report_to="mlflow")


@pytest.mark.slow
def test_tensorboard_gets_every_logged_loss(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One real run: TensorBoard's events, a line per step on a pipe, and loss.png drawn before training ends."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import TrainerCallback

    from finqlora.train.training import train

    out = tmp_path / "out"
    plot_seen_at_step: list[int] = []

    class LookForThePlot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if (out / "loss.png").exists():
                plot_seen_at_step.append(state.global_step)

    cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(_dataset(tmp_path / "d.jsonl")), output_dir=str(out),
                      device="cpu", batch_size=2, max_length=96, max_steps=3, learning_rate=2e-3, report_to="tensorboard")
    train(cfg, callbacks=[LookForThePlot()], progress=True)  # stdout is captured: not an interactive terminal
    printed = capsys.readouterr().out
    assert all(f"step {s}/3  loss " in printed for s in (1, 2, 3)), printed[-2000:]
    assert plot_seen_at_step[:1] == [2], "loss.png must exist after the first logged step, while training runs"
    events = sorted((out / "runs").rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {out / 'runs'}"
    logged = [json.loads(line) for line in (out / "training_log.jsonl").read_text(encoding="utf-8").splitlines()]
    expected = {row["step"]: row["loss"] for row in logged if "loss" in row}
    seen: dict[int, float] = {}
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            seen.update({e.step: e.value for e in accumulator.Scalars("train/loss")})
    assert sorted(seen) == sorted(expected) == [1, 2, 3]
    assert all(abs(seen[s] - expected[s]) < 1e-4 * max(1.0, abs(expected[s])) for s in expected)
    info = json.loads((out / "training_info.json").read_text(encoding="utf-8"))
    assert info["hyperparameters"]["report_to"] == "tensorboard"
