"""Two builds of ggml in one process, each bound to its own package.

ggml-python (the products of `hlm.ggml_kernel`) and llama-cpp-python (the draft's decode, `hlm.llamacpp`) each bundle
their own build of ggml, of different versions, and each opens it into the process's global symbol scope: whichever
is imported second would run its own code against the first one's ggml (with `ggml` imported first, 1,362 of
libllama's symbol bindings went to ggml-python's library; `LD_DEBUG=bindings`). `load` opens every library of both
packages first, with RTLD_DEEPBIND, so that each binds to its own package's ggml whatever is imported later; the two
modules that import the packages call it first. `tests/test_llamacpp.py` checks the bindings.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from pathlib import Path

# Per package, the libraries it opens, dependencies first (llama-cpp-python's wheel holds copies, not links: the
# files named here are the ones it opens and the ones they need).
LIBRARIES = {"ggml": ("libggml-base.so", "libggml-cpu.so", "libggml.so"),
             "llama_cpp": ("libggml-base.so.0", "libggml-cpu.so.0", "libggml.so.0", "libllama.so")}


def library_folder(package: str) -> Path | None:
    """Where an installed package keeps its native libraries (without importing it), or None."""
    spec = importlib.util.find_spec(package)
    return Path(spec.origin).parent / "lib" if spec is not None and spec.origin else None


@functools.cache
def load() -> None:
    """Open both packages' libraries, each resolving its symbols in its own dependencies first. Where the platform
    has no RTLD_DEEPBIND (macOS, Windows) each library binds to its own dependencies anyway."""
    if not hasattr(os, "RTLD_DEEPBIND"):
        return
    for package, names in LIBRARIES.items():
        folder = library_folder(package)
        for name in names if folder else ():
            try:
                ctypes.CDLL(str(folder / name), mode=os.RTLD_NOW | os.RTLD_LOCAL | os.RTLD_DEEPBIND)
            except OSError:  # absent or unloadable: the package's own import says why, where it is used
                break
