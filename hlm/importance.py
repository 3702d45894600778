"""Attention-based importance of a draft, from the SLM's own attention (no extra forward pass).

Decoder LMs pour attention onto a few sink positions and per-position weights shrink like 1/t, so a fixed
threshold drifts with position and prompt ("attention collapse"). We therefore drop the sinks, renormalise
the row, and compare the draft's weight with an adaptive threshold tau = mean + gamma * std of that row,
and also require it to rank within the row's top-k. Two estimators choose which row scores draft d_n
(METHOD.md; the default is chosen by the sweep in `hlm.sweep`):

- `lookahead`: the weight the *next* query (the pass that processes d_{n+1}) puts on d_n: how much the model
  actually uses d_n to continue. The decision waits one draft.
- `self`: the weight d_n's own query puts on itself in the pass that processes d_n; no wait.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# SLM passes after drafting d_n until its importance row exists: the pass on d_n, plus one for lookahead.
PASSES_NEEDED = {"self": 1, "lookahead": 2}


@dataclass(frozen=True)
class Importance:
    score: float  # the draft's attention weight, renormalised over the candidate positions
    threshold: float  # tau = mean + gamma * std of the candidates' weights
    rank: int  # candidates with a larger weight (0 = most attended)
    important: bool


def attention_row(attentions: Sequence[torch.Tensor], last_layers: int) -> torch.Tensor:
    """Mean over heads (and the last `last_layers` layers; 0 = all) of the newest query's attention row."""
    layers = attentions[-last_layers:] if last_layers else attentions
    return torch.stack([a[0, :, -1, :].to(torch.float32).mean(0) for a in layers]).mean(0)


def score(row: torch.Tensor, position: int, k: int, gamma: float, sink_tokens: int) -> Importance:
    """Importance of `position` in `row` (the query sits at the row's last position)."""
    query = row.shape[0] - 1
    keep = torch.ones_like(row, dtype=torch.bool)
    keep[: min(sink_tokens, position)] = False
    if position != query:
        keep[query] = False  # the lookahead query's weight on itself says nothing about d_n
    weights = row[keep]
    weights = weights / weights.sum().clamp_min(1e-12)
    mine = float(row[position] / row[keep].sum().clamp_min(1e-12))
    std = float(weights.std()) if weights.numel() > 1 else 0.0
    tau = float(weights.mean()) + gamma * std
    rank = int((weights > mine).sum())
    return Importance(mine, tau, rank, mine >= tau and rank < k)
