"""The verifier's short passes, each row computed exactly as a one-row pass computes it.

The LLM alone reads one token a pass; the hybrid's verifier reads the drafts the device kept in one pass (a sync,
`hlm.verifier`). Greedy HLM promises the LLM's own tokens, so a row must not depend on the rows beside it. On CPU two
kernels break that: SDPA over a masked block of query rows sums in another order than over one row, and a float
GEMM's blocking (oneDNN) depends on its row count. On the embedded pair's q4k verifier a sync's logits differed by
up to 0.19 from one-row passes over the same tokens, enough to flip a near-tie: 8 of the 28 prompts on which `ours`
left the LLM alone in the held-back end-to-end check left it at a token the verifier chose (docs/selection.md).

So the verifier loads with KERNEL, whose attention runs a pass of a few rows one query row at a time (each over the
keys up to its own, as a one-row step sees them), and its float layers become `BlockLinear`, which multiplies rows in
zero-padded blocks of a fixed size: a row's product is then the same in any block (`tests/test_rows.py` and
`tests/test_embedded_pair.py` check it where they run). The size is BLOCK where a block costs about one row (oneDNN,
GPUs), else 1 (`block_rows`). The int8 and int4 kernels
(`hlm.quant`) already compute row by row below their prefill thresholds, so every layer is exact up to EXACT_ROWS
rows, and the verifier syncs at most that many rows a pass. Prompt chunks, read the same way by every run, keep the
fast paths.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hlm import timings
from hlm.config import ConfigError
from hlm.quant import (
    INT4_PREFILL_ROWS,
    PREFILL_ROWS,
    Busy,
    float_passes,
    onednn_bf16,
    streamed_seconds,
    swap_linears,
)

KERNEL = "sdpa+exact-rows"
EXACT_ROWS = min(PREFILL_ROWS, INT4_PREFILL_ROWS) - 1  # the int8 kernel's last row count before it dequantises
BLOCK = 4  # rows per float GEMM where a block of them costs about one row (`block_rows`)
BLOCK_ENV = "HLM_BLOCK_ROWS"  # a block to take instead of measuring one: processes that must agree (Ray workers)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA; for one sequence of 2 to EXACT_ROWS query rows (the verifier's syncs: no padding, so its mask is the
    causal one this slicing gives), one row at a time over the keys up to its own. A padded batch (the study's
    batched answers) keeps SDPA with its mask."""
    q, k = query.shape[2], key.shape[2]
    if query.shape[0] != 1 or not 1 < q <= EXACT_ROWS:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = [sdpa_attention_forward(module, query[:, :, i:i + 1], key[:, :, :k - q + i + 1],
                                   value[:, :, :k - q + i + 1], None, **kwargs)[0] for i in range(q)]
    return torch.cat(rows, 1), None


AttentionInterface.register(KERNEL, _attention)
AttentionMaskInterface.register(KERNEL, sdpa_mask)


@functools.cache
def block_rows(device_type: str, dtype: torch.dtype) -> int:
    """Rows per float GEMM of a short pass: BLOCK where BLOCK rows cost at most twice one row, else 1 (each row its
    own one-row product, exact too). Twice is the middle: a block that costs c rows loses c-fold on a one-token pass
    and gains 4/c-fold on a full block. Measured once a process on a CPU (an 8,960 x 1,536 layer, streamed): with
    oneDNN's bf16 the block costs about one row; with AVX2 alone torch's bf16 product is bound by arithmetic, four
    rows cost four, and a one-token pass in blocks of 4 multiplied three rows of zeros (docs/speed.md); where the
    two sides time near the middle, the timing is kept for later loads (`hlm.timings`). A GPU reads the weights once
    for a few rows."""
    if device_type != "cpu":
        return BLOCK
    try:
        (one, block), _ = timings.kept(
            "block rows", lambda: streamed_seconds(*float_passes(8960, 1536, dtype, (1, BLOCK))), str(dtype), BLOCK)
    except Busy:  # untimed: the block oneDNN's bf16 runs at the cost of a row, one row each without it
        return BLOCK if onednn_bf16() else 1
    return BLOCK if block <= 2 * one else 1


def pinned_block() -> int | None:
    """$HLM_BLOCK_ROWS, if set. A timing near the middle (fp32 on one AMX machine: a block cost 2.1-2.3 rows) comes
    out either way, most of all in two processes timing at once; the workers of one run must multiply alike."""
    if not (value := os.environ.get(BLOCK_ENV)):
        return None
    if not value.isdigit() or not 1 <= int(value) <= EXACT_ROWS:
        raise ConfigError(f"${BLOCK_ENV} must be a whole number of rows from 1 to {EXACT_ROWS}, not {value!r}")
    return int(value)


class BlockLinear(nn.Module):
    """A float Linear whose passes of up to EXACT_ROWS rows multiply in zero-padded blocks of `block` rows; longer
    ones (prompt chunks) in one GEMM. Wraps the layer itself (no copy; a tied lm-head stays tied), which may later run
    on a packed weight (`hlm.quant.PackedLinear`: the same products)."""

    def __init__(self, linear: nn.Linear, block: int = BLOCK) -> None:
        super().__init__()
        self.linear, self.block = linear, block
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        n = rows.shape[0]
        if n > EXACT_ROWS:
            return self.linear(x)
        padded = torch.cat([rows, rows.new_zeros(-n % self.block, self.in_features)])
        y = torch.cat([self.linear(padded[i:i + self.block]) for i in range(0, len(padded), self.block)])
        return y[:n].reshape(*x.shape[:-1], self.out_features)


def exact_rows(model: nn.Module) -> nn.Module:
    """Make `model`'s float Linear layers `BlockLinear`, in place (load it with KERNEL attention), in blocks of
    `block_rows` for its device and dtype, or of $HLM_BLOCK_ROWS where set, recorded as `model.hlm_block_rows` (the
    numerics key names it)."""
    if model.config._attn_implementation != KERNEL:
        raise ValueError(f"exact rows need the {KERNEL!r} attention, not {model.config._attn_implementation!r}")
    if not any(isinstance(m, BlockLinear) for m in model.modules()):  # once: its layers would nest again
        block = pinned_block() or block_rows(model.device.type, model.dtype)
        swap_linears(model, lambda _name, linear: BlockLinear(linear, block))
        model.hlm_block_rows = block
    return model
