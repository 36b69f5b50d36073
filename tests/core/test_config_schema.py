"""One config from the command line to every stage: each key declared once with one default,
every stage's options derived from the schema, and every value checked when loaded."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

from finqlora.cli import app
from finqlora.cli.config_options import schema_default
from finqlora.core.config import SECTIONS, load_config
from finqlora.core.errors import FinqloraError
from finqlora.core.profiles import PROFILE_NAMES

REPO = Path(__file__).resolve().parents[2]
FINQLORA = [sys.executable, "-c", "from finqlora.cli import main; main()"]
KEY_IN_HELP = re.compile(r"\(config (\w+\.\w+)(?:, default ([^)]*))?\)")
STAGE_COMMANDS = ("build", "train", "eval", "serve")


def _command(name: str) -> click.Command:
    group = typer.main.get_command(app)
    return group.commands[name]


def _key_options(name: str) -> dict[str, tuple[click.Parameter, str, str]]:
    """Options of a stage command that are shorthands for a config key: option name -> (param, key, default shown)."""
    found = {}
    for param in _command(name).params:
        match = KEY_IN_HELP.search(getattr(param, "help", "") or "")
        if match:
            found[param.name] = (param, match.group(1), match.group(2))
    return found


@pytest.mark.parametrize("command", STAGE_COMMANDS)
def test_stage_options_derive_from_the_schema(command: str) -> None:
    """Every stage takes --config and --set; each flag naming a key has no default of its own and shows the schema's."""
    names = {p.name for p in _command(command).params}
    assert {"config", "set_"} <= names, f"finqlora {command} lacks --config/--set"
    options = _key_options(command)
    assert options, f"finqlora {command} has no key shorthands"
    for name, (param, key, shown) in options.items():
        section, field = key.split(".")
        assert field in SECTIONS[section].model_fields, f"{command} --{name}: {key} is not a schema key"
        assert param.default in (None, []), f"{command} --{name} declares its own default {param.default!r}"
        if shown is None:
            continue  # a list key (repeatable flag): the flags replace the config's list
        default = schema_default(key)
        expected = ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else "null" if default is None else str(default)
        assert shown == expected


def test_every_option_of_a_stage_is_a_key_or_not_in_the_schema() -> None:
    """A stage option named like a key of its section must be that key's shorthand (no second default)."""
    own = {"build": "data", "train": "train", "eval": "eval", "serve": "serve"}
    for command, section in own.items():
        shorthands = {key.split(".")[1] for _, key, _ in _key_options(command).values()}
        for param in _command(command).params:
            if param.name in SECTIONS[section].model_fields:
                assert param.name in shorthands, f"finqlora {command} --{param.name} duplicates {section}.{param.name}"


def test_each_key_is_declared_once_with_one_default() -> None:
    """The stages' own option objects agree with the schema wherever they hold the same setting."""
    from finqlora.dataset.build_config import BuildConfig
    from finqlora.dataset.labels import LabelRules
    from finqlora.evaluate.evaluation import EvalOptions
    from finqlora.models.generation import GenerationSettings
    from finqlora.serve.batching import BatchLimits, SamplingParams
    from finqlora.serve.http_limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES

    def defaults(cls: type) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    data, evaluation, serve = SECTIONS["data"].model_fields, SECTIONS["eval"].model_fields, SECTIONS["serve"].model_fields
    build = defaults(BuildConfig)
    for name in set(build) & set(data) - {"db", "tokenizer"}:  # these two hold resolved values (the store file, the tokenizer chosen)
        schema = data[name].get_default(call_default_factory=True)
        assert build[name] == (tuple(schema) if isinstance(schema, list) else schema), f"BuildConfig.{name}"
    rules = LabelRules()
    assert (rules.primary_window, rules.threshold_k) == (data["primary_window"].default, data["threshold_k"].default)
    assert build["dedup_threshold"] == data["dedup_threshold"].default and build["embargo_min"] == data["embargo_min"].default
    options = defaults(EvalOptions)
    for name in set(options) & set(evaluation) - {"max_samples"}:  # EvalOptions(max_samples=None) = all, for library callers
        assert options[name] == evaluation[name].default, f"EvalOptions.{name}"
    assert options["bootstrap_resamples"] == evaluation["bootstrap_resamples"].default
    # max_new_tokens: one value wherever a generation length is defaulted.
    one = evaluation["max_new_tokens"].default
    assert defaults(GenerationSettings)["max_new_tokens"] == defaults(SamplingParams)["max_new_tokens"] == one
    limits = defaults(BatchLimits)
    assert limits["default_max_new_tokens"] == serve["default_max_tokens"].default == one
    assert (limits["max_batch_size"], limits["max_queue"], limits["batch_window_ms"], limits["max_prompt_tokens"], limits["max_new_tokens"],
            limits["request_timeout_s"]) == tuple(serve[k].default for k in ("max_batch_size", "max_queue", "batch_window_ms",
                                                                           "max_prompt_tokens", "max_tokens", "request_timeout"))
    assert (DEFAULT_MAX_BODY_BYTES, DEFAULT_BODY_TIMEOUT_S) == (serve["max_body_bytes"].default, serve["body_timeout"].default)
    literal = re.compile(rf"max(_new)?_tokens.*[=(]\s*{one}\b")
    for path in (REPO / "src" / "finqlora").rglob("*.py"):
        if path.name != "config.py":
            hits = [line for line in path.read_text(encoding="utf-8").splitlines() if literal.search(line)]
            assert not hits, f"{path.name} declares a generation length default again: {hits}"


def test_build_takes_config_and_set(tmp_path: Path) -> None:
    """`finqlora build --config ... --set data.mix=...`: the file, then --set, then flags, in one config."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "data": {"num_samples": 20, "seed": 3, "templates_only": True, "tokenizer": "chars"}}))
    out = tmp_path / "d.jsonl"
    result = CliRunner().invoke(app, ["build", "--config", str(config), "--set", "data.mix=50,30,20", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rows = [yaml.safe_load(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 20 and rows[0]["id"].split("-")[1] == "3"
    stats = yaml.safe_load((tmp_path / "d.stats.json").read_text(encoding="utf-8"))
    assert stats["config"]["mix"] == [50.0, 30.0, 20.0]
    # --set without --config, and a flag winning over --set.
    again = CliRunner().invoke(app, ["build", "--templates-only", "--tokenizer", "chars", "--set", "data.num_samples=9", "-n", "7", "-o", str(out), "-q"])
    assert again.exit_code == 0, again.output
    assert len(out.read_text(encoding="utf-8").splitlines()) == 7


def test_bad_values_fail_at_load_with_the_key(tmp_path: Path) -> None:
    bad = CliRunner().invoke(app, ["build", "--mix", "60,40", "-o", str(tmp_path / "x.jsonl")])
    assert isinstance(bad.exception, FinqloraError) and "'data.mix': Value error, expects three numbers" in bad.exception.message
    with pytest.raises(FinqloraError, match="data.mix"):
        load_config(None, ["data.mix=60,40"])
    with pytest.raises(FinqloraError, match="the train share must be positive"):
        load_config(None, ["data.split=0,50,50"])
    with pytest.raises(FinqloraError) as caught:
        load_config(None, ["train.lr=1e-4"])
    assert "did you mean 'learning_rate'" in caught.value.message
    with pytest.raises(FinqloraError, match="train.max_length"):
        load_config(None, ["train.max_length=32"])  # one bound for training and the builder


def test_deprecated_names_keep_working(tmp_path: Path) -> None:
    with pytest.warns(FutureWarning, match="eval.max_prompts is deprecated: write eval.max_samples"):
        run = load_config(None, ["eval.max_prompts=7"])
    assert run.eval.max_samples == 7
    # --set of the old name overrides a file that already says max_samples (the notebook's case).
    config = tmp_path / "new_name.yaml"
    config.write_text("name: x\neval:\n  max_samples: 200\n", encoding="utf-8")
    with pytest.warns(FutureWarning, match="eval.max_prompts is deprecated"):
        assert load_config(config, ["eval.max_prompts=3"]).eval.max_samples == 3
    with pytest.warns(FutureWarning, match="max_items is deprecated"):
        run = load_config(None, ['eval.benchmarks=[{path: x.json, format: finfe, max_items: 5}]'])
    assert run.eval.benchmarks[0].limit == 5


def test_bad_profile_fails_at_load_before_any_stage(tmp_path: Path) -> None:
    """`finqlora run` with train.profile=t4compiled stops at once with the suggestion."""
    started = time.monotonic()
    done = subprocess.run([*FINQLORA, "run", "--config", str(REPO / "configs" / "demo-cpu.yaml"), "--set", "train.profile=t4compiled",
                           "--set", f"train.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    elapsed = time.monotonic() - started
    err = " ".join(done.stderr.split())
    assert done.returncode == 2 and "did you mean 't4-compiled'" in err, done.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()  # no stage ran
    assert elapsed < 30, f"took {elapsed:.1f} s"


def test_hints_name_only_what_exists(tmp_path: Path) -> None:
    """Outside the repository, a missing config points at `finqlora config init`, which writes a valid one."""
    missing = subprocess.run([*FINQLORA, "run", "--config", "configs/demo-cpu.yaml"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    err = " ".join(missing.stderr.split())
    assert missing.returncode == 2 and "config file not found: configs/demo-cpu.yaml" in err
    assert "finqlora config init FILE" in err and "e.g. configs/demo-cpu.yaml" not in err
    written = CliRunner().invoke(app, ["config", "init", str(tmp_path / "c.yaml")])
    assert written.exit_code == 0, written.output
    assert load_config(tmp_path / "c.yaml") == load_config(None)


def test_config_check_prints_the_resolved_config_and_its_problems(tmp_path: Path) -> None:
    good = CliRunner().invoke(app, ["config", "check", str(REPO / "configs" / "demo-cpu.yaml"), "--set", "data.mix=50,30,20"])
    assert good.exit_code == 0, good.output
    resolved = yaml.safe_load(good.stdout)
    assert resolved["data"]["mix"] == [50.0, 30.0, 20.0] and resolved["eval"]["max_samples"] == 74 and "serve" in resolved
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  profile: t4compiled\n  lr: 3\n  dataset: nowhere.jsonl\n", encoding="utf-8")
    checked = CliRunner().invoke(app, ["config", "check", str(bad)])
    assert checked.exit_code == 1
    assert "did you mean 't4-compiled'" in checked.output and "unknown key 'train.lr' (did you mean 'learning_rate'?)" in checked.output
    ok_values = tmp_path / "files.yaml"
    ok_values.write_text("name: x\ntrain:\n  dataset: nowhere.jsonl\n", encoding="utf-8")
    files = CliRunner().invoke(app, ["config", "check", str(ok_values)])
    assert files.exit_code == 1 and "train.dataset: nowhere.jsonl does not exist" in files.output


def test_an_empty_test_split_hints_the_key_that_run_reads(tmp_path: Path) -> None:
    """`finqlora run` has no --split option: the hint names eval.split (and the eval command's flag)."""
    from finqlora.evaluate.evaluation import load_test_records

    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "q", "output": "a", "split": "train"}\n', encoding="utf-8")
    with pytest.raises(FinqloraError, match="no records with split 'test'") as caught:
        load_test_records(data)
    assert "eval.split" in caught.value.hint and "finqlora eval --split" in caught.value.hint
