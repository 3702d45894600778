"""The chat template's fixed head, prefilled once per model.

Every prompt starts with the same template tokens (Qwen's default system prompt and the user turn's opening:
about 20 of a short prompt's ~40), and prefilling the prompt in both models is most of the time to the first
token. So each model keeps the head's KV and every run starts from a copy of it. The head is always processed
as its own pass, warm or not, so a run's numbers never depend on what ran before (same seed, same tokens).
"""

from __future__ import annotations

import copy
import os
import threading
from weakref import WeakKeyDictionary

import torch
from transformers import DynamicCache, PreTrainedModel

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
