"""Weight-only quantisation for CPU decoding: the fast path.

Decoding one token is a pass over every weight, so on a CPU its time is memory traffic: fewer bytes per weight
is the speed-up. Four recipes, all weight-only (activations stay in the model's dtype, so nothing about the
softmax or the attention changes) and all on kernels that ship in torch itself:
- `int8`: per-output-channel symmetric int8 (`aten._weight_int8pack_mm`);
- `int4`: asymmetric 4-bit in groups of 32 (`aten._weight_int4pack_mm_for_cpu`); the output layer stays int8.
  The embedded draft's GGUF weights are 5- and 8-bit blocks (its 896-wide rows do not fit K-quant blocks), so 4
  bits lose real precision: selectable, but no preset takes it.
- `q4k`: the layers a GGUF file stores as Q4_K run on those very 4-bit codes, on the same int4 kernel: Q4_K's
  sub-blocks of 32 weights, each `scale * code - offset`, are the kernel's groups, so nothing is re-quantised (the
  float weights were dequantised from these codes in the first place); only the group's scale and zero are
  rounded to the activations' dtype. Layers stored otherwise (Q6_K, Q8_0, ...) stay as loaded.
- `gguf`: `q4k`, and the layers stored as Q5_0 or Q8_0 on their own blocks too, each as two 4-bit planes
  (`PlanesLinear`); only Q6_K's layers (groups of 16) stay as loaded. The blocks come from the GGUF, or for the
  embedded pair from `gguf_blocks.FILE` beside its converted weights (`hlm.models.embedded`).
What a recipe leaves in bf16 then runs on oneDNN's packed weights (`PackedLinear`, `pack_float_linears`): the same
products, read once a step; where oneDNN has no bf16 (AVX2 alone), with prompt chunks multiplied in fp32
(`WideLinear`).
`quality` measures what a recipe costs (top-1 agreement and KL against the unquantised model, teacher-forced on
real prompts); `hlm.models` takes a preset's accepted recipe only where it measures faster (`hlm bench` prints
both; docs/speed.md says which recipe each model of the embedded pair runs and why).
"""

from __future__ import annotations

import copy
import functools
import itertools
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hlm import ggml_kernel, gguf_blocks, memory
from hlm.config import QUANT_RECIPES as RECIPES
from hlm.errors import UserError

if TYPE_CHECKING:
    from transformers import DynamicCache

    from hlm.llamacpp import LlamaDraft

BLOCK_RECIPES = ("q4k", "gguf", "ggml")  # the recipes that run a GGUF's own blocks (`stored_blocks`)
INT4_GROUP = gguf_blocks.GROUP
INT4_INNER_K_TILES = 2
INT4_ROW_BLOCKS = (64, 32)  # rows the CPU kernel packs together: 64 with AVX-512, 32 with AVX2 (`int4_row_block`)
# The int4 kernel's time grows with the rows (8,960 x 1,536: 0.35 ms for one, 20 ms for 128), dequantising a
# layer and its float GEMM cost about what 96 rows do (14 ms): from this many rows, dequantise. A layer of two planes
# (`PlanesLinear`) crosses over at 64-128 rows too (4,864 x 896: 6.6 ms for 64 rows, 7.3 dequantised; 12.1 and 8.7
# for 128).
INT4_PREFILL_ROWS = 128
PACKED_PROBE_ROWS = 4  # rows `PackedLinear.of` checks (one, and the verifier's block of `hlm.rows.BLOCK`)


class QuantError(UserError, ValueError):
    """A recipe cannot apply to this model."""


# From this many rows on (prompt chunks), dequantise and use the float GEMM: the int8 kernel is a matrix-vector
# kernel whose time grows with the rows (4,864 x 896: 0.29 ms for one row, 1.43 ms for 16; dequantised 1.13 ms).
PREFILL_ROWS = 16
ROWS = 8192  # rows quantised at a time: the float32 working copy of a 151,936-row head would be ~1 GB
SCRATCH_WEIGHTS = 1 << 24  # float weights dequantised at a time for a prompt chunk's GEMM (32 MiB in bf16)
_scratch = threading.local()


def _scratch_buffer(like: torch.Tensor, slot: int = 0) -> torch.Tensor:
    """This thread's buffer of SCRATCH_WEIGHTS elements in `like`'s dtype and device, made once and reused (`slot`
    1: a second one, for `PlanesLinear`'s low plane)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (like.device, like.dtype, slot)
    if key not in buffers:  # a normal tensor, which passes in and out of inference mode may both write
        with torch.inference_mode(False):
            buffers[key] = torch.empty(SCRATCH_WEIGHTS, dtype=like.dtype, device=like.device)
    return buffers[key]


def _dequantised_gemm(rows: torch.Tensor, n: int, k: int, block: int,
                      fill: Callable[[torch.Tensor, int, int], torch.Tensor]) -> torch.Tensor:
    """rows @ W^T for an n x k quantised W, dequantised `block` output rows at a time (`block` a multiple of the
    layer's row granularity) by `fill(buffer, start, stop)`, which writes W[start:stop]^T into `buffer` and
    returns it as k x (stop - start). The buffer is this thread's and reused: a fresh one per layer would be a
    new mapping whose pages fault in on every prompt chunk (`hlm.memory.return_large_buffers`), which cost more
    than the dequantising itself (the 0.5B draft read a 24-token prompt in 0.77 s, 0.43 s of it there). bf16 rows
    are multiplied in fp32 where oneDNN has no bf16 GEMM (`onednn_bf16`), and the product rounded back to bf16."""
    wide = rows.float() if rows.dtype == torch.bfloat16 and not onednn_bf16() else rows
    buffer = _scratch_buffer(wide)
    step = max(block, SCRATCH_WEIGHTS // k // block * block)
    parts = [wide @ fill(buffer[:k * (min(i + step, n) - i)], i, min(i + step, n)) for i in range(0, n, step)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, -1)).to(rows.dtype)


def _copied_t(weight: torch.Tensor, buffer: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """A `_dequantised_gemm` fill for weights that need no decoding: W[start:stop] copied into `buffer` (in its
    dtype), transposed."""
    return buffer.view(stop - start, weight.shape[1]).copy_(weight[start:stop]).T


class WideLinear(nn.Module):
    """A bf16 Linear whose prompt chunks (from PREFILL_ROWS rows) are multiplied in fp32, the weights copied into
    fp32 a block at a time (`_dequantised_gemm`), where oneDNN has no bf16 GEMM: with AVX2 alone torch multiplies
    bf16 rows at 21 GFLOPS however many there are, fp32 at 161 from 512 rows (measured: the 0.5B draft read 640
    tokens in 33.0 s in bf16, 5.1 s with its products in fp32, 6.0 s in fp32). One row stays bf16, which reads half
    fp32's bytes."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] < PREFILL_ROWS:
            return F.linear(x, self.weight, self.bias)
        y = _dequantised_gemm(rows, self.out_features, self.in_features, 1, functools.partial(_copied_t, self.weight))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @classmethod
    def of(cls, linear: nn.Linear) -> WideLinear | None:
        """`linear` widened for prompts if its weight is bf16; else None."""
        return cls(linear) if linear.weight.dtype == torch.bfloat16 else None


class PackedLinear(nn.Module):
    """A bf16 Linear on oneDNN's packed copy of its weight. `F.linear` runs the same oneDNN product but reorders the
    weight into that layout on every call; here it is done once, so the sums are bit for bit `F.linear`'s (checked for
    each layer as it is packed) and a decode step reads the weight once: the embedded verifier's step 1.39x faster
    here, the draft's 1.08x (docs/speed.md). `weight` stays, for readers, with its pages given back to the OS."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias, self.packed = linear.weight, linear.bias, packed
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    @classmethod
    def of(cls, linear: nn.Linear) -> PackedLinear | None:
        """`linear` packed, if its weight is a bf16 view of a memory-mapped checkpoint whose pages the OS takes back
        (so the copy costs no memory: `memory.page_out`) and the packed product equals `F.linear`'s bit for bit on
        probe rows; else None."""
        w = linear.weight.detach()
        if w.dtype != torch.bfloat16 or w.device.type != "cpu" or not onednn_bf16() or not memory.file_backed(w):
            return None
        packed = cls(linear, torch.ops.mkldnn._reorder_linear_weight(w, None))
        probe = torch.randn(PACKED_PROBE_ROWS, linear.in_features, generator=torch.Generator().manual_seed(0),
                            dtype=w.dtype)
        with torch.no_grad():
            same = all(torch.equal(packed(probe[:n]), F.linear(probe[:n], w, linear.bias))
                       for n in (1, PACKED_PROBE_ROWS))
        # Packing read every page of the weight; unless the OS takes them back, the copy would add to the memory.
        return packed if same and memory.page_out(w) else None


@functools.cache
def onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 here, packing and GEMMs: it needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT. With AVX2
    alone packing raises, and torch multiplies bf16 rows at one speed however many there are (21 GFLOPS measured,
    against fp32's 161 at 512 rows), so prompt chunks are multiplied in fp32 (`_dequantised_gemm`, `WideLinear`)
    and the dtype is chosen by measurement (`hlm.models.presets.default_dtype`)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_float_linears(model: nn.Module) -> str:
    """Run each bf16 Linear the fast path left on `PackedLinear` where it can (`PackedLinear.of`), in place, or
    where oneDNN has no bf16 (`onednn_bf16`) on `WideLinear`; returns what was done ("" for nothing)."""
    make, done = (PackedLinear.of, "packed") if onednn_bf16() else (WideLinear.of, "with fp32 prompts")
    count = 0

    def swap(_name: str, linear: nn.Linear) -> nn.Module:
        nonlocal count
        swapped = make(linear)
        count += swapped is not None
        return swapped or linear

    swap_linears(model, swap)
    return f"{count} bf16 layers {done}" if count else ""


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 rows and one scale per output channel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        q = torch.empty(weight.shape, dtype=torch.int8)
        scale = torch.empty(weight.shape[0])
        for i in range(0, weight.shape[0], ROWS):
            w = weight[i:i + ROWS].float()
            scale[i:i + ROWS] = s = w.abs().amax(1).clamp(min=1e-12) / 127
            q[i:i + ROWS] = torch.round(w / s[:, None]).clamp(-127, 127)
        self.register_buffer("weight_int8", q.to(weight.device))
        self.register_buffer("scale", scale.to(weight.device, weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scale.dtype)
        if rows.shape[0] >= PREFILL_ROWS:  # a prompt chunk: the float GEMM on the codes, scaled per output as the
            # kernel does (the codes are exact in bf16; scaling the weights first would round them)
            y = _dequantised_gemm(rows, self.out_features, self.in_features, 1,
                                  functools.partial(_copied_t, self.weight_int8)) * self.scale
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias



@functools.cache
def int4_row_block() -> int | None:
    """How many rows torch's int4 CPU kernel packs together on this CPU (it follows the vector width), found by
    packing known codes: one byte holds row j of a block in its low nibble and row j + block / 2 in its high one.
    None for a packing of another form: layers then leave every product to the kernel."""
    codes = torch.randint(0, 16, (2 * max(INT4_ROW_BLOCKS), 64), generator=torch.Generator().manual_seed(0),
                          dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4_INNER_K_TILES)
    for block in INT4_ROW_BLOCKS:
        if torch.equal(_unpacked_t(packed, block, torch.empty_like(codes), 0, len(codes)).T, codes):
            return block
    return None


def _unpacked_t(packed: torch.Tensor, block: int, out: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The codes of rows start:stop (multiples of `block`) of an int4 kernel's packing, transposed (k x rows) into
    `out`, in its dtype."""
    n, half = stop - start, block // 2
    k = out.numel() // n
    rows = packed.view(-1, k, half)[start // block:stop // block].permute(1, 0, 2)
    codes = out.view(k, n // block, 2, half)
    codes[:, :, 0] = rows & 15
    codes[:, :, 1] = rows >> 4
    return out.view(k, n)


class Int4Linear(nn.Module):
    """y = x W^T with W in 4-bit codes q (0..15) per group of 32 inputs: w = (q - 8) * scale + zero."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        super().__init__()
        n, k = codes.shape
        self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.to(torch.int32), INT4_INNER_K_TILES))
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
                             .to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features, self.out_features = k, n
        # The float GEMM on dequantised weights for a prompt chunk, and the rows the semantic statistic reads, need
        # the kernel's packing (`int4_row_block`); without it the kernel does all.
        block = int4_row_block()
        self.row_block = block if block and n % block == 0 else None

    @property
    def unpacks(self) -> bool:
        return self.row_block is not None

    def dequantised_t(self, buffer: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """W[start:stop]^T (rows multiples of `row_block`) in the buffer's dtype (the activations', or fp32 where
        `_dequantised_gemm` widens them), w = q * scale + (zero - 8 * scale), written into `buffer`. Transposed, so
        each group's scale is one contiguous row to broadcast: 4x faster than building W itself (8,960 x 1,536: 8.4
        against 32.7 ms here)."""
        assert self.row_block is not None  # `dequantises` asks for it
        k, n, dtype = self.in_features, stop - start, buffer.dtype
        w = _unpacked_t(self.weight_int4, self.row_block, buffer, start, stop).view(k // INT4_GROUP, INT4_GROUP, n)
        scale, zero = self.scales_and_zeros[:, start:stop].float().unbind(-1)  # [k / 32, n] each
        return torch.addcmul((zero - 8 * scale).to(dtype)[:, None], w, scale.to(dtype)[:, None], out=w).view(k, n)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """W[index] in the scales' dtype, unpacked from the kernel's layout for those rows only (the semantic
        statistic reads a few of the head's rows a draft: no float copy of the head stays alive)."""
        if self.row_block is None:
            raise QuantError("this int4 layer's packing is not the one its rows can be read from")
        k, block = self.in_features, self.row_block
        packed = self.weight_int4.view(-1, k, block // 2)[index // block, :, index % (block // 2)]  # [rows, k]
        dtype = self.scales_and_zeros.dtype
        codes = torch.where((index % block < block // 2)[:, None], packed & 15, packed >> 4).to(dtype)
        scale, zero = self.scales_and_zeros[:, index].float().unbind(-1)  # [k / 32, rows] each
        return torch.addcmul((zero - 8 * scale).to(dtype).T[..., None], codes.view(len(index), -1, INT4_GROUP),
                             scale.to(dtype).T[..., None]).reshape(len(index), k)  # as `dequantised_t` computes

    @classmethod
    def fitted(cls, linear: nn.Linear) -> Int4Linear:
        """Codes fitted to the float weights: each group's range in 16 even steps."""
        w = linear.weight.detach().float()
        n, k = w.shape
        groups = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).reshape(n, k)
        return cls(q, scale, lo + 8 * scale, linear.bias, linear.weight.dtype)

    @classmethod
    def q4k(cls, linear: nn.Linear, blocks: np.ndarray) -> Int4Linear:
        """The layer's own Q4_K codes: w = scale * q - offset is (q - 8) * scale + (8 * scale - offset)."""
        codes, scale, offset = gguf_blocks.decode(blocks, linear.out_features, linear.in_features)
        return cls(codes, scale, 8 * scale - offset, linear.bias, linear.weight.dtype)

    def dequantises(self, rows: torch.Tensor) -> bool:
        """Whether `rows` are a prompt chunk, multiplied as a float GEMM on weights dequantised once, not by the
        kernel (whose time grows with the rows)."""
        return self.unpacks and rows.shape[0] >= INT4_PREFILL_ROWS

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        """rows @ W^T for 2-D rows in the scales' dtype: the kernel for a few rows, a float GEMM on the dequantised
        weights for a prompt chunk. `PlanesLinear` calls it directly: through the module call and a second reshape
        its layers cost the draft's decode step 0.9 ms more (26.0 against 25.2 ms, docs/speed.md)."""
        if self.dequantises(rows):
            return _dequantised_gemm(rows, self.out_features, self.in_features, self.row_block, self.dequantised_t)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight_int4, INT4_GROUP, self.scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class PlanesLinear(nn.Module):
    """y = x W^T for a layer a GGUF stores as Q5_0 or Q8_0 (w = d (code - offset), 32 weights a block), on the int4
    kernel with nothing re-quantised: code = 16 h + l, so W is a high plane (scale 16 d) plus a low one (scale d),
    run as one int4 layer of 2n rows whose halves are summed. Each zero is a power of two times d, so every weight
    stays exact in the kernel's scales, d rounded to the activations' dtype; each half is rounded to that dtype
    before the sum (what the quality guard measured, docs/speed.md)."""

    ZEROS = {128: (0, 8), 16: (128, -8)}  # per offset, (high, low) zero / d: they sum to (136 - offset), as w needs

    def __init__(self, linear: nn.Linear, blocks: np.ndarray, kind: str) -> None:
        super().__init__()
        n, k = linear.out_features, linear.in_features
        codes, d, offset = gguf_blocks.decode_planes(blocks, kind, n, k)
        codes, d = codes.to(torch.int32), d.to(linear.weight.dtype).float()
        high, low = self.ZEROS[offset]
        self.planes = Int4Linear(torch.cat([codes >> 4, codes & 15]), torch.cat([16 * d, d]),
                                 torch.cat([high * d, low * d]), None, linear.weight.dtype)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = k, n

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """W[index]: the high plane's rows plus the low plane's."""
        return self.planes.rows(index) + self.planes.rows(index + self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        rows = x.reshape(-1, k).to(self.planes.scales_and_zeros.dtype)
        if self.planes.dequantises(rows):  # the planes summed before the GEMM: n outputs, not 2n
            y = _dequantised_gemm(rows, n, k, self.planes.row_block, self._dequantised_t)
        else:
            y = self.planes.product(rows)
            y = y[:, :n] + y[:, n:]
        y = y.reshape(*x.shape[:-1], n)
        return y if self.bias is None else y + self.bias

    def _dequantised_t(self, buffer: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """W[start:stop]^T, the two planes' dequantised rows summed (each rounded to the activations' dtype first:
        decoding the 8-bit code before scaling it measured slower, both ways bound by unpacking the kernel's
        layout)."""
        low = _scratch_buffer(buffer, slot=1)[:buffer.numel()]
        n = self.out_features
        return self.planes.dequantised_t(buffer, start, stop).add_(self.planes.dequantised_t(low, start + n, stop + n))


class GgmlLinear(nn.Module):
    """y = x W^T with W as a GGUF stores it (`blocks`, the tensor's raw bytes in `kind`, one of
    `ggml_kernel.KINDS`), multiplied by ggml: a few rows by its own products (activations rounded to 8 bits a block,
    as llama.cpp computes), a prompt chunk (from INT4_PREFILL_ROWS rows) by the float GEMM on weights ggml decodes a
    slice at a time, which is faster there (8,960 x 1,536, 1,024 rows: 200 against 336 ms on AVX2)."""

    def __init__(self, linear: nn.Module, blocks: np.ndarray, kind: str) -> None:
        super().__init__()
        self.kind, self.in_features, self.out_features = kind, linear.in_features, linear.out_features
        size = ggml_kernel.row_bytes(kind, self.in_features)
        if blocks.size != size * self.out_features:
            raise QuantError(f"{blocks.size} bytes of {kind} blocks for a {self.out_features} x {self.in_features} "
                             "layer")
        # a buffer, so the model's state counts its bytes (`hlm.experiments.roofline`); ggml reads it in place
        # a GGUF's read-only map is copied; `gguf_blocks.FILE`'s private (copy-on-write) map runs in place
        blocks = np.require(blocks, requirements=["C", "W"])
        self.register_buffer("blocks", torch.from_numpy(blocks.reshape(self.out_features, size)))
        self.dtype = linear.weight.dtype
        bias = getattr(linear, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._graphs: dict[tuple[str, int], ggml_kernel.Graph] = {}
        self._register()

    def _register(self) -> None:
        """A key of its own for `hlm::ggml_mul_mat`, also for a copy (`__setstate__`), whose blocks are its own."""
        self.key = next(_GGML_KEYS)
        _GGML_LAYERS[self.key] = self

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._register()

    def _graph(self, op: str, rows: int) -> ggml_kernel.Graph:
        """The graph of `op` for `rows` rows, made at its first use."""
        if (op, rows) not in self._graphs:
            self._graphs[op, rows] = ggml_kernel.Graph(self.blocks, self.kind, self.out_features, self.in_features,
                                                       rows, op)
        return self._graphs[op, rows]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """W[index] in float32, decoded from those rows' blocks only (the semantic statistic reads a few of the
        head's rows a draft: `HeadRows`)."""
        index = index.reshape(-1).to(torch.int32).contiguous()
        return self._graph("ggml_get_rows", len(index))(index, torch.empty(len(index), self.in_features))

    def _dequantised_t(self, buffer: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """W[start:stop]^T in `buffer` for `_dequantised_gemm`: decoded straight into it where it is float32 (the
        widened GEMM), else into this thread's float32 scratch first. No fresh tensor a slice: one of a prompt
        chunk's size faults its pages in on every chunk (`_dequantised_gemm`)."""
        rows = buffer.view(stop - start, self.in_features)
        decoded = rows if rows.dtype == torch.float32 else \
            _scratch_buffer(torch.empty(0), slot=1)[:rows.numel()].view_as(rows)
        index = torch.arange(start, stop, dtype=torch.int32)
        self._graph("ggml_get_rows", stop - start)(index, decoded)
        return (rows if decoded is rows else rows.copy_(decoded)).T

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (n x k, float32, contiguous) times W by ggml's own products."""
        return self._graph("ggml_mul_mat", rows.shape[0])(rows, torch.empty(rows.shape[0], self.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.dtype)
        n = rows.shape[0]
        if n >= INT4_PREFILL_ROWS:
            y = _dequantised_gemm(rows, self.out_features, self.in_features, 1, self._dequantised_t)
        else:  # in a compiled step, as an op of its graph; eagerly, without the dispatcher's 10-20 us a call
            rows = rows.float().contiguous()
            y = torch.ops.hlm.ggml_mul_mat(rows, self.blocks, self.key) if torch.compiler.is_compiling() else \
                self.product(rows)
            y = y.to(self.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


# `hlm::ggml_mul_mat(rows, blocks, key)`: GgmlLinear `key`'s product, which `blocks` are the weights of, as an op a
# compiled step (`hlm.compiled`) calls as it is, fusing what lies around it. Defined through `torch.library`'s
# low-level API: `custom_op`'s checks cost 4-6 us a call more, up to 1 ms a step of the draft's 169 layers.
_GGML_LAYERS: weakref.WeakValueDictionary[int, GgmlLinear] = weakref.WeakValueDictionary()
_GGML_KEYS = itertools.count()
torch.library.define("hlm::ggml_mul_mat", "(Tensor rows, Tensor blocks, int key) -> Tensor")


@torch.library.impl("hlm::ggml_mul_mat", "cpu")
def _ggml_mul_mat(rows: torch.Tensor, blocks: torch.Tensor, key: int) -> torch.Tensor:
    return _GGML_LAYERS[key].product(rows)


@torch.library.register_fake("hlm::ggml_mul_mat")
def _ggml_mul_mat_fake(rows: torch.Tensor, blocks: torch.Tensor, key: int) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], blocks.shape[0])


class HeadRows:
    """A head on planes or ggml's blocks looked up as its weight matrix would be, `rows[index]`, decoding only
    those rows."""

    def __init__(self, head: PlanesLinear | GgmlLinear) -> None:
        self.head = head

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.head.rows(index)


def stored_blocks(model: nn.Module, recipe: str) -> dict[str, np.ndarray]:
    """The GGUF blocks `recipe` runs `model`'s layers on (q4k: Q4_K's; gguf: Q4_K's, Q5_0's and Q8_0's; ggml: Q6_K's
    too), from where it was loaded: a GGUF file, or a folder with `gguf_blocks.FILE`."""
    source = getattr(model, "hlm_source", None)
    if source is not None and source.suffix == ".gguf":
        blocks = gguf_blocks.from_gguf(model, source)
    elif source is not None and (source / gguf_blocks.FILE).is_file():
        from safetensors import safe_open

        # memory-mapped, not read: ggml runs the blocks in place, so its layers' pages are the file's, resident only
        # while read (`page_out` gives them back where llama.cpp drafts instead: `hlm.models.presets`)
        with safe_open(source / gguf_blocks.FILE, "pt") as stored:
            blocks = {name: stored.get_tensor(name).numpy() for name in stored.keys()}  # noqa: SIM118 - no __iter__
    else:
        return {}
    kinds = {"q4k": ("Q4_K",), "gguf": gguf_blocks.KINDS, "ggml": ggml_kernel.KINDS}[recipe]
    return {name: data for name, data in blocks.items() if block_kind(model, name, data) in kinds}


def block_kind(model: nn.Module, name: str, blocks: np.ndarray) -> str:
    """The GGUF format (Q4_K, Q5_0, Q8_0, Q6_K) of `blocks`, the blocks of `model`'s layer `name`."""
    layer = model.get_submodule(name)
    return gguf_blocks.kind(blocks, layer.out_features, layer.in_features)


def _fits_int4(linear: nn.Linear) -> bool:
    return linear.in_features % INT4_GROUP == 0 and linear.in_features % (INT4_INNER_K_TILES * 16) == 0


def swap_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Replace each Linear layer of `model`, in place, with `make(its name in its parent, the layer)`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(name, child))


@torch.no_grad()
def quantize(model: nn.Module, recipe: str, int8_only: tuple[str, ...] = ("lm_head",),
             keep: tuple[str, ...] = ()) -> nn.Module:
    """Replace the model's Linear layers in place with the recipe's; `int8_only` names stay int8 under int4, `keep`
    names (e.g. `q_proj`) stay as loaded (`scripts/guard_source.py --keep`: which layers a recipe's guard feels)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown quantisation {recipe!r}: use one of {', '.join(RECIPES)}")
    if recipe == "none":
        return model
    if recipe in BLOCK_RECIPES:
        return use_blocks(model, stored_blocks(model, recipe), recipe)
    def fast(name: str, child: nn.Linear) -> nn.Module:
        if name in keep:
            return child
        four = recipe == "int4" and _fits_int4(child) and not any(s in name for s in int8_only)
        return Int4Linear.fitted(child) if four else Int8Linear(child)

    swap_linears(model, fast)
    # What stays (embedding, norms) may still be views of the memory-mapped checkpoint, which would keep every
    # page of it that quantising read counted in the process's memory: give them storage of their own.
    for param in model.parameters():
        param.data = param.data.clone()
    model.hlm_quant = recipe
    return model


def use_blocks(model: nn.Module, blocks: dict[str, np.ndarray], recipe: str) -> nn.Module:
    """Each layer named in `blocks` (`stored_blocks`) runs on them: on ggml (`recipe` ggml), else Q4_K as one 4-bit
    plane, Q5_0 and Q8_0 as two.
    Their float weights are never read, so pages of a memory-mapped checkpoint that held them never become resident;
    the rest stays as loaded."""
    if not blocks:
        what = "Q4_K" if recipe == "q4k" else "GGUF"
        raise QuantError(f"--quant {recipe} needs the model's {what} blocks: a .gguf file, or a converted folder with "
                         f"{gguf_blocks.FILE} (the embedded pair); {getattr(model, 'hlm_name', 'this model')} has "
                         "none")
    if recipe == "ggml" and not ggml_kernel.available():
        raise QuantError("--quant ggml needs ggml-python (pip install ggml-python, which builds ggml: it needs cmake "
                         "and a C compiler)")
    for name, data in blocks.items():
        parent, _, child = name.rpartition(".")
        holder, kind = model.get_submodule(parent), block_kind(model, name, data)
        linear = getattr(holder, child)
        if recipe == "ggml":
            setattr(holder, child, GgmlLinear(linear, data, kind))
        else:
            setattr(holder, child, Int4Linear.q4k(linear, data) if kind == "Q4_K" else PlanesLinear(linear, data, kind))
    model.hlm_quant = recipe
    return model


def recipe_of(why: str) -> str:
    """The recipe a fast path's `why` (`ModelPair.quant`) starts with: its first word, as the numerics key reads it
    (so "q4k, 168 layers (...)" reads "q4k,": cached results are keyed by that)."""
    return why.split(" ")[0]


STREAMED_BYTES = 256 << 20  # weights a timed layer cycles through (`streamed_seconds`): more than any last-level cache
# A load-time timing in which this process got under BUSY_SHARE of its threads' CPU time measured whatever else held
# the cores, not the kernels (2 cores, another app decoding: bf16 4.6 against fp32's 2.9 ms, and this app loaded in
# fp32, 10 GB and half as fast); it is taken again BUSY_PAUSE_S later, TIMING_ATTEMPTS times in all, then `Busy`
BUSY_SHARE = 0.7
TIMING_ATTEMPTS = 2
BUSY_PAUSE_S = 1.0


class Busy(RuntimeError):
    """Every attempt at a load-time timing ran while another process held the cores: the caller takes its
    default, and says so."""


class Streamed(NamedTuple):
    """A layer to time (`streamed_seconds`): `run` passes the same rows through each of `copies` made-up copies."""

    run: Callable[[], None]
    copies: int


def float_layer(n: int, k: int, dtype: torch.dtype) -> Streamed:
    """One row through an n x k float layer."""
    return float_passes(n, k, dtype, (1,))[0]


def _streamed_copies(n: int, k: int, dtype: torch.dtype) -> int:
    """Copies of an n x k float layer that together fill STREAMED_BYTES: its int4 stand-in is timed over as many."""
    return max(1, STREAMED_BYTES // (n * k * dtype.itemsize))


def float_passes(n: int, k: int, dtype: torch.dtype, rows: Sequence[int]) -> list[Streamed]:
    """A pass of each of `rows` row counts through an n x k float layer, all over the same copies (one set of
    STREAMED_BYTES in memory, not one per count)."""
    copies = _streamed_copies(n, k, dtype)
    floats = [torch.full((n, k), 0.01, dtype=dtype) for _ in range(copies)]

    def passes(x: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            for w in floats:
                F.linear(x, w)
        return run

    return [Streamed(passes(torch.randn(count, k, dtype=dtype)), copies) for count in rows]


def int4_layer(n: int, k: int, dtype: torch.dtype, planes: int = 1) -> Streamed:
    """One row through the int4 kernel for an n x k layer; `planes` = 2: the int4 layer of 2n rows a `PlanesLinear`
    runs, with the sum of its halves."""
    copies = _streamed_copies(n, k, dtype)
    x = torch.randn(1, k, dtype=dtype)
    int4 = Int4Linear(torch.randint(0, 16, (planes * n, k), dtype=torch.int32), torch.rand(planes * n, k // INT4_GROUP),
                      torch.rand(planes * n, k // INT4_GROUP), None, dtype)
    int4s = [copy.deepcopy(int4) for _ in range(copies)]

    def run() -> None:
        for layer in int4s:
            y = layer(x)
            _ = y if planes == 1 else y[..., :n] + y[..., n:]

    return Streamed(run, copies)


def ggml_layer(n: int, k: int, dtype: torch.dtype, kind: str) -> Streamed:
    """One row through ggml for an n x k layer stored as `kind`, over as many copies as its float layer."""
    copies = _streamed_copies(n, k, dtype)
    x = torch.randn(1, k, dtype=dtype)
    shape = nn.Linear(k, n, bias=False, device="meta", dtype=dtype)
    layers = [GgmlLinear(shape, ggml_kernel.random_blocks(kind, n, k, seed), kind) for seed in range(copies)]

    def run() -> None:
        for layer in layers:
            layer(x)

    return Streamed(run, copies)


def streamed_seconds(*layers: Streamed, repeats: int = 5) -> list[float]:
    """Median seconds per layer of each of `layers`, on made-up weights: what a kernel or dtype choice changes in a
    decode step, measured without reading a model's own weights. A step streams every layer from memory, so each is
    timed over copies that together outgrow the cache (one 4,864 x 896 layer alone stays in it: bf16 measured
    0.19 ms there against 0.59 streamed, which turned a choice around). The layers are timed in turn, round after
    round, so a moment of noise on this shared machine falls on all of them, not on the one timed then; a timing
    this process did not get its cores for is taken again, and raises `Busy` if it never does (BUSY_SHARE)."""
    threads = torch.get_num_threads()
    for attempt in range(TIMING_ATTEMPTS):
        if attempt:
            time.sleep(BUSY_PAUSE_S)
        cpu, wall = time.process_time(), time.perf_counter()
        with torch.inference_mode():
            medians = median_seconds([layer.run for layer in layers], repeats)
        share = (time.process_time() - cpu) / (time.perf_counter() - wall) / threads
        if share >= BUSY_SHARE:
            return [median / layer.copies for median, layer in zip(medians, layers, strict=True)]
    raise Busy(f"this process got {share:.0%} of its {threads} threads' time while timing: the cores were busy")


def median_seconds(ops: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of `repeats` calls of each of `ops`, called in turn, after one untimed call of each
    (first-call costs: allocation, caches)."""
    for op in ops:
        op()
    times: list[list[float]] = [[] for _ in ops]
    for _ in range(repeats):
        for op, taken in zip(ops, times, strict=True):
            t0 = time.perf_counter()
            op()
            taken.append(time.perf_counter() - t0)
    return [statistics.median(taken) for taken in times]


@torch.inference_mode()
def step_seconds(model: nn.Module, steps: int = 6, context: int = 32, rows: int = 1) -> float:
    """Median seconds of one cached decode step of `rows` new tokens, each with its logits, after a short prefill:
    one row is what drafting and verifying repeat; more, what a verifier's call after drafts kept locally reads, or
    as many runs decoded side by side would (`bench`'s rows section)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache, ids = DynamicCache(), torch.arange(1, context + 1, device=device)[None]
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    positions = iter(range(steps + 1))

    def step() -> None:
        i = next(positions)
        if rows == 1:
            decode_step(model, ids[:, i:i + 1], cache)
        else:
            model(input_ids=ids[:, :rows] + i, cache=cache, use_cache=True, logits_to_keep=rows)

    return median_seconds([step], steps)[0]


def decode_step(model: nn.Module, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """One cached decode pass over `ids` (one token), on the model's compiled step where it has one
    (`hlm.compiled`, as the drafter runs it): the next position's logits, (vocab,)."""
    compiled = getattr(model, "hlm_step", None)
    if compiled is not None and ids.shape[1] == 1:
        return compiled(ids, cache)[0][0]
    return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]


def _decoded_log_probs(model: nn.Module, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Log-probabilities of the tokens from `start` on, computed as decoding computes them: the prompt in one pass,
    then one token a step on the cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    logits = [model(input_ids=ids[:, :start], cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]]
    for t in range(start, ids.shape[1] - 1):
        logits.append(decode_step(model, ids[:, t:t + 1], cache))
    return F.log_softmax(torch.stack(logits).float(), -1)


class Agreement(NamedTuple):
    """What the quality guard measured: the counts beside the rates, because near its 99 % bar a handful of
    positions decides the verdict."""

    top1: float  # the share of positions where both models' argmax agree
    kl: float  # mean KL(p_ref || p_fast), nats
    positions: int
    apart: int  # positions whose argmax differs


@torch.inference_mode()
def quality(reference: nn.Module, fast: nn.Module | LlamaDraft, sequences: list[list[int]],
            start: list[int]) -> Agreement:
    """Top-1 agreement and mean KL(p_ref || p_fast) over the positions from `start[i]` on of each sequence,
    teacher-forced: both models read the same ids, so every position is compared under the same context. Each
    answer position comes from a one-token step on the cache, as in decoding: one pass over the whole sequence
    would run a quantised layer's prompt path (dequantised weights, float GEMM) where decoding runs its kernel.
    `fast` is a model, or a draft on llama.cpp (`hlm.llamacpp.LlamaDraft`, which computes its own `log_probs`)."""
    agree, kl, n = 0, 0.0, 0
    for ids, s in zip(sequences, start, strict=True):
        x = torch.tensor([ids], device=next(reference.parameters()).device)
        ref = _decoded_log_probs(reference, x, s)
        out = _decoded_log_probs(fast, x, s) if isinstance(fast, nn.Module) else fast.log_probs(ids, s)
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        kl += float((ref.exp() * (ref - out)).sum())
        n += ref.shape[0]
    return Agreement(agree / n, kl / n, n, n - agree)
