"""`python -m hlm calibrate`: fit U-HLM's linear model of the verifier's rejection probability.

Run HLM (upload everything) with u measured for every draft, log (u, beta = max(0, 1 - q[d]/p[d])), fit
beta ~ a*u + b by least squares, and derive the thresholds: risk-averse u_th = -b/a (upload whenever any
rejection is expected) and risk-prone u_th = (Delta - b)/a with Delta = P(q[d] < p[d]).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from hlm.models.pairs import Calibration
from hlm.policies import with_role

if TYPE_CHECKING:
    from hlm.config import RunConfig
    from hlm.decoder import HybridDecoder


def fit(us: Sequence[float], betas: Sequence[float], delta: float, note: str = "") -> Calibration:
    u, beta = np.asarray(us, dtype=float), np.asarray(betas, dtype=float)
    if len(u) < 2 or np.ptp(u) == 0:
        raise ValueError("calibration needs at least two drafts with different uncertainty")
    a, b = np.polyfit(u, beta, 1)
    if a <= 0:
        raise ValueError(f"rejection does not grow with uncertainty (slope {a:.3f}); thresholds are meaningless")
    return Calibration(float(a), float(b), delta, float(np.clip(-b / a, 0, 1)), float(np.clip((delta - b) / a, 0, 1)),
                       len(u), note)


def calibrate(decoder: HybridDecoder, prompts: Sequence[str],
              config: RunConfig) -> tuple[Calibration, list[tuple[float, float]]]:
    """HLM (the counterfactual: every draft uploaded, so every draft gets its beta) over the prompts; returns the fit
    and the (u, beta) points."""
    config = config.with_policy(name=with_role("counterfactual"))
    points, below = [], 0
    for prompt in tqdm(prompts, desc="calibrating", unit="prompt"):
        for e in decoder.generate(prompt, config, diagnostics=True):
            if e.p_draft and e.q_draft is not None and e.u is not None:
                points.append((e.u, max(0.0, 1.0 - e.q_draft / e.p_draft)))
                below += e.q_draft < e.p_draft
    note = (f"{len(prompts)} prompts, {config.sampling.max_new_tokens} new tokens, temperature "
            f"{config.sampling.temperature}, K={config.policy.n_samples}, theta_max={config.policy.theta_max}")
    cal = fit([p[0] for p in points], [p[1] for p in points], below / max(len(points), 1), note)
    return cal, points
