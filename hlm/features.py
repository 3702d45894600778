"""The device's statistics of one draft (`hlm.estimators.DraftStats`), from the logits and attention weights of
the pass that produced it. The decoder calls this per draft and the study on a teacher-forced prefill, so a score
measured offline is the score the decoder acts on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from hlm.estimators import DraftStats
from hlm.uncertainty import Uncertainty

if TYPE_CHECKING:
    from hlm.quant import HeadRows

ALTERNATIVES = 16  # candidates besides the draft that `semantic` compares it with


@torch.no_grad()
def draft_stats(logits: torch.Tensor, draft: int, unc: Uncertainty, valid: torch.Tensor,
                embeddings: torch.Tensor | HeadRows, prev_attention: float | None = None, p_prev: float | None = None,
                index: int = 0, hidden: torch.Tensor | None = None, log_p_before: float = 0.0) -> DraftStats:
    """`logits`: the SLM's next-position logits; `embeddings`: its output-embedding matrix (lm_head rows), or what
    reads its rows as a matrix would (`hlm.quant.HeadRows`); `hidden`: the final hidden state of the same pass (kept
    as float32 on the CPU, where the judge reads it)."""
    z = logits.to(torch.float32).masked_fill(~valid[: logits.shape[-1]], float("-inf"))
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    top = p.topk(ALTERNATIVES + 1)
    others = top.indices[top.indices != draft][:ALTERNATIVES]
    w = p[others] / p[others].sum().clamp_min(1e-30)
    e = embeddings[torch.cat([others, others.new_tensor([draft])])].to(torch.float32)
    cos = torch.nn.functional.cosine_similarity(e[:-1], e[-1:], dim=-1)
    return DraftStats(
        u=unc.u, ubar=unc.ubar, p_draft=float(p[draft]), p_top=float(top.values[0]),
        margin=float(top.values[0] - top.values[1]), entropy=float(torch.special.entr(p).sum()),
        semantic=float((w * (1.0 - cos)).sum()), prev_attention=prev_attention, p_prev=p_prev, index=index,
        log_p_before=log_p_before, hidden=None if hidden is None else judge_input(hidden))


def judge_input(hidden: torch.Tensor) -> torch.Tensor:
    """The hidden state as the judge reads it: float32 on the CPU (the bench times this copy as part of its cost)."""
    return hidden.to("cpu", torch.float32)


def default_heads(n_layers: int, n_heads: int) -> tuple[tuple[int, int], ...]:
    """Every head of the middle third of the layers (RAUQ looks there) until a calibration picks one per layer."""
    return tuple((layer, h) for layer in range(n_layers // 3, 2 * n_layers // 3 or 1) for h in range(n_heads))


def prev_attention(attentions: Sequence[torch.Tensor | None], heads: Sequence[tuple[int, int]],
                   query: int = -1) -> float:
    """Mean weight that `query` puts on the position before it, over the given (layer, head) pairs (only their
    layers need weights: the others may be None)."""
    first = attentions[heads[0][0]]
    q = query if query >= 0 else first.shape[2] + query
    kv = first.shape[3] - first.shape[2] + q  # the query's own column in the key axis
    return float(torch.stack([attentions[layer][0, h, q, kv - 1].to(torch.float32) for layer, h in heads]).mean())
