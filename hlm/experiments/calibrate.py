"""`python -m hlm calibrate`: fit U-HLM's linear model of the verifier's rejection probability.

Run HLM (upload everything) with u measured for every draft, log (u, beta = max(0, 1 - q[d]/p[d])), fit
beta ~ a*u + b by least squares, and derive the thresholds: risk-averse u_th = -b/a (upload whenever any
rejection is expected) and risk-prone u_th = (Delta - b)/a with Delta = P(q[d] < p[d]).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
from tqdm import tqdm

from hlm.experiments.prompts import DEFAULT_PROMPTS, load_prompts
from hlm.models.pairs import Calibration


def fit(us: Sequence[float], betas: Sequence[float], delta: float, note: str = "") -> Calibration:
    u, beta = np.asarray(us, dtype=float), np.asarray(betas, dtype=float)
    if len(u) < 2 or np.ptp(u) == 0:
        raise ValueError("calibration needs at least two drafts with different uncertainty")
    a, b = np.polyfit(u, beta, 1)
    if a <= 0:
        raise ValueError(f"rejection does not grow with uncertainty (slope {a:.3f}); thresholds are meaningless")
    return Calibration(float(a), float(b), delta, float(np.clip(-b / a, 0, 1)), float(np.clip((delta - b) / a, 0, 1)),
                       len(u), note)


def calibrate(decoder, prompts: Sequence[str], config) -> tuple[Calibration, list[tuple[float, float]]]:  # noqa: ANN001
    """HLM over the prompts; returns the fit and the (u, beta) points."""
    config = config.with_policy(name="hlm")
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


def cmd_calibrate(args: argparse.Namespace) -> int:
    from hlm.cli import load_decoder, run_config

    config = run_config(args)
    prompts = [r["prompt"] for r in load_prompts(args.prompts, args.limit)]
    decoder = load_decoder(args)
    cal, points = calibrate(decoder, prompts, config)
    print(f"fit over {cal.samples} drafts: beta ~ {cal.a:.3f} * u + {cal.b:+.3f}; Delta = P(q<p) = {cal.delta:.3f}")
    print(f"risk-averse u_th = {cal.risk_averse:.3f}; risk-prone u_th = {cal.risk_prone:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"calibration": asdict(cal), "points": points}, f)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from hlm.cli import add_model_args, add_run_args

    p = sub.add_parser("calibrate", help="fit beta ~ a*u + b under HLM and print the u_th thresholds")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    p.add_argument("--limit", type=int, default=12, help="number of prompts to use")
    p.add_argument("--out", default=None, help="write the fit and the (u, beta) points as JSON")
    add_model_args(p)
    add_run_args(p)
    p.set_defaults(func=cmd_calibrate, max_new_tokens=48)
