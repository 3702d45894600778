"""The device side: the small model and its KV cache, one token per pass, with rollback.

Each pass returns the next-position logits and, when asked, the attention weights and the final hidden state of
the same forward pass: selection scores read them and cost no extra pass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import DynamicCache, PreTrainedModel

from hlm import prefix

Attentions = tuple[torch.Tensor, ...]


class Pass(NamedTuple):
    """What one SLM pass leaves for the next draft's statistics."""

    logits: torch.Tensor  # the next position's
    attentions: Attentions | None = None  # (1, heads, new, context) per layer, when asked
    hidden: torch.Tensor | None = None  # the final (normed) hidden state there, what the lm-head read, when asked


class Drafter:
    def __init__(self, model: PreTrainedModel, head: tuple[int, ...] = ()) -> None:
        self.model = model
        self.head = head  # the chat template's fixed head, prefilled once per model (`hlm.prefix`)
        self.device = model.device
        self.cache = DynamicCache()

    @property
    def length(self) -> int:
        """Tokens held in the KV cache."""
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def forward(self, ids: list[int], attention: bool = False, hidden: bool = False) -> Pass:
        """Process `ids` after the cached context: the next position's logits (+ attention weights, + hidden state)."""
        out = self.model(input_ids=torch.tensor([ids], device=self.device), cache=self.cache, use_cache=True,
                         output_attentions=attention, output_hidden_states=hidden, logits_to_keep=1)
        return Pass(out.logits[0, -1], out.attentions if attention else None,
                    out.hidden_states[-1][0, -1] if hidden else None)

    def prefill(self, ids: list[int], progress: prefix.Progress | None = None, hidden: bool = False) -> Pass:
        """Fill the cache with the prompt (in chunks: `hlm.prefix`); what the first draft reads. The prefill never
        returns attention: the first draft has no previous token to attend to."""
        self.cache, logits, state = prefix.prefill(self.model, ids, self.head, progress, hidden)
        return Pass(logits, None, state)

    def rollback(self, n_tokens: int) -> None:
        """Drop the newest `n_tokens` from the cache. transformers 5.24's `crop` takes minus the count to
        remove (a positive value, the old absolute length, raises); tests check this against a recompute."""
        if n_tokens:
            self.cache.crop(-n_tokens)
