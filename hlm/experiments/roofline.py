"""How close a decode step runs to this machine's memory-bandwidth limit (`python -m hlm bench`, section `limit`).

A cached decode step reads every weight once and the KV cache, and does little arithmetic per byte, so on a CPU
its floor is bytes read / memory bandwidth. `decode_bytes` counts those bytes from what the model stores;
`measure_bandwidth` measures the bandwidth in the same process. bytes/token x tok/s / bandwidth is then the
fraction of the bound a step reaches: near 1, only fewer bytes can help; far below, the time goes elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from gguf import GGUFReader
from torch import nn

if TYPE_CHECKING:
    from hlm.llamacpp import LlamaDraft


@dataclass(frozen=True)
class DecodeBytes:
    """Bytes one cached decode step reads."""

    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def decode_bytes(model: nn.Module, context: int) -> DecodeBytes:
    """The bytes one cached decode step reads with `context` tokens in the cache.

    Weights: every tensor the model stores (its state dict: Linear layers at their stored size, int8/int4 codes
    with their scales, biases, norms), once per storage. The input embedding reads only the row it looks up, unless
    the output head reads the same matrix: a tied head (`config.tie_word_embeddings`) reads all of it, counted
    once. The storages decide, not the config: the fast path gives a tied head int8 storage of its own, and the
    embedding then reads one row again. KV cache: keys and values of every layer over the context, in the
    embedding's (the activations') dtype."""
    tensors = list(model.state_dict(keep_vars=True).values())
    embedding = model.get_input_embeddings().weight
    row_only = sum(t.data_ptr() == embedding.data_ptr() for t in tensors) == 1  # nothing else reads it: untied
    seen: set[tuple[int, int]] = set()
    weights = 0
    for t in tensors:
        if (t.data_ptr(), t.numel()) in seen:
            continue
        seen.add((t.data_ptr(), t.numel()))
        stored = t.numel() * t.element_size()
        weights += stored // t.shape[0] if row_only and t.data_ptr() == embedding.data_ptr() else stored
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * context * embedding.element_size()
    return DecodeBytes(weights, kv)


def gguf_decode_bytes(draft: LlamaDraft, context: int) -> DecodeBytes:
    """`decode_bytes` of a step on llama.cpp: every tensor as its GGUF stores it, the input embedding one row where
    the file has an output head of its own (else the head reads all of it), and its KV cache as llama.cpp holds it."""
    stored = {t.name: int(t.n_bytes) for t in GGUFReader(draft.path).tensors}
    embedding = stored["token_embd.weight"]
    unread = embedding - embedding // draft.vocab if "output.weight" in stored else 0
    return DecodeBytes(sum(stored.values()) - unread, draft.kv_bytes_per_token * context)


@dataclass(frozen=True)
class Bandwidth:
    """Memory bandwidth measured here, GB/s (1e9 bytes), two ways."""

    read_gbs: float  # sum() over the buffer: bytes read
    copy_gbs: float  # copy_() of one half into the other: bytes read + bytes written
    mib: int
    repeats: int
    threads: int

    @property
    def bound(self) -> float:
        """The higher of the two: a fraction of it never flatters a model."""
        return max(self.read_gbs, self.copy_gbs)


def _best_seconds(op: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.inference_mode()
def measure_bandwidth(mib: int = 1024, repeats: int = 5) -> Bandwidth:
    """Best of `repeats` of a read-dominated `sum()` over an fp32 buffer of `mib` MiB (far larger than a last-level
    cache, so it streams from memory) and of `copy_()` between its halves, with the torch threads the models use."""
    buf = torch.ones(mib * 2**20 // 4)  # written once here, so no page fault lands in a timed pass
    src, dst = buf.chunk(2)
    read = buf.nbytes / _best_seconds(buf.sum, repeats)
    copy = 2 * src.nbytes / _best_seconds(lambda: dst.copy_(src), repeats)
    return Bandwidth(read / 1e9, copy / 1e9, mib, repeats, torch.get_num_threads())
