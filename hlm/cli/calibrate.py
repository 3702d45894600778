"""`python -m hlm calibrate`: fit U-HLM's thresholds on a pair (`hlm.experiments.calibrate`) and print them."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from hlm.cli.args import add_cluster_args, add_model_args, add_run_args, open_workers, run_config
from hlm.experiments.prompts import DEFAULT_PROMPTS, load_prompts


def cmd_calibrate(args: argparse.Namespace) -> int:
    from hlm.experiments.calibrate import calibrate  # numpy and the pair's torch stack: not for --help

    config = run_config(args)  # calibration runs hlm, which never reads u_th
    prompts = [r["prompt"] for r in load_prompts(args.prompts, args.limit)]
    workers = open_workers(args)
    try:
        cal, points = calibrate(workers, prompts, config)
    finally:
        workers.close()
    print(f"fit over {cal.samples} drafts: beta ~ {cal.a:.3f} * u + {cal.b:+.3f}; Delta = P(q<p) = {cal.delta:.3f}")
    print(f"risk-averse u_th = {cal.risk_averse:.3f}; risk-prone u_th = {cal.risk_prone:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"calibration": asdict(cal), "points": points}, f)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit beta ~ a*u + b under HLM and print the u_th thresholds")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    p.add_argument("--limit", type=int, default=12, help="number of prompts to use")
    p.add_argument("--out", default=None, help="write the fit and the (u, beta) points as JSON")
    add_model_args(p)
    add_run_args(p)
    add_cluster_args(p)
    p.set_defaults(func=cmd_calibrate, max_new_tokens=48)
