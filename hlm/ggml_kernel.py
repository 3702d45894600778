"""ggml (llama.cpp's tensor library, through `ggml-python`) for Linear layers on a GGUF's own blocks: the graphs
`hlm.quant.GgmlLinear` runs (`--quant ggml`).

Why: torch's CPU kernels for 4-bit weights, and its bf16 product on CPUs with AVX2 alone, are bound by their
arithmetic, far from the memory-bandwidth bound a decode step should reach; ggml's dot products for the GGUF formats
are the ones llama.cpp decodes with. On a 2-core AVX2 machine the embedded verifier's step took 67 ms on them
against 147 ms on torch's int4 kernel, the draft's 36 ms against 67 ms in bf16 (docs/speed.md). Every format the
GGUF stores runs as stored (Q4_K, Q5_0, Q8_0 and Q6_K, the heads included): nothing is re-quantised.

What it computes: ggml rounds each row of activations to 8 bits per block (Q8_K or Q8_0, as llama.cpp does) and
sums in integers within a block, so the products differ from the float ones by about 0.5-0.7 % (relative); the
quality guard measures the effect on each model (docs/speed.md). A row's product never depends on the rows passed
with it (checked by `tests/test_ggml_kernel.py`), so the verifier's syncs stay exact (`hlm.rows`). Prompt chunks take
torch's float GEMM on weights ggml dequantises a slice at a time (`hlm.quant.GgmlLinear`).

ggml runs with torch's thread count on threads of its own: an OpenMP team (ggml's default build, the system's
libgomp, apart from torch's), or without OpenMP its own pool, which measured slower here (168 layers of the draft's
shapes, one row: 19.0 against 16.5 ms alone, 24.3 against 19.9 ms with torch's small ops between). Calls from several
threads take turns (one lock), as they would for the cores anyway.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import weakref
from typing import Any

import numpy as np
import torch

from hlm import gguf_blocks, native

KINDS = gguf_blocks.STORED  # the GGUF formats this path runs: every one a converted folder keeps
_LOCK = threading.Lock()


@functools.cache
def available() -> bool:
    """Whether `ggml-python` imports (a C library built at install; a platform without it keeps the torch paths)."""
    native.load()
    try:
        import ggml  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _lib() -> Any:
    native.load()
    import ggml

    return ggml


@functools.cache
def _pool(threads: int) -> Any:
    """ggml's thread pool for `threads` threads. Built without OpenMP, its workers sleep between calls (no
    polling), so they take no cycles from torch's; an OpenMP build keeps only its bookkeeping here."""
    ggml = _lib()
    params = ggml.ggml_threadpool_params_default(threads)
    params.poll = 0
    return ggml.ggml_threadpool_new(ctypes.byref(params))


class Graph:
    """One ggml graph over an n x k layer's blocks: `op(context, weight, input)` (ggml_mul_mat: rows x k float32
    inputs; ggml_get_rows: `rows` int32 indices) for a fixed count of rows, its input and output the torch tensors
    given per call."""

    def __init__(self, blocks: torch.Tensor, kind: str, n: int, k: int, rows: int, op: str) -> None:
        ggml = _lib()
        params = ggml.ggml_init_params(mem_size=4 * ggml.ggml_tensor_overhead() + ggml.ggml_graph_overhead(),
                                       mem_buffer=None, no_alloc=True)
        self.context = ggml.ggml_init(params)
        weakref.finalize(self, ggml.ggml_free, self.context)  # also at exit, while ggml is still importable
        weight = ggml.ggml_new_tensor_2d(self.context, kind_id(kind), k, n)
        self.blocks = blocks  # the weight's data: alive as long as the graph
        weight.contents.data = ctypes.c_void_p(blocks.data_ptr())
        if op == "ggml_mul_mat":
            self.input = ggml.ggml_new_tensor_2d(self.context, ggml.GGML_TYPE_F32, k, rows)
        else:
            self.input = ggml.ggml_new_tensor_1d(self.context, ggml.GGML_TYPE_I32, rows)
        self.output = getattr(ggml, op)(self.context, weight, self.input)
        self.graph = ggml.ggml_new_graph(self.context)
        ggml.ggml_build_forward_expand(self.graph, self.output)
        threads = torch.get_num_threads()
        self.plan = ggml.ggml_graph_plan(self.graph, threads, _pool(threads))
        self.work = np.empty(max(1, self.plan.work_size), np.uint8)
        self.plan.work_data = self.work.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))

    def __call__(self, source: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` = the op on `source` (both contiguous, on the CPU, of the graph's shapes)."""
        with _LOCK:
            self.input.contents.data = ctypes.c_void_p(source.data_ptr())
            self.output.contents.data = ctypes.c_void_p(out.data_ptr())
            _lib().ggml_graph_compute(self.graph, ctypes.byref(self.plan))
        return out


def kind_id(kind: str) -> int:
    """ggml's type id of a GGUF format (one of KINDS)."""
    return getattr(_lib(), f"GGML_TYPE_{kind}")


def row_bytes(kind: str, k: int) -> int:
    """Bytes of one row of k weights in `kind`."""
    return _lib().ggml_row_size(kind_id(kind), k)


def random_blocks(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Made-up blocks of an n x k layer in `kind` whose scales are small finite halves: a stand-in to time the
    kernel on (`hlm.models.presets`) and to test it on."""
    ggml = _lib()
    blocks = np.random.default_rng(seed).integers(0, 256, (n, row_bytes(kind, k)), dtype=np.uint8)
    size = ggml.ggml_type_size(kind_id(kind))
    view = blocks.reshape(-1, size)
    scale = np.full(len(view), 1e-3, np.float16).view(np.uint8).reshape(-1, 2)
    if kind in ("Q5_0", "Q8_0"):  # d first
        view[:, :2] = scale
    elif kind == "Q4_K":  # d, dmin first
        view[:, :2] = view[:, 2:4] = scale
    else:  # Q6_K: d last
        view[:, -2:] = scale
    return blocks
