"""The timings that choose a path at load, measured once on a machine and kept.

Several choices at load are made by timing both sides (`hlm.models.presets`: the dtype, each model's fast path, the
llama.cpp draft; `hlm.rows`: the verifier's block of rows). Where two sides time within noise of each other, as on
some CPUs, each load could take either. Their numerics differ, so a load that flips makes a resumed eval find none of
its cached runs (the cache is keyed by numerics) and the page build its example references again. So each timing is
kept in a small JSON file (`HLM_TIMINGS`, default `timings.json` in the model cache) under what it depends on: this
CPU (its name and flags), the thread count, the versions of torch, ggml and llama.cpp, the source of the kernel
modules, and the caller's own key (shapes, dtype, the candidates). A change to any of them measures again.
`HLM_TIMINGS=off` measures at every load and keeps nothing; deleting the file measures again once. A timing made
while the cores were busy (`hlm.quant.Busy`) raises out of `measure` and is not kept.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from hlm.models.embedded import cache_dir

LOG = logging.getLogger(__name__)
ENV = "HLM_TIMINGS"  # a file to keep timings in, or "off"
AT_LOAD = "at load"  # `kept`'s word for a timing `measure` made just now
KERNEL_MODULES = ("quant.py", "rows.py", "ggml_kernel.py", "gguf_blocks.py", "llamacpp.py", "native.py")
T = TypeVar("T")


def _file() -> Path | None:
    value = os.environ.get(ENV, "")
    if value.lower() == "off":
        return None
    if value:
        return Path(value).expanduser()
    return cache_dir() / "timings.json"


@functools.cache
def machine() -> str:
    """What every kept timing depends on but the thread count (which a process may change), hashed: the CPU, the
    library versions and the kernels' source."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line for line in info if line.startswith("model name")), cpu)
        cpu += next((line for line in info if line.startswith("flags")), "")
    versions = []
    for dist in ("torch", "ggml_python", "llama_cpp_python"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} none")
    here = Path(__file__).parent
    source = b"".join((here / name).read_bytes() for name in KERNEL_MODULES)
    parts = [cpu, *versions, hashlib.sha256(source).hexdigest()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def kept(name: str, measure: Callable[[], T], *key: object) -> tuple[T, str]:
    """`measure()`'s result (JSON-able: tuples come back as lists) and when it was measured: AT_LOAD (`measure` ran
    now), or the day of an earlier load on this machine whose timing is kept. `name` and `key` say what it measured."""
    path = _file()
    entry = f"{name} {json.dumps(key, default=str)} {machine()} {torch.get_num_threads()} threads"
    if path is not None:
        found = _read(path).get(entry)
        if found is not None:
            return found["value"], f"at a load on {found['day']}, kept in ${ENV} ({path})"
    value = measure()
    if path is not None:
        _write(path, entry, {"value": value, "day": datetime.date.today().isoformat()})
    return value, AT_LOAD


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        LOG.warning("timings file %s unreadable (%s): measuring again", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, entry: str, record: dict[str, Any]) -> None:
    """Add one timing (read again first: another process may have added its own); atomic, and a file that cannot be
    written only costs the next load a measurement."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[entry] = record
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(data, indent=1, sort_keys=True))
        partial.replace(path)
    except OSError as exc:
        LOG.warning("timings not kept in %s: %s", path, exc)
