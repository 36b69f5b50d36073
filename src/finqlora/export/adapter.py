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

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from finqlora import __version__
from finqlora.core.errors import FinqloraError
from finqlora.core.fileio import atomic_write_json, sha256_file, umask_mode
from finqlora.core.lock import lock_enclosing_run
from finqlora.core.safe_input import read_json_file
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

# A SHA256SUMS lists ~15 files at ~100 bytes a line; 1 MiB is far more than any real one, and
# reading at most that much keeps a hostile one-line "checksum file" from eating time and memory.
MAX_CHECKSUMS_BYTES = 1 << 20
# Unpacking limits (raise them with `finqlora export unzip --max-size-gb / --max-ratio`). An
# adapter package is at most a few GB (LoRA weights are stored, not deflated); text files deflate
# ~5-20x. A ratio is only judged once an entry, or the whole zip, has produced RATIO_FLOOR_BYTES:
# small files cannot fill a disk, whatever their ratio, but many of them can, so the bytes of all
# entries are also held against the size of the zip file.
DEFAULT_MAX_UNPACKED_BYTES = 16 << 30
DEFAULT_MAX_RATIO = 200.0
RATIO_FLOOR_BYTES = 1 << 20
# How much of a bad value an error message quotes.
QUOTE_CHARS = 80


@dataclass(frozen=True)
class ZipLimits:
    """How much a zip may unpack to: total bytes, and bytes out per compressed byte of an entry."""

    max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES
    max_ratio: float = DEFAULT_MAX_RATIO

    def __post_init__(self) -> None:
        if self.max_unpacked_bytes <= 0 or self.max_ratio <= 0:
            raise FinqloraError(
                f"zip limits must be positive (max size {self.max_unpacked_bytes} bytes, max ratio {self.max_ratio})",
                hint="pass --max-size-gb and --max-ratio values above 0",
            )


def shorten(value: object, limit: int = QUOTE_CHARS) -> str:
    """repr() of a value cut to `limit` characters, saying how long it was (for error messages)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text):,} characters)"


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
    config = read_json_file(config_path, what="adapter config", hint="restore the file from the training output folder or the zip")
    if not isinstance(config, dict):
        raise FinqloraError(
            f"{config_path} holds a JSON {type(config).__name__}, not an object of LoRA settings",
            hint="restore the file from the training output folder or the zip",
        )
    return config


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
    """Write `qlora_weights.zip` for the training output folder `run_dir`.

    Holds the run lock of `run_dir` (a run still writing it would give a zip of two runs' files)
    and of the run folder the zip goes into, if any (finqlora.core.lock).
    """
    run_dir = Path(run_dir).expanduser()
    zip_path = Path(output).expanduser() if output else run_dir / ZIP_NAME
    with lock_enclosing_run(run_dir), lock_enclosing_run(zip_path.parent):
        return _package_adapter(run_dir, zip_path, overwrite=overwrite)


def _package_adapter(run_dir: Path, zip_path: Path, *, overwrite: bool) -> PackageResult:
    config = read_adapter_config(run_dir)
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
        name = _normal_name(name.strip().lstrip("*"))
        if len(digest) != 64 or not name or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise FinqloraError(
                f"{zip_path}: line {number} of {CHECKSUMS_NAME} is not '<sha256>  <file name>': {shorten(line)}",
                hint="the zip was modified or damaged; get a fresh copy (finqlora export zip writes it)",
            )
        if name in expected:
            raise FinqloraError(
                f"{zip_path}: {CHECKSUMS_NAME} lists {shorten(name)} twice (line {number})",
                hint="the zip was modified or damaged; get a fresh copy (finqlora export zip writes it)",
            )
        expected[name] = digest.lower()
    return expected


def _read_checksums(archive: zipfile.ZipFile, info: zipfile.ZipInfo, zip_path: Path) -> dict[str, str]:
    """SHA256SUMS, read (at most MAX_CHECKSUMS_BYTES + 1 bytes, whatever it declares) and parsed."""
    too_big = FinqloraError(
        f"{zip_path}: {CHECKSUMS_NAME} is larger than {MAX_CHECKSUMS_BYTES // 1024} KiB "
        f"(a real one is a few lines of '<sha256>  <file name>')",
        hint="do not use this zip: it was not written by `finqlora export zip`; get a fresh copy",
    )
    if info.file_size > MAX_CHECKSUMS_BYTES:
        raise too_big
    with _open_member(archive, info, zip_path) as handle:
        data = handle.read(MAX_CHECKSUMS_BYTES + 1)
    if len(data) > MAX_CHECKSUMS_BYTES:
        raise too_big
    return _parse_checksums(data.decode("utf-8", errors="replace"), zip_path)


def _normal_name(name: str) -> str:
    """The path an entry name unpacks to: `a/./b`, `a//b` and `a/b/` are all `a/b`."""
    return str(PurePosixPath(name)) if name else name


def _safe_member(name: str, zip_path: Path) -> str:
    """Refuse absolute paths, `..` and empty names (a zip must not write outside its target
    folder, nor onto the folder itself); return the name normalised."""
    posix = PurePosixPath(name)
    if posix.is_absolute() or ".." in posix.parts or "\\" in name or not posix.parts or ":" in posix.parts[0]:
        raise FinqloraError(
            f"{zip_path} contains an unsafe path {shorten(name)}", hint="do not use this zip; it was not written by finqlora"
        )
    return str(posix)


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _check_layout(infos: list[zipfile.ZipInfo], zip_path: Path) -> dict[str, zipfile.ZipInfo]:
    """name -> entry of the zip's files, refusing layouts that cannot unpack to plain files.

    A symbolic link, the same name twice, or a file that another entry needs as a folder
    (`x` and `x/y`) would make extraction fail half-way or write through a link.
    """
    bad_zip_hint = "do not use this zip: `finqlora export zip` writes plain files only; get a fresh copy"
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = _safe_member(info.filename, zip_path)
        if _is_symlink(info):
            raise FinqloraError(f"{zip_path}: entry {shorten(info.filename)} is a symbolic link", hint=bad_zip_hint)
        if info.is_dir():
            continue
        if name in members:
            first = members[name].filename
            same = "appears twice" if first == info.filename else f"and entry {shorten(first)} both unpack to {shorten(name)}"
            raise FinqloraError(f"{zip_path}: entry {shorten(info.filename)} {same}", hint=bad_zip_hint)
        members[name] = info
    for name in members:
        for parent in PurePosixPath(name).parents:
            if str(parent) in members:
                raise FinqloraError(
                    f"{zip_path}: entry {shorten(name)} needs {shorten(str(parent))} to be a folder, but the zip also has a file of that name",
                    hint=bad_zip_hint,
                )
    return members


def _check_zip_ratio(zip_path: Path, total: int, zip_bytes: int, limits: ZipLimits, name: str) -> None:
    """The ratio over all entries: many small entries that each stay under RATIO_FLOOR_BYTES
    (400 x 1 MiB from a 450 KB zip) would pass the per-entry check."""
    if total > RATIO_FLOOR_BYTES and total > limits.max_ratio * max(zip_bytes, 1):
        raise FinqloraError(
            f"{zip_path}: its entries unpack to more than {total:,} bytes (reached at entry {shorten(name)}) from a zip of "
            f"{zip_bytes:,} bytes (ratio {total / max(zip_bytes, 1):,.0f}, limit {limits.max_ratio:g})",
            hint="this looks like a zip bomb; if you trust the zip, raise the limit with `finqlora export unzip --max-ratio N`",
        )


def _check_declared_sizes(members: dict[str, zipfile.ZipInfo], zip_path: Path, limits: ZipLimits) -> None:
    """Refuse from the zip directory alone what would unpack beyond the limits (before any work)."""
    total = 0
    zip_bytes = zip_path.stat().st_size
    for name, info in members.items():
        total += info.file_size
        if total > limits.max_unpacked_bytes:
            raise FinqloraError(
                f"{zip_path}: unpacks to more than {_gib(limits.max_unpacked_bytes)} (reached at entry {shorten(name)}, "
                f"{info.file_size:,} bytes)",
                hint="if you trust this zip, raise the limit with `finqlora export unzip --max-size-gb N`",
            )
        if info.file_size > RATIO_FLOOR_BYTES and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise FinqloraError(
                f"{zip_path}: entry {shorten(name)} would unpack {info.file_size:,} bytes from {info.compress_size:,} "
                f"(ratio {info.file_size / max(info.compress_size, 1):,.0f}, limit {limits.max_ratio:g})",
                hint="this looks like a zip bomb; if you trust the zip, raise the limit with `finqlora export unzip --max-ratio N`",
            )
        _check_zip_ratio(zip_path, total, zip_bytes, limits, name)


def _check_free_space(destination: Path, needed: int) -> None:
    free = shutil.disk_usage(destination).free
    if needed > free:
        raise FinqloraError(
            f"unpacking needs {needed:,} bytes but {destination} has only {free:,} free",
            hint="free some disk space or choose another --output folder",
        )


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.3g} GiB"


@contextlib.contextmanager
def _open_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, zip_path: Path) -> Iterator[Any]:
    """archive.open(info), with damaged data (bad CRC, bad deflate stream) as a FinqloraError."""
    try:
        with archive.open(info) as handle:
            yield handle
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise FinqloraError(
            f"{zip_path}: entry {shorten(info.filename)} cannot be read ({exc})",
            hint="the zip is damaged or uses an unsupported compression; copy or download it again",
        ) from exc


class _UnpackBudget:
    """Counts the bytes really decompressed against the limits, whatever the directory declared.

    zipfile stops an entry at its declared size (and then fails its CRC), so this guards the
    case where the zip changed after its directory was checked, e.g. between verify and extract.
    """

    def __init__(self, zip_path: Path, limits: ZipLimits) -> None:
        self.zip_path, self.limits, self.total = zip_path, limits, 0
        self.zip_bytes = zip_path.stat().st_size

    def chunks(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, size: int = 1 << 20) -> Iterator[bytes]:
        produced = 0
        with _open_member(archive, info, self.zip_path) as handle:
            while chunk := handle.read(size):
                produced += len(chunk)
                self.total += len(chunk)
                self._check(info, produced)
                yield chunk

    def _check(self, info: zipfile.ZipInfo, produced: int) -> None:
        name = shorten(info.filename)
        if self.total > self.limits.max_unpacked_bytes:
            raise FinqloraError(
                f"{self.zip_path}: unpacking passed {_gib(self.limits.max_unpacked_bytes)} at entry {name}",
                hint="if you trust this zip, raise the limit with `finqlora export unzip --max-size-gb N`",
            )
        if produced > RATIO_FLOOR_BYTES and produced > self.limits.max_ratio * max(info.compress_size, 1):
            raise FinqloraError(
                f"{self.zip_path}: entry {name} unpacked {produced:,} bytes from {info.compress_size:,} (limit ratio {self.limits.max_ratio:g})",
                hint="this looks like a zip bomb; if you trust the zip, raise the limit with `finqlora export unzip --max-ratio N`",
            )
        _check_zip_ratio(self.zip_path, self.total, self.zip_bytes, self.limits, info.filename)


def verify_adapter_zip(zip_path: str | os.PathLike[str], *, limits: ZipLimits | None = None) -> dict[str, str]:
    """Check every file of the zip against its SHA256SUMS; return name -> sha256.

    Raises a FinqloraError naming the first file that is missing, unlisted or corrupt, and for
    zips that exceed `limits` (checked from the directory first, then while decompressing), hold
    links or files that other entries need as folders, or whose SHA256SUMS is oversized.
    """
    limits = limits or ZipLimits()
    zip_path = Path(zip_path).expanduser()
    if not zip_path.is_file():
        raise FinqloraError(f"{zip_path} does not exist", hint="pass the path of a qlora_weights.zip")
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise FinqloraError(f"{zip_path} is not a zip file (or it is truncated)", hint="copy or download it again") from None
    with archive:
        members = _check_layout(archive.infolist(), zip_path)
        if CHECKSUMS_NAME not in members:
            raise FinqloraError(
                f"{zip_path} has no {CHECKSUMS_NAME}, so its contents cannot be verified",
                hint="package the adapter with `finqlora export zip --run <training output folder>`",
            )
        expected = _read_checksums(archive, members[CHECKSUMS_NAME], zip_path)
        _check_declared_sizes(members, zip_path, limits)
        for name in expected:
            if name not in members:
                raise FinqloraError(f"{zip_path}: {shorten(name)} is listed in {CHECKSUMS_NAME} but missing from the zip", hint="get a fresh copy of the zip")
        unlisted = sorted(set(members) - set(expected) - {CHECKSUMS_NAME})
        if unlisted:
            raise FinqloraError(
                f"{zip_path}: {shorten(', '.join(unlisted))} not listed in {CHECKSUMS_NAME}",
                hint="the zip was modified after packaging; get a fresh copy",
            )
        budget = _UnpackBudget(zip_path, limits)
        for name, digest in expected.items():
            hasher = hashlib.sha256()
            for chunk in budget.chunks(archive, members[name]):
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


def _write_hint(exc: OSError) -> str:
    """What to do about a failed write while unpacking, by its cause (not always a full disk)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some disk space (or choose another --output) and retry; nothing was kept"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "choose an --output folder you can write to and retry; nothing was kept"
    if exc.errno == errno.ENAMETOOLONG:
        return "an entry's name is too long for this file system; do not use this zip (finqlora writes short names)"
    return "check the --output folder (its disk and permissions) and retry; nothing was kept"


def _extract_verified(zip_path: Path, destination: Path, expected: dict[str, str], limits: ZipLimits) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    root = destination.resolve()
    with zipfile.ZipFile(zip_path) as archive:
        # The zip is read again: re-check its layout and count what is written, in case the file
        # changed between verification and extraction.
        members = _check_layout(archive.infolist(), zip_path)
        names = list(dict.fromkeys([*expected, CHECKSUMS_NAME]))
        _check_free_space(destination, sum(members[name].file_size for name in names))
        budget = _UnpackBudget(zip_path, limits)
        for name in names:
            target = destination / _safe_member(name, zip_path)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.parent.resolve().is_relative_to(root):
                    raise FinqloraError(f"{zip_path}: entry {shorten(name)} would be written outside {destination}", hint="do not use this zip")
                with open(target, "xb") as sink:
                    for chunk in budget.chunks(archive, members[name]):
                        sink.write(chunk)
            except OSError as exc:
                raise FinqloraError(
                    f"cannot write {target} while unpacking {zip_path}: {exc.strerror or exc}", hint=_write_hint(exc)
                ) from exc
    # Re-check what landed on disk: a full disk or a flaky filesystem must not go unnoticed.
    for name, digest in expected.items():
        if sha256_file(destination / name) != digest:
            raise FinqloraError(f"{destination / name} differs from the zip after extraction", hint="check free disk space and retry")


def unpack_adapter(
    zip_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    limits: ZipLimits | None = None,
) -> Path:
    """Verify the zip, then extract it into `output_dir` (an adapter folder)."""
    zip_path = Path(zip_path).expanduser()
    output_dir = Path(output_dir).expanduser()
    limits = limits or ZipLimits()
    expected = verify_adapter_zip(zip_path, limits=limits)
    _check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        _extract_verified(zip_path, staging, expected, limits)
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
        _extract_verified(zip_path, staging, expected, ZipLimits())
        (staging / _EXTRACTED_MARKER).write_text(str(zip_path.resolve()) + "\n", encoding="utf-8")
        if (folder / _EXTRACTED_MARKER).is_file():  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
        else:
            _replace_dir(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder

