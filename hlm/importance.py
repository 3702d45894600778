"""Attention-based importance of a draft, from the SLM's own attention (no extra forward pass).

Decoder LMs pour attention onto a few sink positions and per-position weights shrink like 1/t, so a fixed
threshold drifts with position and prompt ("attention collapse"). We therefore drop the sinks, renormalise
the row, and compare the draft's weight with an adaptive threshold tau = mean + gamma * std of that row,
and also require it to rank within the row's top-k. Two readings choose which row scores draft d_n
(METHOD.md); `hlm.estimators` registers them as `paper-lookahead` and `paper-self`:

- `lookahead`: the weight the *next* query (the pass that processes d_{n+1}) puts on d_n: how much the model
  actually uses d_n to continue. The decision waits one draft.
- `self`: the weight d_n's own query puts on itself in the pass that processes d_n; no wait.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Importance:
    score: float  # the draft's attention weight, renormalised over the candidate positions
    threshold: float  # tau = mean + gamma * std of the candidates' weights
    rank: int  # candidates with a larger weight (0 = most attended)
    important: bool


def row_layers(n_layers: int, last_layers: int) -> range:
    """The layers an attention row averages: the last `last_layers` (0 = all)."""
    return range(max(n_layers - last_layers, 0) if last_layers else 0, n_layers)


def attention_row(attentions: Sequence[torch.Tensor | None], last_layers: int, query: int = -1) -> torch.Tensor:
    """Mean over heads (and `row_layers`; the others may be None) of one query's attention row (default: the
    newest), cut at the query's own key so that a teacher-forced prefill gives the row a decode step would."""
    layers = [attentions[i] for i in row_layers(len(attentions), last_layers)]
    q = query if query >= 0 else layers[0].shape[2] + query
    kv = layers[0].shape[3] - layers[0].shape[2] + q + 1
    return torch.stack([a[0, :, q, :kv].to(torch.float32).mean(0) for a in layers]).mean(0)


def row_stats(row: torch.Tensor, position: int, sink_tokens: int) -> tuple[float, float, float, int]:
    """`position`'s renormalised weight in `row` (the query sits at the row's last position), the mean and std
    of the candidates' weights, and its rank among them: all the paper-literal rule needs for any (k, gamma)."""
    query = row.shape[0] - 1
    keep = torch.ones_like(row, dtype=torch.bool)
    keep[: min(sink_tokens, position)] = False
    if position != query:
        keep[query] = False  # the lookahead query's weight on itself says nothing about d_n
    weights = row[keep]
    weights = weights / weights.sum().clamp_min(1e-12)
    mine = float(row[position] / row[keep].sum().clamp_min(1e-12))
    std = float(weights.std()) if weights.numel() > 1 else 0.0
    return mine, float(weights.mean()), std, int((weights > mine).sum())


def decide(mine: float, mean: float, std: float, rank: int, k: int, gamma: float) -> Importance:
    tau = mean + gamma * std
    return Importance(mine, tau, rank, mine >= tau and rank < k)


def score(row: torch.Tensor, position: int, k: int, gamma: float, sink_tokens: int) -> Importance:
    """Importance of `position` in `row` (the query sits at the row's last position)."""
    return decide(*row_stats(row, position, sink_tokens), k, gamma)
