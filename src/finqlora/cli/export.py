"""`finqlora export merge|zip|unzip|gguf`: share a fine-tune (library: finqlora.export.adapter, finqlora.export.gguf)."""

from __future__ import annotations

from pathlib import Path

import typer

from finqlora.cli.console import make_console, styled
from finqlora.export.adapter import DEFAULT_MAX_RATIO, DEFAULT_MAX_UNPACKED_BYTES

console = make_console()


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def merge(
    model: str = typer.Option(..., "--model", "-m", help="Base model the adapter was trained on (hub id, folder, .gguf or builtin:NAME)."),
    adapter: Path = typer.Option(..., "--adapter", "-a", help="Adapter folder (finqlora train --output-dir) or qlora_weights.zip."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the merged model (safetensors shards + tokenizer)."),
    dtype: str = typer.Option("float16", "--dtype", help="Precision to load, merge and save in: float16, bfloat16 or float32."),
    device: str = typer.Option("cpu", "--device", help="Where to merge: cpu (needs RAM for the base in --dtype) or cuda."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest safetensors shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
    ignore_base_mismatch: bool = typer.Option(False, "--ignore-base-mismatch", help="Accept a base whose name differs from the one the adapter records (shapes are still checked)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
) -> None:
    """Merge a LoRA adapter into the FULL-PRECISION base weights (never into 4-bit weights)."""
    from finqlora.export.adapter import merge_adapter

    result = merge_adapter(
        model,
        adapter,
        output,
        dtype=dtype,
        device=device,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        ignore_base_mismatch=ignore_base_mismatch,
        trust_remote_code=trust_remote_code,
    )
    console.print(
        styled(("merged", "green"), f" {adapter} into {model} ({result.dtype}) -> {result.output_dir} "
               f"({len(result.shards)} shard(s), {_size(result.total_bytes)}, {result.seconds:.1f} s)")
    )
    console.print(f"next: finqlora export gguf --model {result.output_dir} --output {result.output_dir}-gguf/model-q8_0.gguf --outtype q8_0")


def zip_(
    run: Path = typer.Option(..., "--run", "-r", help="Training output folder (holds adapter_model.safetensors)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Zip to write (default: RUN/qlora_weights.zip)."),
) -> None:
    """Package an adapter as qlora_weights.zip with a usage README and SHA256SUMS."""
    from finqlora.export.adapter import package_adapter

    result = package_adapter(run, output)
    size = result.zip_path.stat().st_size
    console.print(styled(("wrote", "green"), f" {result.zip_path} ({len(result.files)} files + SHA256SUMS, {_size(size)})"))
    for name in result.missing_optional:
        console.print(styled(("note:", "yellow"), f" not in {run}: {name}"))


def unzip(
    zip_path: Path = typer.Argument(..., help="A qlora_weights.zip written by `finqlora export zip`."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Folder to extract into (default: beside the zip, named after it)."),
    check_only: bool = typer.Option(False, "--check", help="Only verify the SHA-256 sums; extract nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
    max_size_gb: float = typer.Option(DEFAULT_MAX_UNPACKED_BYTES / (1 << 30), "--max-size-gb", help="Refuse zips that unpack to more than this many GiB (counted while unpacking, too)."),
    max_ratio: float = typer.Option(DEFAULT_MAX_RATIO, "--max-ratio", help="Refuse zips that unpack to more than this many bytes per compressed byte (each entry over 1 MiB, and all entries against the zip's size)."),
) -> None:
    """Verify every file of an adapter zip against its SHA256SUMS, then extract it."""
    from finqlora.export.adapter import ZipLimits, unpack_adapter, verify_adapter_zip

    limits = ZipLimits(max_unpacked_bytes=int(max_size_gb * (1 << 30)), max_ratio=max_ratio)
    if check_only:
        files = verify_adapter_zip(zip_path, limits=limits)
        console.print(styled(("ok", "green"), f" {zip_path}: {len(files)} files match SHA256SUMS"))
        return
    target = output if output is not None else zip_path.with_suffix("")
    folder = unpack_adapter(zip_path, target, overwrite=overwrite, limits=limits)
    console.print(styled(("verified and extracted", "green"), f" {zip_path} -> {folder}"))


def gguf(
    model: Path = typer.Option(..., "--model", "-m", help="Merged model folder (finqlora export merge --output)."),
    output: Path = typer.Option(..., "--output", "-o", help="GGUF file to write; an Ollama Modelfile is written beside it."),
    outtype: str = typer.Option("f16", "--outtype", help="f16 (lossless for fp16 models), q8_0 (half the size) or f32."),
    pre_tokenizer: str | None = typer.Option(None, "--pre-tokenizer", help="llama.cpp pre-tokenizer name when it cannot be recognized (e.g. qwen2, llama-bpe)."),
    name: str | None = typer.Option(None, "--name", help="general.name stored in the file (default: the folder name)."),
) -> None:
    """Convert a merged llama/qwen2 model to GGUF for llama.cpp and Ollama."""
    from finqlora.export.gguf import export_gguf

    result = export_gguf(model, output, outtype=outtype, pre_tokenizer=pre_tokenizer, model_name=name)
    console.print(
        styled(("wrote", "green"), f" {result.gguf_path} ({result.architecture}, {result.outtype}, {result.tensor_count} tensors, "
               f"{_size(result.bytes_written)}, {result.seconds:.1f} s) and {result.modelfile_path}")
    )
    if not result.ollama_template:
        console.print(styled(("note:", "yellow"), " the chat template is not ChatML; the Modelfile relies on the template embedded in the GGUF"))
    console.print(f"try: llama-cli -m {result.gguf_path} -cnv   |   cd {result.gguf_path.parent} && ollama create finqlora -f Modelfile")


def register(app: typer.Typer) -> None:
    """Add `finqlora export ...` to the root app."""
    export_app = typer.Typer(
        help="Share a fine-tune: merge into the base, zip the adapter, export GGUF.",
        no_args_is_help=True,
    )
    export_app.command("merge")(merge)
    export_app.command("zip")(zip_)
    export_app.command("unzip")(unzip)
    export_app.command("gguf")(gguf)
    app.add_typer(export_app, name="export")
