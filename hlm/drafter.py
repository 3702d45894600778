"""The device side: the small model and its KV cache, one token per pass, with rollback.

Each pass returns the next-position logits and, when asked, the attention weights of the layers that its selection
score reads (one (1, heads, new, context) tensor per layer, None for the others) and the final hidden state, all of
the same forward pass: scores read them and cost no extra pass.

The drafter runs the KERNEL attention (`load_model(..., KERNEL)`): PyTorch's SDPA, which never materialises the
weights, for every pass that asks for none (every prefill chunk, every decode step of an estimator that reads no
attention), and the model's own eager attention only on the layers whose weights a pass asks for. The choice is
per call and per layer (the `output_attentions` and `attention_layers` arguments travel to each layer's attention
function), so nothing is switched on the shared model and threads cannot race.
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from typing import Any, NamedTuple

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hlm import prefix
from hlm.energy import EnergyMeter, Window

Attentions = tuple[torch.Tensor | None, ...]  # per layer; None where the pass did not compute it
KERNEL = "sdpa+eager-rows"


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, output_attentions: bool = False,
               attention_layers: Collection[int] | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's attention: eager (weights returned) where the caller asked for this layer's weights (all layers
    when `attention_layers` is None), else SDPA (none)."""
    if not output_attentions or (attention_layers is not None and module.layer_idx not in attention_layers):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # The mask comes in SDPA's form: boolean (True = attend), or None where SDPA's own causal flag suffices.
    q, k = query.shape[2], key.shape[2]
    if attention_mask is None and q > 1:
        attention_mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
    if attention_mask is not None:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    eager = sys.modules[type(module).__module__].eager_attention_forward  # what attn_implementation="eager" runs
    return eager(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(KERNEL, _attention)
AttentionMaskInterface.register(KERNEL, sdpa_mask)


class Pass(NamedTuple):
    """What one SLM pass leaves for the next draft's statistics."""

    logits: torch.Tensor  # the next position's
    attentions: Attentions | None = None  # (1, heads, new, context) for the layers asked, None for the others
    hidden: torch.Tensor | None = None  # the final (normed) hidden state there, what the lm-head read, when asked


class Drafter:
    def __init__(self, model: PreTrainedModel, head: tuple[int, ...] = ()) -> None:
        if model.config._attn_implementation != KERNEL:  # another kernel returns weights of all layers or none
            raise ValueError(f"the drafter's model must run the {KERNEL!r} attention, not "
                             f"{model.config._attn_implementation!r}: load it with `load_model(..., KERNEL)`")
        self.model = model
        self.head = head  # the chat template's fixed head, prefilled once per model (`hlm.prefix`)
        self.device = model.device
        self.cache = DynamicCache()
        self.remembered: Window | None = None  # `prefill`'s prompt read, when it was not run now: its cost then

    @property
    def length(self) -> int:
        """Tokens held in the KV cache."""
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def forward(self, ids: list[int], layers: Collection[int] = (), hidden: bool = False) -> Pass:
        """Process `ids` after the cached context: the next position's logits, the attention weights of the `layers`
        named (None for the others; none at all when no layer is named) and, if asked, the final hidden state."""
        x = torch.tensor([ids], device=self.device)
        step = getattr(self.model, "hlm_step", None)  # `hlm.compiled`, where the pair was loaded with it
        if step is not None and len(ids) == 1:
            logits, state, attentions = step(x, self.cache, layers)
            logits, state = logits[0], state[0] if hidden else None
        else:
            with prefix.reading_head(self.model, hidden) as read:
                out = self.model(input_ids=x, cache=self.cache, use_cache=True, output_attentions=bool(layers),
                                 attention_layers=layers, logits_to_keep=1)
            logits, attentions, state = out.logits[0, -1], out.attentions, read[-1][0, -1] if hidden else None
        if not layers:
            return Pass(logits, None, state)
        computed = iter(attentions)  # the layers that returned weights, in order
        return Pass(logits, tuple(next(computed) if i in layers else None
                                  for i in range(self.model.config.num_hidden_layers)), state)

    def prefill(self, ids: list[int], progress: prefix.Progress | None = None, hidden: bool = False,
                meter: EnergyMeter | None = None) -> Pass:
        """Fill the cache with the prompt (in chunks, or as this process read it before: `hlm.prefix.read`); what the
        first draft reads. The prefill never returns attention: the first draft has no previous token to attend to.
        `remembered` is then the cost of a read not run now (what it took when it was), else None."""
        # The hidden state is kept whether asked or not (the lm-head's input, computed anyway), so one read serves
        # every estimator.
        read = prefix.read(self.model, ids, self.head, meter, progress, hidden=True)
        self.cache, self.remembered = read.cache, read.cost if read.remembered else None
        return Pass(read.logits, None, read.hidden if hidden else None)

    def rollback(self, n_tokens: int) -> None:
        """Drop the newest `n_tokens` from the cache. transformers 5.24's `crop` takes minus the count to
        remove (a positive value, the old absolute length, raises); tests check this against a recompute."""
        if n_tokens:
            self.cache.crop(-n_tokens)
