"""`finqlora train`: fine-tune a base model with LoRA/QLoRA from a run config."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from finqlora.cli.console import make_console, styled
from finqlora.cli.config_options import CONFIG_OPTION, SET_OPTION, key_option, resolve
from finqlora.core.errors import FinqloraError


def _summary(result, console: Console) -> None:
    info = result.info
    table = Table(title=f"finqlora train: {info['name']} ({result.status})", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    losses = info["train_losses"]
    table.add_row("steps", f"{result.global_step} / {info['max_steps']} ({info['epochs_completed']} epochs)")
    if losses:
        table.add_row("train loss", f"{losses[0]['loss']:.4f} (first step) -> {losses[-1]['loss']:.4f} (last step)")
    vals = info["val_losses"]
    if vals:
        table.add_row("val loss", " -> ".join(f"{v['loss']:.4f}@{v['step']}" for v in vals[-6:]))
    if result.best_step is not None:
        table.add_row("best", f"step {result.best_step}, val loss {result.best_val_loss:.4f} ({info['adapter_is']})")
    table.add_row("time", f"{info['timing']['train_seconds']:.0f} s training, {info['timing']['load_and_tokenize_seconds']:.0f} s loading")
    tps = info["throughput"]["tokens_per_second"]
    table.add_row("throughput", f"{tps:,.0f} tokens/s" if tps else "-")
    table.add_row("peak memory", ", ".join(f"{k.replace('_gib', '')} {v:.2f} GiB" for k, v in info["memory"].items()))
    sizing = info.get("memory_sized_checkpointing")
    if sizing and sizing["micro_batches_by_layers_kept"]:
        counts = ", ".join(f"{k} in {n}" for k, n in sizing["micro_batches_by_layers_kept"].items())
        table.add_row("layers not recomputed", f"{counts} micro-batches (of {sizing['decoder_layers']} layers)")
    table.add_row("device", info["device"])
    table.add_row("output", str(result.output_dir))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""

    @app.command("train")
    def train_command(
        config: Path | None = CONFIG_OPTION,
        set_: list[str] = SET_OPTION,
        data: str | None = key_option("train.dataset", "--data", help="Dataset: JSONL or JSON array (alpaca, sharegpt or messages records), or DIR/dataset_info.json:NAME (LLaMA-Factory)."),
        model: str | None = key_option("train.model", "--model", help="Base model: builtin:NAME, local folder, .gguf file or hub id."),
        output_dir: str | None = key_option("train.output_dir", "--output-dir", "--output_dir", help="Output folder (null = runs/<name>)."),
        resume_from_checkpoint: str | None = key_option(
            "train.resume_from_checkpoint", "--resume_from_checkpoint", "--resume-from-checkpoint", "--resume",
            help="'auto' = newest verified checkpoint in the output folder, or a checkpoint-N folder (verified too).",
        ),
        batch_size: int | None = key_option("train.batch_size", "--batch_size", "--batch-size", help="Per-device batch size."),
        max_length: int | None = key_option("train.max_length", "--max_length", "--max-length", help="Tokens per sample."),
        profile: str | None = key_option("train.profile", "--profile", help="Speed profile (default, t4, fast, cpu, ...)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
        gpus: int | None = typer.Option(
            None, "--gpus", "--nproc",
            help="Data-parallel processes, one per GPU (gloo on the CPU): re-runs this command under torchrun. See docs/multi-gpu.md.",
        ),
    ) -> None:
        """Fine-tune with LoRA (CPU) or QLoRA (CUDA): adapter, training_info.json, training_log.jsonl, loss.png.

        Ctrl-C or SIGTERM stops within the step, checkpoints the last complete step and exits;
        continue with --resume_from_checkpoint auto (checkpoints are verified by SHA-256 first).
        """
        # Dedicated flags are shorthands for keys: typed values that win over the file and --set.
        run = resolve(config, set_, {
            "train.dataset": data, "train.model": model, "train.output_dir": output_dir,
            "train.resume_from_checkpoint": resume_from_checkpoint, "train.batch_size": batch_size,
            "train.max_length": max_length, "train.profile": profile,
        })
        if run.train.dataset is None:
            raise FinqloraError(
                "no training data given",
                hint="pass --data data/qlora/instructions.jsonl (build one with `finqlora build`) or set train.dataset",
            )
        from finqlora.train import distributed
        from finqlora.train.training import train  # after the config is checked: a bad key fails in a second

        if gpus is not None and gpus > 1 and not distributed.is_distributed():
            distributed.check_process_count(gpus, run.train.device)
            distributed.relaunch(sys.argv[1:], gpus)  # does not return
        console = make_console(stderr=True)
        try:
            result = train(run, progress=progress)
        except KeyboardInterrupt:
            # A second Ctrl-C: stopped at once; the last complete checkpoint is still usable.
            console.print(styled(("stopped without saving;", "yellow"), " resume from the last checkpoint with --resume_from_checkpoint auto"))
            raise typer.Exit(130) from None
        if not distributed.is_main_process():
            return  # rank 0 reports for the group
        _summary(result, console)
        if result.status == "interrupted":
            signum = signal.Signals[result.info["interrupted_by"]]
            if result.info.get("interrupted_checkpoint") is None:
                console.print(styled((f"interrupted by {signum.name} before the first step ended: nothing to resume", "yellow")))
            else:
                console.print(
                    styled(
                        (f"interrupted by {signum.name}; the last complete step ({result.global_step}) is checkpointed. Continue with:", "yellow"),
                        f" finqlora train {'--config ' + str(config) + ' ' if config else ''}"
                        f"--output-dir {result.output_dir} --resume_from_checkpoint auto ...",
                    ),
                    highlight=False,
                )
            if not distributed.is_distributed():
                # Every output is written (atomically) by now. Python's teardown of torch and the
                # model took 18-31 s on a busy CPU, past a container's 10-30 s kill window: skip it.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(128 + int(signum))
            raise typer.Exit(128 + int(signum))
        console.print(
            styled(("done.", "green"), f" Try it: finqlora ask --model {run.train.model} --adapter {result.output_dir} \"美联储宣布加息25个基点\""),
            highlight=False,
        )

