"""Data-parallel training over several processes: the launcher and the rank helpers.

finqlora does not have its own multi-process engine. `finqlora train --gpus N` (alias
`--nproc N`) re-executes the same command under PyTorch's launcher,

    python -m torch.distributed.run --standalone --nproc_per_node N -m finqlora train ...

and transformers' Trainer (through accelerate) then runs DDP: one process per GPU, each with its
own copy of the (4-bit) base model and LoRA adapter, the LoRA gradients all-reduced after every
backward pass. `accelerate launch --num_processes N -m finqlora train ...` and
`torchrun --nproc_per_node N -m finqlora train ...` work the same way, because everything here
reads the environment variables both launchers set (RANK, LOCAL_RANK, WORLD_SIZE).

Without CUDA the processes talk over the gloo backend on the CPU; that is how the test suite
checks that 2 processes x batch b train exactly like 1 process x batch 2b.

Placement: with `--gpus N` every process must put its whole base model on its own GPU, so a
4-bit base is loaded with `device_map={"": local_rank()}` (see `process_device`). With
`device_map="auto"` every process would spread its copy over all GPUs: model parallelism, with
all processes competing for the same GPUs, not data parallelism.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from finqlora.core.errors import FinqloraError

# The CLI options that ask for a launch; they are removed from the command the workers run.
LAUNCH_OPTIONS = ("--gpus", "--nproc")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


def world_size() -> int:
    """Number of processes in the run (1 without a launcher)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """Global rank of this process (0 without a launcher)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    """Rank of this process on its machine = the index of the GPU it owns (0 without a launcher)."""
    return _env_int("LOCAL_RANK", 0)


def is_distributed() -> bool:
    """True inside a worker started by torchrun / accelerate launch with more than one process."""
    return world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, the only process that writes logs, checkpoints' markers and outputs."""
    return rank() == 0


def process_device(device: str) -> str:
    """The device this process trains on: 'cuda' becomes 'cuda:<local rank>' under a launcher.

    `finqlora.models.loading.load_model` turns this into `device_map={"": device}`, i.e. the whole base
    model (4-bit or not) on this process's own GPU.
    """
    if device == "cuda" and is_distributed():
        return f"cuda:{local_rank()}"
    return device


def barrier() -> None:
    """Wait for every process (no-op in a single-process run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every process when `flag` is true on at least one of them.

    Used to agree on stopping after a signal: a signal can arrive between two processes'
    checks, and a process that stops while the other starts the next step would hang the
    next gradient all-reduce.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    device = f"cuda:{local_rank()}" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def strip_launch_options(argv: Sequence[str]) -> list[str]:
    """`argv` without `--gpus N` / `--gpus=N` (and the aliases): what each worker runs."""
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
            continue
        if arg in LAUNCH_OPTIONS:
            skip_value = True
            continue
        if any(arg.startswith(option + "=") for option in LAUNCH_OPTIONS):
            continue
        kept.append(arg)
    return kept


def torchrun_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The command that runs `python -m finqlora <argv>` in `nproc` processes on this machine.

    `--standalone` lets torchrun pick a free local port, so two runs on one machine do not clash.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "finqlora",
        *strip_launch_options(argv),
    ]


def check_process_count(nproc: int, device: str = "auto") -> None:
    """Refuse a process count this machine cannot run, with what to do instead."""
    import torch

    if nproc < 1:
        raise FinqloraError(f"--gpus must be 1 or more (got {nproc})")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if nproc > visible:
            raise FinqloraError(
                f"--gpus {nproc} asked for {nproc} processes, one per GPU, but {visible} GPU(s) are visible",
                hint=f"use --gpus {visible} or fewer (CUDA_VISIBLE_DEVICES limits which GPUs are visible)",
            )
    elif device == "cuda":
        raise FinqloraError("train.device is 'cuda' but no CUDA GPU is visible", hint="use device: auto or cpu")
    elif nproc > (os.cpu_count() or 1):
        raise FinqloraError(
            f"--nproc {nproc} CPU processes on {os.cpu_count()} logical cores would only compete for them",
            hint="on the CPU, multi-process training is for testing the distributed setup; use --nproc 2",
        )


def relaunch(argv: Sequence[str], nproc: int) -> None:
    """Replace this process with torchrun running the same finqlora command in `nproc` processes.

    The process is replaced (exec), not wrapped, so Ctrl-C and SIGTERM reach torchrun directly;
    torchrun forwards them to the workers, which save a checkpoint and stop together.
    """
    command = torchrun_command(argv, nproc)
    print("launching: " + " ".join(_quote(part) for part in command), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(command[0], command)


def _quote(part: str) -> str:
    import shlex

    return shlex.quote(part)
