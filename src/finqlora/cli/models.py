"""CLI of the models area: `finqlora ask`, `chat`, `generate` and the `finqlora models` group."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Column
from rich.table import Table

from finqlora.cli.console import make_console, styled
from finqlora.core.config import MAX_NEW_TOKENS
from finqlora.core.errors import FinqloraError

console = make_console()
err_console = make_console(stderr=True)

ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        help="Hub id, local folder, .gguf file, or builtin:qwen2.5-coder-0.5b-instruct / builtin:smollm2-135m-instruct. "
        "Default: the adapter's base, else deepseek-ai/deepseek-llm-7b-chat.",
    ),
]
AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", "-a", help="LoRA adapter folder (the --output-dir of `finqlora train`).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (CPU float32; GPU bf16, else fp16), float32, bfloat16, float16.")]
FourBitOpt = Annotated[
    Optional[bool], typer.Option("--load-in-4bit/--no-load-in-4bit", help="4-bit NF4 (default: on with CUDA, off on the CPU).")
]
RemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the model's own Python code (off: only trusted transformers code runs).")]
TemplateOpt = Annotated[
    Optional[str], typer.Option(help="Fallback chat template for models without one: 'chatml' or a Jinja string.")
]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle-adapter", help="Allow a pickle adapter_model.bin (can run code; only for adapters you trust).")]
MismatchOpt = Annotated[
    bool, typer.Option("--ignore-base-mismatch", help="Load an adapter whose recorded base name differs (shapes are still checked).")
]
MaxTokensOpt = Annotated[int, typer.Option(help="Most tokens per answer.")]
TemperatureOpt = Annotated[float, typer.Option(help="0 = greedy (reproducible); > 0 samples.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling (with --temperature > 0).")]
RepetitionOpt = Annotated[float, typer.Option(help="> 1 discourages repeats; 1 = off.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed for sampling.")]


def _settings(max_new_tokens: int, temperature: float, top_p: float, repetition_penalty: float, seed: int):
    from finqlora.models.generation import GenerationSettings

    return GenerationSettings(max_new_tokens, temperature, top_p, repetition_penalty, seed)


def load_from_options(model, adapter, device, dtype, load_in_4bit, trust_remote_code, chat_template, allow_pickle_adapter, ignore_base_mismatch):
    from finqlora.models.loading import DEFAULT_BASE_MODEL, adapter_base_model, check_adapter_folder, load_model

    if model is None:
        if adapter is not None:
            check_adapter_folder(adapter, allow_pickle_adapter)
        model = (adapter_base_model(adapter) if adapter is not None else None) or DEFAULT_BASE_MODEL
    started = time.perf_counter()
    with err_console.status(f"loading {model}" + (f" + {adapter}" if adapter else "") + " ..."):
        loaded = load_model(
            model,
            adapter=adapter,
            device=device,
            dtype=dtype,
            load_in_4bit=load_in_4bit,
            trust_remote_code=trust_remote_code,
            chat_template=chat_template,
            allow_pickle_adapter=allow_pickle_adapter,
            ignore_base_mismatch=ignore_base_mismatch,
        )
    quant = ", 4-bit NF4" if loaded.load_in_4bit else ""
    err_console.print(
        styled((
            f"loaded {loaded.resolved.base_id} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')}{quant})"
            + (f" with adapter {loaded.adapter}" if loaded.adapter else "")
            + f" in {time.perf_counter() - started:.1f}s",
            "dim",
        ))
    )
    return loaded


def ask(
    prompts: Annotated[list[str], typer.Argument(help="Text(s) to answer, e.g. 美联储宣布加息25个基点.")],
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    instruction: Annotated[Optional[str], typer.Option(help="Instruction placed before the text (as in the dataset's instruction/input).")] = None,
    system: Annotated[Optional[str], typer.Option(help="System message.")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Show the base model's and the fine-tuned answers side by side (needs --adapter).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per prompt.")] = False,
    max_new_tokens: MaxTokensOpt = MAX_NEW_TOKENS,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    repetition_penalty: RepetitionOpt = 1.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    load_in_4bit: FourBitOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    chat_template: TemplateOpt = None,
    allow_pickle_adapter: PickleOpt = False,
    ignore_base_mismatch: MismatchOpt = False,
) -> None:
    """Answer one or more prompts (optionally base vs fine-tuned with --compare)."""
    from finqlora.models.generation import ask_prompts

    if compare and adapter is None:
        raise FinqloraError("--compare needs --adapter (it compares the base model with the fine-tuned one)")
    settings = _settings(max_new_tokens, temperature, top_p, repetition_penalty, seed)
    loaded = load_from_options(model, adapter, device, dtype, load_in_4bit, trust_remote_code, chat_template, allow_pickle_adapter, ignore_base_mismatch)
    answers = ask_prompts(loaded, prompts, settings, instruction=instruction, system=system, compare=compare)
    print_answers(answers, as_json=as_json)


def print_answers(answers: list[dict], *, as_json: bool = False) -> None:
    from rich.columns import Columns
    from rich.panel import Panel

    for item in answers:
        if as_json:
            console.print_json(json.dumps(item, ensure_ascii=False))
            continue
        console.rule(styled((item["prompt"], "bold")), align="left")
        if "base" in item:
            console.print(
                Columns(
                    [
                        Panel(item["base"], title="base", border_style="yellow"),
                        Panel(item["finetuned"], title="fine-tuned", border_style="green"),
                    ],
                    equal=True,
                    expand=True,
                )
            )
        else:
            console.print(item["answer"], highlight=False, markup=False)


def chat(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    system: Annotated[Optional[str], typer.Option(help="System message for the whole conversation.")] = None,
    max_new_tokens: MaxTokensOpt = MAX_NEW_TOKENS,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    repetition_penalty: RepetitionOpt = 1.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    load_in_4bit: FourBitOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    chat_template: TemplateOpt = None,
    allow_pickle_adapter: PickleOpt = False,
    ignore_base_mismatch: MismatchOpt = False,
) -> None:
    """Interactive multi-turn chat with streaming answers (/reset clears the history, /exit quits)."""
    from finqlora.models.generation import stream_answer, trim_history

    settings = _settings(max_new_tokens, temperature, top_p, repetition_penalty, seed)
    loaded = load_from_options(model, adapter, device, dtype, load_in_4bit, trust_remote_code, chat_template, allow_pickle_adapter, ignore_base_mismatch)
    err_console.print(styled(("type a message; /reset starts over, /exit (or Ctrl-D) quits", "dim")))
    history: list[dict[str, str]] = []
    while True:
        try:
            text = console.input(styled(("you>", "bold cyan"), " ")).strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not text:
            continue
        if text in {"/exit", "/quit"}:
            return
        if text == "/reset":
            history.clear()
            err_console.print(styled(("history cleared", "dim")))
            continue
        if text.startswith("/"):
            err_console.print(styled(("commands: /reset, /exit", "yellow")))
            continue
        history.append({"role": "user", "content": text})
        prefix = [{"role": "system", "content": system}] if system else []
        history, dropped = trim_history(loaded.model, loaded.tokenizer, prefix, history, settings.max_new_tokens)
        if dropped:
            err_console.print(styled((f"({dropped} oldest messages dropped to fit the context window)", "dim")))
        console.print(styled(("model>", "bold green"), " "), end="")
        pieces: list[str] = []
        try:
            for piece in stream_answer(loaded.model, loaded.tokenizer, prefix + history, settings):
                pieces.append(piece)
                console.print(piece, end="", highlight=False, markup=False)
        except KeyboardInterrupt:
            err_console.print(styled("\n", ("(interrupted)", "dim")))
        console.print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


def generate(
    input_path: Annotated[Path, typer.Option("--input", "-i", help="JSONL: dataset records (instruction/input or messages) or {\"prompt\": ...}.")],
    output_path: Annotated[Path, typer.Option("--output", "-o", help="JSONL answers; re-running resumes where it stopped.")],
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass (left-padded).")] = 8,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over instead of resuming.")] = False,
    max_new_tokens: MaxTokensOpt = MAX_NEW_TOKENS,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    repetition_penalty: RepetitionOpt = 1.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    load_in_4bit: FourBitOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    chat_template: TemplateOpt = None,
    allow_pickle_adapter: PickleOpt = False,
    ignore_base_mismatch: MismatchOpt = False,
) -> None:
    """Answer every prompt of a JSONL file (batched, progress bar, resumable)."""
    from finqlora.models.generation import generate_file, read_prompts

    settings = _settings(max_new_tokens, temperature, top_p, repetition_penalty, seed)
    read_prompts(input_path)  # fail on a bad input line before the slow model load
    loaded = load_from_options(model, adapter, device, dtype, load_in_4bit, trust_remote_code, chat_template, allow_pickle_adapter, ignore_base_mismatch)
    result = generate_file(
        loaded.model,
        loaded.tokenizer,
        input_path,
        output_path,
        settings,
        run_info={"model": loaded.resolved.base_id, "adapter": str(loaded.adapter) if loaded.adapter else None},
        batch_size=batch_size,
        overwrite=overwrite,
    )
    speed = f", {result.new_tokens / result.seconds:.1f} tokens/s" if result.seconds > 0 and result.written else ""
    console.print(
        f"{output_path}: {result.written} answered, {result.skipped} already done (of {result.total}){speed}",
        highlight=False,
        soft_wrap=True,
    )


models_app = typer.Typer(help="Built-in offline models and model facts.", no_args_is_help=True)


@models_app.command("list")
def list_models() -> None:
    """List the built-in models: installed? converted? where?"""
    from finqlora.models.builtin import BUILTINS, builtin_status

    # The model id is what users copy into --model: never wrapped, whatever the terminal width.
    table = Table(Column("model", no_wrap=True), "language", "package", "converted", "cache folder")
    for builtin in BUILTINS.values():
        status = builtin_status(builtin)
        table.add_row(
            builtin.spec,
            builtin.language,
            styled(("installed", "green")) if status.installed else styled(("missing", "red")),
            styled(("yes", "green")) if status.prepared else "no",
            str(status.cache_dir),
        )
    console.print(table)
    for builtin in BUILTINS.values():
        if not builtin_status(builtin).installed:
            console.print(styled(f"install {builtin.spec}: ", (f"finqlora models install {builtin.name}", "bold"), f" (runs {builtin.pip_command()})"), highlight=False)


@models_app.command("install")
def install(
    name: Annotated[str, typer.Argument(help="Built-in name, e.g. qwen2.5-coder-0.5b-instruct.")],
    prepare: Annotated[bool, typer.Option(help="Also verify and convert it now.")] = True,
) -> None:
    """pip-install a built-in model's packages, then verify and convert it."""
    from finqlora.models.builtin import get_builtin, prepare_builtin

    builtin = get_builtin(name)
    command = builtin.pip_command()
    console.print(f"$ {command}", highlight=False)
    if subprocess.run(builtin.pip_arguments(), check=False).returncode != 0:
        raise FinqloraError(f"pip could not install the packages of {builtin.spec}", hint=f"run it yourself: {command}")
    if prepare:
        console.print(f"{builtin.spec} ready in {prepare_builtin(builtin)}", highlight=False)


@models_app.command("prepare")
def prepare(
    name: Annotated[str, typer.Argument(help="Built-in name, e.g. qwen2.5-coder-0.5b-instruct.")],
    force: Annotated[bool, typer.Option("--force", help="Convert again even if the cache looks complete.")] = False,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Also cast a copy for half-precision loads: bfloat16 | float16 | auto (bfloat16 on CPUs with native bf16, as the cpu profile loads).")] = None,
) -> None:
    """Verify (sha256) and convert a built-in model into the safetensors cache."""
    from finqlora.core.hardware import cpu_has_fast_bf16
    from finqlora.models.builtin import CAST_DTYPES, cast_folder, get_builtin, prepare_builtin

    builtin = get_builtin(name)
    folder = prepare_builtin(builtin, force=force)
    console.print(f"{builtin.spec} ready in {folder}", highlight=False)
    cast = "bfloat16" if dtype == "auto" and cpu_has_fast_bf16() else None if dtype == "auto" else dtype
    if cast is not None:
        if cast not in CAST_DTYPES:
            raise FinqloraError(f"--dtype {cast}: not a half-precision type", hint=f"use one of {', '.join(CAST_DTYPES)} or auto")
        console.print(f"{builtin.spec} as {cast} in {cast_folder(folder, cast)}", highlight=False)


@models_app.command("verify")
def verify(name: Annotated[str, typer.Argument(help="Built-in name.")]) -> None:
    """Re-check the sha256 of a built-in model's package files."""
    from finqlora.models.builtin import get_builtin, verify_builtin

    builtin = get_builtin(name)
    verify_builtin(builtin)
    console.print(f"{builtin.spec}: sha256 OK ({builtin.sha256})", highlight=False, soft_wrap=True)


@models_app.command("info")
def info(
    model: Annotated[str, typer.Argument(help="Hub id, folder, .gguf file or builtin:NAME.")],
    chat_template: TemplateOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Where a model resolves to, its architecture and size, and its chat/stop tokens."""
    from finqlora.core.chat_format import assistant_turn_suffix, stop_token_ids
    from finqlora.models.loading import describe_model, load_tokenizer, resolve_model

    resolved = resolve_model(model, trust_remote_code=trust_remote_code)
    facts = describe_model(resolved)
    tokenizer = load_tokenizer(resolved, chat_template=chat_template, trust_remote_code=trust_remote_code)
    facts["eos_token"] = tokenizer.eos_token
    facts["end_of_turn"] = assistant_turn_suffix(tokenizer)
    facts["stop_token_ids"] = stop_token_ids(tokenizer)
    # Hashes and paths are copied from here: wrap them, never cut them short with an ellipsis.
    table = Table("field", Column("value", overflow="fold"), show_header=False)
    for key, value in facts.items():
        table.add_row(key, str(value))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("ask")(ask)
    app.command("chat")(chat)
    app.command("generate")(generate)
    app.add_typer(models_app, name="models")
