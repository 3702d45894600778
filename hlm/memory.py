"""Memory of a process that serves for hours (the dashboard's `Service`, `serve-cloud` and its replicas): large
buffers go back to the system when freed, and pages of a memory-mapped checkpoint that nothing reads any more are
not kept counted."""

from __future__ import annotations

import ctypes
import functools
import mmap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now; their content is kept (a file's are read again if touched)


def return_large_buffers() -> bool:
    """Have glibc give every allocation of MMAP_THRESHOLD_BYTES or more its own mapping, unmapped when freed.

    By default glibc raises that threshold each time such a buffer is freed (up to 32 MiB), so from then on the
    decoder's short-lived large buffers (a dequantised layer, a prompt chunk's activations, a KV cache that grows)
    come from the heap, which fragments and keeps them: the embedded app's RSS rose 6.6 % over a 100-run soak, and
    2.2 % and 1.6 % in two soaks with this call. Call it before the models load. False where the C library is not
    glibc (then nothing changes)."""
    return bool(_glibc("mallopt", _M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def trim_heap() -> bool:
    """Hand the heap's free memory back to the OS now (glibc keeps it otherwise), as after dropping weights at load.
    False where the C library is not glibc."""
    return bool(_glibc("malloc_trim", 0))


@functools.cache
def _libc() -> ctypes.CDLL:
    """glibc, loaded once (OSError where there is none)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _glibc(function: str, *args: int) -> int | None:
    """glibc's `function(*args)`; None where the C library is not glibc or lacks it."""
    try:
        return getattr(_libc(), function)(*args)
    except (OSError, AttributeError):
        return None


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def file_backed(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s bytes are a view of a memory-mapped file (a checkpoint transformers loaded without a copy),
    per /proc/self/maps; False where there is none."""
    start, end = _span(tensor)
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= start and end <= high:
                    return len(fields) == 6 and fields[5].startswith("/")
    except (OSError, ValueError):
        pass
    return False


def page_out(tensor: torch.Tensor) -> bool:
    """Give the whole pages of a file-backed `tensor` that are resident back to the OS: a layer that now runs on a
    copy (`hlm.quant.PackedLinear`) no longer reads them, but having read them once to make that copy they would
    stay counted in the process's memory. Its content is unchanged (read from the file again if touched). False
    where it is not file-backed or the OS refuses."""
    if not file_backed(tensor):
        return False
    start, end = _span(tensor)
    page = mmap.PAGESIZE
    low, high = -(-start // page) * page, end // page * page
    return high <= low or _glibc("madvise", low, high - low, MADV_PAGEOUT) == 0
