"""The device side: the small model and its KV cache, one token per pass, with rollback.

Each pass returns the next-position logits and, when asked, the attention weights of the same forward pass
(one (1, heads, new, context) tensor per layer): selection scores read them and cost no extra pass.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from hlm import prefix

Attentions = tuple[torch.Tensor, ...]


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
    def forward(self, ids: list[int], attention: bool = False) -> tuple[torch.Tensor, Attentions | None]:
        """Process `ids` after the cached context; logits for the next position (+ attention weights)."""
        out = self.model(input_ids=torch.tensor([ids], device=self.device), cache=self.cache,
                         use_cache=True, output_attentions=attention, logits_to_keep=1)
        return out.logits[0, -1], (out.attentions if attention else None)

    def prefill(self, ids: list[int], progress: prefix.Progress | None = None) -> torch.Tensor:
        """Fill the cache with the prompt (in chunks: `hlm.prefix`); logits for the first draft."""
        self.cache, logits = prefix.prefill(self.model, ids, self.head, progress)
        return logits

    def rollback(self, n_tokens: int) -> None:
        """Drop the newest `n_tokens` from the cache. transformers 5.24's `crop` takes minus the count to
        remove (a positive value, the old absolute length, raises); tests check this against a recompute."""
        if n_tokens:
            self.cache.crop(-n_tokens)
