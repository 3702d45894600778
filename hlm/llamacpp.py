"""The draft model on llama.cpp (`llama-cpp-python`): a whole decode step as one native graph.

Why: the transformers draft on ggml's products (`hlm.ggml_kernel`) spends about half of its step in Python around
them (transformers' modules, dtype conversions, 169 ggml calls a token); llama.cpp runs the step as one graph of the
same kernels: 34-38 ms against 72-80 ms a step for the embedded 0.5B on a 2-core AVX2 machine (docs/speed.md). It
reads the GGUF the embedded draft was converted from, so the weights are the ggml path's, block for block. Its KV
cache is kept in float32: with llama.cpp's default float16 cache the greedy guard against bf16 fell to 98.71 %
(99.14 % in float32, as on the ggml path).

Contract: `hlm.drafter.Drafter`'s (`prefill`, `forward`, `rollback`, `length`, `remembered`). The final hidden state,
which the judge reads, is llama.cpp's embeddings output (the normed state its head reads). Prompt reads are kept as
`hlm.prefix` keeps the transformers draft's (`LlamaDraft`), and Stop cuts a prompt read within one node of the graph
(llama.cpp's abort callback).

Attention weights: llama.cpp's API returns none, but its graph computes them where flash attention is off (the
`kq_soft_max-<layer>` nodes). A drafter made for runs that read attention (the default estimator's eight heads, RAUQ's,
the paper-literal rows) runs with flash attention off and copies the asked layers' nodes out of the graph as they are
computed (llama.cpp's `cb_eval`), in the steps that ask for them: 1-2 ms a step, where the transformers draft's step
costs 16-23 ms more (docs/speed.md). A token's KV cell is its position (one sequence, cells filled in order, rollback
and restored reads included), so the weights come back in the transformers draft's shape. Their numbers differ from
that draft's (by under 0.01 on the default's feature), so runs that read them are keyed apart
(`ModelPair.attention_path`). Such a drafter reads its prompt without flash attention too, into reads kept apart:
llama.cpp keeps V transposed there, and a sequence saved with flash attention does not restore without it.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import weakref
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hlm import native, prefix
from hlm.drafter import Pass
from hlm.energy import EnergyMeter, Window, measure
from hlm.quant import median_seconds

CHUNK = 512  # prompt tokens a pass: llama.cpp's default batch
CPU = torch.device("cpu")
KV_VALUE_BYTES = 4  # the drafters' KV cache holds float32 (GGML_TYPE_F32): why, above


@functools.cache
def available() -> bool:
    """Whether `llama-cpp-python` imports (a C++ library built at install; without it the draft keeps ggml's
    products under transformers)."""
    native.load()
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def _lib() -> Any:
    native.load()
    import llama_cpp

    return llama_cpp


@functools.cache
def _backend() -> Any:
    """Start llama.cpp once, its log (every load and context, on stderr) silenced: errors come back as statuses."""
    lib = _lib()
    silent = lib.llama_log_callback(lambda _level, _text, _data: None)
    lib.llama_log_set(silent, None)
    lib.llama_backend_init()
    return silent  # kept alive with the cache: llama.cpp holds the pointer


@functools.cache
def _amx() -> bool:
    """Whether llama.cpp's CPU backend runs AMX, as llama.cpp reports its build (a native build on a CPU with AMX; the
    Docker image's build for AVX2 has none). Its AMX weight buffer segfaults in the first product (llama.cpp issue
    20824, open; reproduced with llama-cpp-python 0.3.36 on a Xeon with AMX, the embedded draft's Q4_K_M GGUF), so
    there the weights load without the extra buffer types (`LlamaDraft`)."""
    return b"AMX_INT8 = 1" in _lib().llama_print_system_info()


class _Tensor(ctypes.Structure):
    """The head of ggml's `struct ggml_tensor` (ggml.h): its type, buffer and shape (elements per axis, fastest
    first)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4)]


@functools.cache
def _ggml() -> Any:
    """The ggml of llama-cpp-python's build (already open: `hlm.native.load`), for a graph node's name and data."""
    folder = native.library_folder("llama_cpp")
    base = ctypes.CDLL(str(folder / "libggml-base.so"))
    base.ggml_get_name.restype, base.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    base.ggml_get_data_f32.restype = ctypes.POINTER(ctypes.c_float)
    base.ggml_get_data_f32.argtypes = [ctypes.c_void_p]
    return base


@dataclass
class Read:
    """A prompt read, kept: the sequence's KV cache as llama.cpp saves it, what the pass returned (the hidden state
    always), and the time and energy it took when it was computed."""

    state: bytes
    read: Pass
    cost: Window


class LlamaDraft:
    """A GGUF loaded once a process (weights memory-mapped), shared by the contexts of its drafters, with the prompt
    reads they made last, kept as the transformers draft's are (`hlm.prefix.Kept`): the chat template's head, read
    once as its own pass, and the latest prompts; apart for the drafters that read attention weights (flash attention
    off computes other numbers)."""

    def __init__(self, path: Path, head: tuple[int, ...] = ()) -> None:
        lib = _lib()
        _backend()
        params = lib.llama_model_default_params()
        params.use_extra_bufts = not _amx()  # AMX's buffer crashes (`_amx`); elsewhere llama.cpp's default
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise OSError(f"llama.cpp cannot load {path}")
        weakref.finalize(self, lib.llama_model_free, self.model)
        self.path, self.head = path, head
        self.vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.width = lib.llama_model_n_embd(self.model)
        self.layers = lib.llama_model_n_layer(self.model)
        self.reads: dict[bool, prefix.Kept[Read]] = {False: prefix.Kept(), True: prefix.Kept()}  # by `weights`

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one token holds in the drafters' KV cache."""
        lib, model = _lib(), self.model
        head_dim = self.width // lib.llama_model_n_head(model)
        return 2 * self.layers * lib.llama_model_n_head_kv(model) * head_dim * KV_VALUE_BYTES

    def recall(self, ids: tuple[int, ...], meter: EnergyMeter | None, weights: bool = False) -> Read | None:
        """The kept read of exactly `ids` by a drafter of that kind, unless a meter asks for energy it was read
        without."""
        return self.reads[weights].get(ids, lambda kept: meter is None or kept.cost.joules is not None)

    def drafter(self, capacity: int, weights: bool = False) -> LlamaCppDrafter:
        """A fresh drafter (its own KV cache) for a run of at most `capacity` tokens, prompt included; with `weights`,
        one whose passes return the attention weights of the layers asked (flash attention off)."""
        return LlamaCppDrafter(self, capacity, weights)

    def log_probs(self, ids: list[int], start: int) -> torch.Tensor:
        """Log-probabilities of the tokens from `start` on, as decoding computes them (the prompt in one read, then
        one token a step): what the quality guard compares (`hlm.quant.quality`)."""
        drafter = self.drafter(len(ids))
        logits = [drafter.prefill(ids[:start]).logits]
        logits += [drafter.forward([token]).logits for token in ids[start:-1]]
        return torch.log_softmax(torch.stack(logits).float(), -1)

    def step_seconds(self, steps: int, context: int, layers: Collection[int] = ()) -> float:
        """Median seconds of one cached decode step after a prefill of `context` tokens (`hlm.quant.step_seconds`,
        on llama.cpp), each step returning the attention weights of `layers`."""
        drafter = self.drafter(context + steps + 1, weights=bool(layers))
        drafter.prefill(list(range(1, context + 1)))
        tokens = iter(range(context + 1, context + steps + 2))
        return median_seconds([lambda: drafter.forward([next(tokens)], layers)], steps)[0]


class LlamaCppDrafter:
    """One generation's drafter on llama.cpp: its own context (KV cache), one token a pass after the prompt."""

    def __init__(self, draft: LlamaDraft, capacity: int, weights: bool = False) -> None:
        lib = _lib()
        self.draft, self.capacity, self.remembered, self.weights = draft, capacity, None, weights
        self._cancel: threading.Event | None = None
        # Called between the graph's nodes while a prompt is read (a Python call a node: not while decoding), so a
        # set cancel event stops the read there (llama_decode returns 2).
        # The callbacks reach the drafter by a weak reference: a cycle through them would keep its context (its KV
        # cache and compute buffers, outside Python's heap) until a full collection, and HumanEval's 328 runs
        # grew a process to 23 GB that way.
        me = weakref.ref(self)
        self._abort = lib.ggml_abort_callback(lambda _data: me()._cancelled())
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = capacity, CHUNK, CHUNK
        params.n_threads = params.n_threads_batch = torch.get_num_threads()
        params.type_k = params.type_v = lib.GGML_TYPE_F32
        params.no_perf = True
        self._nodes = {f"kq_soft_max-{layer}".encode(): layer for layer in range(draft.layers)}
        self._asked: Collection[int] = ()  # the layers whose weights the running pass copies out
        self._copied: dict[int, np.ndarray] = {}
        if weights:
            params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # flash attention never forms the weights
            self._observe = lib.ggml_backend_sched_eval_callback(lambda node, ask, _data: me()._copy(node, ask))
            params.cb_eval = self._observe
        self.context = lib.llama_init_from_model(draft.model, params)
        if not self.context:
            raise MemoryError(f"llama.cpp could not make a context of {capacity:,} tokens")
        self.batch = lib.llama_batch_init(CHUNK, 0, 1)
        weakref.finalize(self, _free, lib, self.context, self.batch)
        self._length = 0

    @property
    def length(self) -> int:
        """Tokens held in the KV cache."""
        return self._length

    def _cancelled(self) -> bool:
        return self._cancel is not None and self._cancel.is_set()

    def _copy(self, node: int, ask: bool) -> bool:
        """llama.cpp's eval callback: asked first, node by node, which ones to see once computed (the weights of the
        layers the pass asks for), then shown each of those (copied; True: go on)."""
        layer = self._nodes.get(_ggml().ggml_get_name(node))
        if layer is None or layer not in self._asked:
            return not ask
        if not ask:
            ne = _Tensor.from_address(node).ne  # (KV cells, new tokens, heads, 1)
            data = np.ctypeslib.as_array(_ggml().ggml_get_data_f32(node), (ne[0] * ne[1] * ne[2] * ne[3],))
            self._copied[layer] = data.reshape(ne[3], ne[2], ne[1], ne[0])[..., :self._length + ne[1]].copy()
        return True

    def _pass(self, ids: list[int], hidden: bool, layers: Collection[int] = ()) -> Pass:
        """Read `ids` after the cache, CHUNK at a time: the last position's logits and, if asked, the hidden state
        and the attention weights of `layers` (as `hlm.drafter.Pass` holds them: a token's cell is its position)."""
        lib, batch = _lib(), self.batch
        if self._length + len(ids) > self.capacity:
            raise ValueError(f"the draft's context holds {self.capacity:,} tokens; {self._length + len(ids):,} asked")
        if layers and (not self.weights or len(ids) > CHUNK):
            raise ValueError("this llama.cpp drafter returns no attention weights" if not self.weights else
                             f"attention weights come back for at most {CHUNK} new tokens a pass")
        self._asked, self._copied = layers, {}
        lib.llama_set_embeddings(self.context, hidden)
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, self._length + i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, False
            batch.logits[len(chunk) - 1] = True
            batch.n_tokens = len(chunk)
            status = lib.llama_decode(self.context, batch)
            if status == 2:
                raise prefix.Cancelled
            if status != 0:
                raise RuntimeError(f"llama.cpp failed to decode (status {status})")
            self._length += len(chunk)
        logits = torch.from_numpy(np.ctypeslib.as_array(lib.llama_get_logits_ith(self.context, -1),
                                                        (self.draft.vocab,)).copy())
        state = torch.from_numpy(np.ctypeslib.as_array(lib.llama_get_embeddings_ith(self.context, -1),
                                                       (self.draft.width,)).copy()) if hidden else None
        self._asked = ()
        if not layers:
            return Pass(logits, None, state)
        return Pass(logits, tuple(torch.from_numpy(self._copied[i]) if i in layers else None
                                  for i in range(self.draft.layers)), state)

    def forward(self, ids: list[int], layers: Collection[int] = (), hidden: bool = False) -> Pass:
        """Process `ids` after the cached context: the next position's logits, the attention weights of the `layers`
        named (a drafter made with `weights` only) and, if asked, the hidden state."""
        return self._pass(ids, hidden, layers)

    def prefill(self, ids: list[int], progress: prefix.Progress | None = None, hidden: bool = False,
                meter: EnergyMeter | None = None) -> Pass:
        """Empty the cache and read the prompt: the template's head as its own pass (kept once), then the rest, so a
        run's numbers never depend on what ran before; a prompt read before comes back as it was, and `remembered`
        is then its cost (else None). Raises `hlm.prefix.Cancelled` inside a set `hlm.prefix.stopping`."""
        lib, key = _lib(), tuple(ids)
        lib.llama_memory_clear(lib.llama_get_memory(self.context), True)
        self._length, self.remembered = 0, None
        kept = self.draft.recall(key, meter, self.weights)
        if kept is None:
            self._cancel = prefix.cancel_event()
            if self._cancel is not None:
                lib.llama_set_abort_callback(self.context, self._abort, None)
            try:
                with measure(CPU, meter) as cost:
                    head = self.draft.head
                    if head and len(ids) > len(head) and key[:len(head)] == head:
                        self._read(head, meter)
                    read = self._pass(ids[self._length:], hidden=True)
            finally:
                if self._cancel is not None:
                    lib.llama_set_abort_callback(self.context, lib.ggml_abort_callback(), None)
                self._cancel = None
            kept = Read(self._state(), read, cost)
            self.draft.reads[self.weights].put(key, kept)
        else:
            self._restore(kept.state, len(ids))
            self.remembered = kept.cost
        if progress is not None:
            progress(len(ids), len(ids))
        return kept.read if hidden else kept.read._replace(hidden=None)

    def _read(self, ids: tuple[int, ...], meter: EnergyMeter | None) -> None:
        """Put the read of `ids` in the empty cache: kept, or computed now and kept."""
        kept = self.draft.recall(ids, meter, self.weights)
        if kept is not None:
            self._restore(kept.state, len(ids))
            return
        with measure(CPU, meter) as cost:
            read = self._pass(list(ids), hidden=True)
        self.draft.reads[self.weights].put(ids, Read(self._state(), read, cost))

    def _state(self) -> bytes:
        """The cache's sequence as llama.cpp saves it."""
        lib = _lib()
        buffer = (ctypes.c_uint8 * lib.llama_state_seq_get_size(self.context, 0))()
        written = lib.llama_state_seq_get_data(self.context, buffer, len(buffer), 0)
        return ctypes.string_at(buffer, written)

    def _restore(self, state: bytes, length: int) -> None:
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if _lib().llama_state_seq_set_data(self.context, buffer, len(state), 0) != len(state):
            raise RuntimeError("llama.cpp could not restore a kept prompt read")
        self._length = length

    def rollback(self, n_tokens: int) -> None:
        """Drop the newest `n_tokens` from the cache."""
        if n_tokens:
            self._length -= n_tokens
            lib = _lib()
            lib.llama_memory_seq_rm(lib.llama_get_memory(self.context), 0, self._length, -1)


def _free(lib: Any, context: ctypes.c_void_p, batch: Any) -> None:
    lib.llama_batch_free(batch)
    lib.llama_free(context)
