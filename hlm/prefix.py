"""Prefilling a prompt: the chat template's fixed head once per model, the rest in chunks that Stop can cut.

Every prompt starts with the same template tokens (Qwen's default system prompt and the user turn's opening:
about 20 of a short prompt's ~40), and prefilling the prompt in both models is most of the time to the first
token. So each model keeps the head's KV and every run starts from a copy of it. The head is always processed
as its own pass, warm or not, so a run's numbers never depend on what ran before (same seed, same tokens).

The rest goes in chunks of CHUNK tokens: memory is then the KV cache plus one chunk's attention, not attention
over the whole prompt (eager attention wanted 10 GB for a 25,000-token prompt in one pass; a prefill asks for no
attention weights, so both models run SDPA here, `hlm.drafter`), and each decoder layer checks the caller's cancel
event, so Stop cuts even a long prefill within one layer's work.

Both models also remember the prompts they read last (`read`): the page runs one prompt through several policies
(Compare, Show me), and the start-up build reads the examples, so most prompt reads repeat one.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar
from weakref import WeakKeyDictionary

import torch
from transformers import DynamicCache, PreTrainedModel

from hlm.energy import EnergyMeter, Window, measure

_HEADS: WeakKeyDictionary[PreTrainedModel, tuple[tuple[int, ...], DynamicCache]] = WeakKeyDictionary()
_LOCK = threading.Lock()


def template_head(render: list[int], other: list[int]) -> tuple[int, ...]:
    """The ids two renderings of different messages share from the start: the part no message changes."""
    return tuple(os.path.commonprefix([render, other]))  # element-wise on any sequences, not only paths


@torch.inference_mode()
def start(model: PreTrainedModel, ids: list[int], head: tuple[int, ...]) -> tuple[DynamicCache, int]:
    """A fresh cache for a run over `ids` and how many of them it already holds (the head, when `ids` begins
    with it and goes beyond it; else none)."""
    n = len(head)
    if not n or len(ids) <= n or tuple(ids[:n]) != head:
        return DynamicCache(), 0
    with _LOCK:
        entry = _HEADS.get(model)
        if entry is None or entry[0] != head:
            cache = DynamicCache()
            model(input_ids=torch.tensor([list(head)], device=model.device), cache=cache, use_cache=True,
                  logits_to_keep=1)
            _HEADS[model] = entry = (head, cache)
        return copy.deepcopy(entry[1]), n


# Fewer, longer chunks: each pass copies the growing KV cache, and a quantised layer dequantises once per chunk
# (`hlm.quant`): 6,000 tokens into the int8 draft took 9.1 s in chunks of 1,024 against 12.0 s in chunks of 256.
CHUNK = 1024
Progress = Callable[[int, int], None]  # (prompt tokens read, prompt tokens) after each chunk
_STOP = threading.local()  # this thread's cancel event while it prefills (models are shared between threads)


class Cancelled(Exception):
    """The caller's cancel event was set during a prefill."""


def cancel_event() -> threading.Event | None:
    """The cancel event of this thread's `stopping` block, if any."""
    return getattr(_STOP, "event", None)


def _check(module: torch.nn.Module, args: tuple) -> None:  # noqa: ARG001 - forward pre-hook signature
    event = cancel_event()
    if event is not None and event.is_set():
        raise Cancelled


@contextlib.contextmanager
def stopping(cancel: threading.Event | None) -> Iterator[None]:
    """While inside, every watched model's layer in this thread raises `Cancelled` once `cancel` is set."""
    outer, _STOP.event = cancel_event(), cancel
    try:
        yield
    finally:
        _STOP.event = outer


def _watched(model: PreTrainedModel) -> None:
    if not getattr(model, "hlm_watched", False):
        for layer in getattr(model.base_model, "layers", ()):
            layer.register_forward_pre_hook(_check)
        model.hlm_watched = True


@contextlib.contextmanager
def reading_head(model: PreTrainedModel, wanted: bool = True) -> Iterator[list[torch.Tensor]]:
    """Inside, the input of every call of the model's output layer (the final normed hidden state its lm-head
    reads) is appended to the yielded list. One hook on one module, for this block only: `output_hidden_states`
    instead hooks and records every layer, which cost ~2 % of a draft step here."""
    seen: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda _module, args: seen.append(args[0])) if wanted else None
    try:
        yield seen
    finally:
        if handle is not None:
            handle.remove()


@torch.inference_mode()
def prefill(model: PreTrainedModel, ids: list[int], head: tuple[int, ...], progress: Progress | None = None,
            hidden: bool = False) -> tuple[DynamicCache, torch.Tensor, torch.Tensor | None]:
    """A cache over `ids`, the logits of the next position and, if asked, the final hidden state there (raises
    `Cancelled` inside a set `stopping`)."""
    cache, held = start(model, ids, head)
    _watched(model)
    with reading_head(model, hidden) as read:
        for i in range(held, len(ids), CHUNK):
            out = model(input_ids=torch.tensor([ids[i:i + CHUNK]], device=model.device), cache=cache, use_cache=True,
                        logits_to_keep=1)
            if progress is not None:
                progress(min(i + CHUNK, len(ids)), len(ids))
    return cache, out.logits[0, -1], read[-1][0, -1] if hidden else None


# Per model, the most recent prompts' reads, this many tokens in all: the 1.5B verifier's KV is ~28 KB a token, so at
# most ~115 MB; a longer prompt is not kept.
READ_TOKENS = 4096
T = TypeVar("T")


class Kept(Generic[T]):
    """One model's most recent prompt reads, READ_TOKENS tokens in all, the oldest dropped first: the transformers
    models' (`read`) and llama.cpp's (`hlm.llamacpp.LlamaDraft`)."""

    def __init__(self) -> None:
        self._reads: OrderedDict[tuple[int, ...], T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ids: tuple[int, ...], usable: Callable[[T], bool]) -> T | None:
        """The kept read of exactly `ids` where `usable` accepts it (it then counts as the newest), else None."""
        with self._lock:
            read = self._reads.get(ids)
            if read is None or not usable(read):
                return None
            self._reads.move_to_end(ids)
            return read

    def put(self, ids: tuple[int, ...], read: T) -> None:
        """Keep `read` as the newest (not when `ids` alone outgrow READ_TOKENS)."""
        if len(ids) > READ_TOKENS:
            return
        with self._lock:
            self._reads[ids] = read
            self._reads.move_to_end(ids)
            while sum(map(len, self._reads)) > READ_TOKENS:
                self._reads.popitem(last=False)


@dataclass
class Read:
    """A prompt read: its KV cache (the caller's own copy), the next position's logits and, if asked, final hidden
    state, and the time and energy the pass took when it was computed. `remembered`: handed out again, not run now."""

    cache: DynamicCache
    logits: torch.Tensor
    hidden: torch.Tensor | None
    cost: Window
    remembered: bool = False


_READS: WeakKeyDictionary[PreTrainedModel, Kept[Read]] = WeakKeyDictionary()


@torch.inference_mode()
def read(model: PreTrainedModel, ids: list[int], head: tuple[int, ...], meter: EnergyMeter | None,
         progress: Progress | None = None, hidden: bool = False) -> Read:
    """`prefill`, remembered: a prompt this model read before comes back as it was computed then (a copy of its
    cache, the same logits: the run's tokens cannot tell), with what it cost then, so that a caller can charge every
    run alike whatever ran before it. Read again when the kept one lacks what is asked (the hidden state, or energy
    with a meter)."""
    key = tuple(ids)
    with _LOCK:
        kept = _READS.setdefault(model, Kept())
    entry = kept.get(key, lambda e: (e.hidden is not None or not hidden) and
                     (e.cost.joules is not None or meter is None))
    if entry is not None:  # a kept cache is never written to: copied for the caller
        return Read(copy.deepcopy(entry.cache), entry.logits, entry.hidden, entry.cost, remembered=True)
    with measure(model.device, meter) as cost:
        cache, logits, state = prefill(model, ids, head, progress, hidden)
    if len(key) <= READ_TOKENS:  # copied only where it is kept
        kept.put(key, Read(copy.deepcopy(cache), logits, state, cost))
    return Read(cache, logits, state, cost)
