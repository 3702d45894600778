"""`python -m hlm calibrate`: fit U-HLM's linear model of the verifier's rejection probability.

Run HLM (upload everything) with u measured for every draft, log (u, beta = max(0, 1 - q[d]/p[d])), fit
beta ~ a*u + b by least squares, and derive the thresholds: risk-averse u_th = -b/a (upload whenever any
rejection is expected) and risk-prone u_th = (Delta - b)/a with Delta = P(q[d] < p[d]).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from hlm.errors import UserError
from hlm.models.pairs import Calibration
from hlm.policies import with_role

if TYPE_CHECKING:
    from hlm.config import RunConfig
    from hlm.decoder import HybridDecoder
    from hlm.experiments.workers import Workers


class CalibrationError(UserError, ValueError):
    """The runs cannot support a fit (too few drafts, or rejection not growing with u)."""


def fit(us: Sequence[float], betas: Sequence[float], delta: float, note: str = "") -> Calibration:
    u, beta = np.asarray(us, dtype=float), np.asarray(betas, dtype=float)
    if len(u) < 2 or np.ptp(u) == 0:
        raise CalibrationError("calibration needs at least two drafts with different uncertainty")
    a, b = np.polyfit(u, beta, 1)
    if a <= 0:
        raise CalibrationError(f"rejection does not grow with uncertainty (slope {a:.3f}); thresholds are meaningless")
    return Calibration(float(a), float(b), delta, float(np.clip(-b / a, 0, 1)), float(np.clip((delta - b) / a, 0, 1)),
                       len(u), note)


def rejection_points(decoder: HybridDecoder, item: tuple[int, str, RunConfig]) -> list[tuple[float, float, bool]]:
    """A `Workers` task: (u, beta, q[d] < p[d]) for every draft of one HLM run of (position, prompt, config)."""
    _, prompt, config = item
    return [(e.u, max(0.0, 1.0 - e.q_draft / e.p_draft), e.q_draft < e.p_draft)
            for e in decoder.generate(prompt, config, diagnostics=True)
            if e.p_draft and e.q_draft is not None and e.u is not None]


def calibrate(workers: Workers, prompts: Sequence[str],
              config: RunConfig) -> tuple[Calibration, list[tuple[float, float]]]:
    """HLM (the counterfactual: every draft uploaded, so every draft gets its beta) over the prompts, one job per
    prompt on `workers`; returns the fit and the (u, beta) points in prompt order."""
    config = config.with_policy(name=with_role("counterfactual"))
    per_prompt: dict[int, list[tuple[float, float, bool]]] = {}
    failed = 0
    with tqdm(total=len(prompts), desc="calibrating", unit="prompt") as bar:
        for outcome in workers.map(rejection_points, [(i, p, config) for i, p in enumerate(prompts)], bar):
            if outcome.error is None:
                per_prompt[outcome.item[0]] = outcome.result
                continue
            failed += 1
            tqdm.write(f"calibration run failed on {outcome.item[1][:60]!r}: {outcome.error}", file=sys.stderr)
    drafts = [d for i in sorted(per_prompt) for d in per_prompt[i]]
    points = [(u, beta) for u, beta, _ in drafts]
    note = (f"{len(per_prompt)} prompts{f' ({failed} failed)' if failed else ''}, "
            f"{config.sampling.max_new_tokens} new tokens, temperature {config.sampling.temperature}, "
            f"K={config.policy.n_samples}, theta_max={config.policy.theta_max}")
    cal = fit([p[0] for p in points], [p[1] for p in points], sum(b for *_, b in drafts) / max(len(drafts), 1), note)
    return cal, points
