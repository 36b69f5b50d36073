"""Sharing a fine-tune: merge an adapter into its base, or package it as a verified zip.

- `merge_adapter`: loads the base model UNQUANTIZED (fp16/bf16/fp32), applies the LoRA adapter
  and folds it into the weights (peft `merge_and_unload`), then writes safetensors shards with
  the tokenizer and chat template the adapter was trained with. Merging into weights that were
  dequantized from 4-bit would bake the 4-bit rounding error into the published model, so the
  base is always reloaded in full precision here, whatever training used.
- `package_adapter` -> `qlora_weights.zip`: the adapter, its config, training_info.json,
  loss.png, tokenizer files, a usage README and `SHA256SUMS` (the `sha256sum -c` format).
- `verify_adapter_zip`, `unpack_adapter` and `adapter_from_zip`: check every file against
  `SHA256SUMS` before anything is used; `adapter_from_zip` extracts once into the cache so a
  zip can be passed wherever an adapter folder is expected (`resolve_adapter_path`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from finqlora import __version__
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json, sha256_file, umask_mode
from finqlora.core.paths import cache_dir

ZIP_NAME = "qlora_weights.zip"
CHECKSUMS_NAME = "SHA256SUMS"
MERGE_INFO_NAME = "finqlora_merge.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Files of a training output folder that go into the zip (when present), besides tokenizer files.
RUN_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "training_info.json", "loss.png", "training_log.jsonl", "run_config.yaml")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)
MERGE_DTYPES = ("float16", "bfloat16", "float32")
_EXTRACTED_MARKER = ".finqlora_verified"


# --------------------------------------------------------------------------------------------
# Adapter folders
# --------------------------------------------------------------------------------------------


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's `adapter_config.json`, with errors that say what is wrong with the folder."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FinqloraError(
            f"adapter folder {adapter_dir} does not exist",
            hint="pass the --output-dir of `finqlora train` (it holds adapter_model.safetensors), or a qlora_weights.zip",
        )
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FinqloraError(
            f"{adapter_dir} has no {ADAPTER_CONFIG}, so it is not a LoRA adapter folder",
            hint="pass the --output-dir of `finqlora train`, or one of its checkpoint-N folders",
        )
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        pickled = (adapter_dir / "adapter_model.bin").is_file()
        raise FinqloraError(
            f"{adapter_dir} has no {ADAPTER_WEIGHTS}"
            + (" (only adapter_model.bin, a pickle file that finqlora does not load)" if pickled else ""),
            hint="finqlora loads adapters from safetensors only; re-save the adapter with "
            "model.save_pretrained(dir, safe_serialization=True)",
        )
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FinqloraError(
            f"{config_path} is not valid JSON ({exc.msg} at line {exc.lineno})",
            hint="restore the file from the training output folder or the zip",
        ) from None


def resolve_adapter_path(adapter: str | os.PathLike[str]) -> Path:
    """An adapter folder, or a qlora_weights.zip (verified and extracted into the cache)."""
    path = Path(adapter).expanduser()
    if path.suffix.lower() == ".zip":
        return adapter_from_zip(path)
    return path


# --------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeResult:
    output_dir: Path
    dtype: str
    shards: list[str]
    total_bytes: int
    seconds: float


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() and any(
        (folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )


def usual_permissions(path: Path) -> None:
    """Give a finished output the permissions of a normally created file/folder (umask).

    Temporary files and folders are created private (0600/0700); what we publish should be
    as readable as anything else the user writes, e.g. for a model server running as another user.
    """
    umask = os.umask(0)
    os.umask(umask)
    targets = [path, *path.rglob("*")] if path.is_dir() else [path]
    for target in targets:
        target.chmod((0o777 if target.is_dir() else 0o666) & ~umask)


def _replace_dir(staging: Path, final: Path) -> None:
    """Put a finished staging folder in place of `final` (the old one is removed last)."""
    usual_permissions(staging)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise FinqloraError(
            f"output folder {output_dir} already exists and is not empty",
            hint="choose another --output folder, or pass --overwrite to replace it",
        )


def merge_adapter(
    base: str,
    adapter: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    dtype: str = "float16",
    device: str = "cpu",
    max_shard_size: str = "2GB",
    overwrite: bool = False,
    ignore_base_mismatch: bool = False,
    trust_remote_code: bool = False,
) -> MergeResult:
    """Merge `adapter` into the full-precision weights of `base` and save a standalone model.

    `dtype` is the precision the base is loaded, merged and saved in (float16 by default: the
    size people expect to download; bfloat16 for models trained in bf16; float32 to check).
    The merge runs on the CPU by default, so it needs RAM for one copy of the base in `dtype`
    (about 14 GB for a 7B model in fp16) but no GPU memory. An adapter trained for another
    base is refused (finqlora.models.loading.check_adapter_matches_base: recorded name, then shapes).
    """
    from finqlora.models.loading import load_model

    if dtype not in MERGE_DTYPES:
        raise FinqloraError(f"unknown --dtype {dtype!r}", hint=f"use one of: {', '.join(MERGE_DTYPES)}")
    started = time.perf_counter()
    adapter_dir = resolve_adapter_path(adapter)
    read_adapter_config(adapter_dir)
    output_dir = Path(output_dir).expanduser()
    _check_output_dir(output_dir, overwrite)

    # load_in_4bit=False: the base is loaded unquantized whatever training used (see module doc).
    loaded = load_model(
        base,
        adapter=adapter_dir,
        device=device,
        dtype=dtype,
        load_in_4bit=False,
        ignore_base_mismatch=ignore_base_mismatch,
        trust_remote_code=trust_remote_code,
    )
    quantized = sorted({type(m).__name__ for m in loaded.model.modules() if "4bit" in type(m).__name__ or "8bit" in type(m).__name__})
    if quantized:
        raise FinqloraError(
            f"{base} was loaded with quantized layers ({', '.join(quantized)}); merging into them would "
            "bake the quantization error into the model",
            hint="merge into a full-precision base: pass the original (unquantized) model, not a 4-bit checkpoint",
        )
    # safe_merge checks the merged weights for NaN/inf before replacing the originals.
    merged = loaded.model.merge_and_unload(safe_merge=True, progressbar=True)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        merged.save_pretrained(str(staging), max_shard_size=max_shard_size)
        # load_model took the tokenizer (and chat template) from the adapter folder when it has one.
        loaded.tokenizer.save_pretrained(str(staging))
        shards = sorted(p.name for p in staging.glob("*.safetensors"))
        atomic_write_json(
            staging / MERGE_INFO_NAME,
            {
                "base_model": loaded.resolved.base_id,
                "adapter": str(adapter_dir.resolve()),
                "adapter_sha256": sha256_file(adapter_dir / ADAPTER_WEIGHTS),
                "dtype": dtype,
                "merged_in_full_precision": True,
                "shards": shards,
                "finqlora_version": __version__,
                "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        total = sum(p.stat().st_size for p in staging.iterdir() if p.is_file())
        _replace_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return MergeResult(output_dir, dtype, shards, total, time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# Zip package
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageResult:
    zip_path: Path
    files: dict[str, str]  # name -> sha256
    missing_optional: list[str]


def _usage_readme(config: dict[str, Any], files: list[str]) -> str:
    base = config.get("base_model_name_or_path") or "<the base model you trained on>"
    targets = config.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
    return f"""# finqlora QLoRA adapter

A LoRA adapter (r={config.get("r")}, alpha={config.get("lora_alpha")}, target modules:
{targets}) trained with finqlora {__version__} on top of:

    {base}

## Check and unpack / 校验并解压

    finqlora export unzip {ZIP_NAME} --output adapter/
    # or without finqlora: unzip {ZIP_NAME} -d adapter && cd adapter && sha256sum -c {CHECKSUMS_NAME}

## Use / 使用

    finqlora ask --model "{base}" --adapter adapter/ "美联储宣布加息25个基点，对A股银行板块影响如何？"
    finqlora serve --model "{base}" --adapter finqlora=adapter/
    # merge reads the zip directly (verified against SHA256SUMS first):
    finqlora export merge --model "{base}" --adapter {ZIP_NAME} --output merged/

In Python (peft):

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = AutoModelForCausalLM.from_pretrained("{base}")
    model = PeftModel.from_pretrained(base, "adapter/")
    tokenizer = AutoTokenizer.from_pretrained("adapter/")  # carries the chat template used in training

## Files

{chr(10).join(f"- {name}" for name in files)}
- {CHECKSUMS_NAME}: SHA-256 of every file above
"""


def package_adapter(
    run_dir: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, *, overwrite: bool = True
) -> PackageResult:
    """Write `qlora_weights.zip` for the training output folder `run_dir`."""
    run_dir = Path(run_dir).expanduser()
    config = read_adapter_config(run_dir)
    zip_path = Path(output).expanduser() if output else run_dir / ZIP_NAME
    if zip_path.exists() and not overwrite:
        raise FinqloraError(f"{zip_path} already exists", hint="pass another --output or remove the old zip")
    names = [name for name in (*RUN_FILES, *TOKENIZER_FILES) if (run_dir / name).is_file()]
    missing = [name for name in ("training_info.json", "loss.png") if name not in names]
    if not _has_tokenizer(run_dir):
        missing.append("tokenizer files (the base model's tokenizer will be used)")

    readme = _usage_readme(config, names)
    digests = {name: sha256_file(run_dir / name) for name in names}
    digests["README.md"] = hashlib.sha256(readme.encode("utf-8")).hexdigest()
    sums = "".join(f"{digest}  {name}\n" for name, digest in digests.items())

    zip_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{zip_path.name}.", suffix=".tmp", dir=zip_path.parent)
    os.close(fd)
    umask_mode(tmp)
    try:
        with zipfile.ZipFile(tmp, "w") as archive:
            for name in names:
                # Weights barely compress; storing them keeps packing and loading fast.
                method = zipfile.ZIP_STORED if name.endswith(".safetensors") else zipfile.ZIP_DEFLATED
                archive.write(run_dir / name, arcname=name, compress_type=method)
            archive.writestr("README.md", readme, compress_type=zipfile.ZIP_DEFLATED)
            archive.writestr(CHECKSUMS_NAME, sums, compress_type=zipfile.ZIP_DEFLATED)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        usual_permissions(Path(tmp))
        os.replace(tmp, zip_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return PackageResult(zip_path, digests, missing)


def _parse_checksums(text: str, zip_path: Path) -> dict[str, str]:
    expected: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        name = name.strip().lstrip("*")
        if len(digest) != 64 or not name:
            raise FinqloraError(
                f"{zip_path}: line {number} of {CHECKSUMS_NAME} is not '<sha256>  <file name>': {line!r}",
                hint="the zip was modified or damaged; get a fresh copy (finqlora export zip writes it)",
            )
        expected[name] = digest.lower()
    return expected


def _safe_member(name: str, zip_path: Path) -> str:
    """Refuse absolute paths and `..` (a zip must not write outside its target folder)."""
    posix = PurePosixPath(name)
    if posix.is_absolute() or ".." in posix.parts or "\\" in name or (posix.parts and ":" in posix.parts[0]):
        raise FinqloraError(
            f"{zip_path} contains an unsafe path {name!r}", hint="do not use this zip; it was not written by finqlora"
        )
    return name


def verify_adapter_zip(zip_path: str | os.PathLike[str]) -> dict[str, str]:
    """Check every file of the zip against its SHA256SUMS; return name -> sha256.

    Raises a FinqloraError naming the first file that is missing, unlisted or corrupt.
    """
    zip_path = Path(zip_path).expanduser()
    if not zip_path.is_file():
        raise FinqloraError(f"{zip_path} does not exist", hint="pass the path of a qlora_weights.zip")
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise FinqloraError(f"{zip_path} is not a zip file (or it is truncated)", hint="copy or download it again") from None
    with archive:
        members = {_safe_member(info.filename, zip_path): info for info in archive.infolist() if not info.is_dir()}
        if CHECKSUMS_NAME not in members:
            raise FinqloraError(
                f"{zip_path} has no {CHECKSUMS_NAME}, so its contents cannot be verified",
                hint="package the adapter with `finqlora export zip --run <training output folder>`",
            )
        expected = _parse_checksums(archive.read(CHECKSUMS_NAME).decode("utf-8", errors="replace"), zip_path)
        for name in expected:
            if name not in members:
                raise FinqloraError(f"{zip_path}: {name} is listed in {CHECKSUMS_NAME} but missing from the zip", hint="get a fresh copy of the zip")
        unlisted = sorted(set(members) - set(expected) - {CHECKSUMS_NAME})
        if unlisted:
            raise FinqloraError(
                f"{zip_path}: {', '.join(unlisted)} not listed in {CHECKSUMS_NAME}",
                hint="the zip was modified after packaging; get a fresh copy",
            )
        for name, digest in expected.items():
            hasher = hashlib.sha256()
            with archive.open(name) as handle:
                while chunk := handle.read(1 << 20):
                    hasher.update(chunk)
            actual = hasher.hexdigest()
            if actual != digest:
                raise FinqloraError(
                    f"{zip_path}: checksum mismatch for {name} (expected {digest[:16]}..., got {actual[:16]}...)",
                    hint="the file is corrupt or was modified; copy or download the zip again",
                )
        if ADAPTER_WEIGHTS not in expected or ADAPTER_CONFIG not in expected:
            raise FinqloraError(
                f"{zip_path} verifies but holds no {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}",
                hint="this is not an adapter package; write one with `finqlora export zip`",
            )
    return expected


def _extract_verified(zip_path: Path, destination: Path, expected: dict[str, str]) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path) as archive:
        for name in expected:
            target = destination / _safe_member(name, zip_path)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
        (destination / CHECKSUMS_NAME).write_bytes(archive.read(CHECKSUMS_NAME))
    # Re-check what landed on disk: a full disk or a flaky filesystem must not go unnoticed.
    for name, digest in expected.items():
        if sha256_file(destination / name) != digest:
            raise FinqloraError(f"{destination / name} differs from the zip after extraction", hint="check free disk space and retry")


def unpack_adapter(zip_path: str | os.PathLike[str], output_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Verify the zip, then extract it into `output_dir` (an adapter folder)."""
    zip_path = Path(zip_path).expanduser()
    output_dir = Path(output_dir).expanduser()
    expected = verify_adapter_zip(zip_path)
    _check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        _extract_verified(zip_path, staging, expected)
        _replace_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def adapter_from_zip(zip_path: str | os.PathLike[str]) -> Path:
    """Load-straight-from-zip: the verified, extracted adapter folder in the cache.

    The cache folder is named after the zip's SHA-256, so a changed zip is never confused with
    an old extraction; a complete extraction carries a marker and is reused.
    """
    zip_path = Path(zip_path).expanduser()
    expected = verify_adapter_zip(zip_path)
    folder = cache_dir("adapters") / sha256_file(zip_path)[:32]
    if (folder / _EXTRACTED_MARKER).is_file():
        return folder
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _extract_verified(zip_path, staging, expected)
        (staging / _EXTRACTED_MARKER).write_text(str(zip_path.resolve()) + "\n", encoding="utf-8")
        if (folder / _EXTRACTED_MARKER).is_file():  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
        else:
            _replace_dir(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder

