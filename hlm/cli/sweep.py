"""`python -m hlm sweep`: the flags of `hlm.experiments.sweep` (lists, the quick and full presets) and its report.
The experiment (pandas, plotly, the models' stack) is imported when the command runs: `--help` builds this parser."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from hlm import session
from hlm.cli.args import (
    UsageError,
    add_cluster_args,
    add_model_args,
    add_run_args,
    comma_list,
    open_workers,
    report_outputs,
    shared_values,
)
from hlm.config import ESTIMATORS, RunConfig
from hlm.experiments.prompts import DEFAULT_PROMPTS, load_prompts
from hlm.policies import HYBRID, with_role


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags the user left out from --quick or the full preset (explicit flags always win)."""
    from hlm.experiments.sweep import FULL, QUICK

    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def base_config(args: argparse.Namespace) -> RunConfig:
    """What every run of the sweep shares (sampling, link preset and overrides, device profile); the grid sets the
    policy fields, so they start at their defaults. Needs `apply_preset` first (for the seeds)."""
    return session.run_config(**shared_values(args), policy=with_role("counterfactual"), seed=args.seeds[0])


def cmd_sweep(args: argparse.Namespace) -> int:
    from hlm.experiments.quality import get_scorer
    from hlm.experiments.sweep import Grid, SweepSpec, format_summary, sweep

    if args.skip_rate is not None:
        raise UsageError(f"sweep matches the {with_role('control')} control's skip rate to each "
                         f"{with_role('subject')} setting; drop --skip-rate")
    apply_preset(args)
    base = base_config(args)
    prompts = load_prompts(args.prompts, args.limit)  # a bad file is a UserError: one line, exit status 2
    if len({p["id"] for p in prompts}) != len(prompts):
        raise UsageError(f"{args.prompts}: prompt ids must be unique (they key the cache and the BERTScore pairs)")
    Grid(args.policies, args.k, args.gamma, args.estimators, args.seeds)  # validate before any model is loaded
    scorer = get_scorer(args.backbone)  # a missing backbone is a QualityError, a UserError
    workers = open_workers(args)
    try:
        u_th, u_th_source = session.resolve_u_th(args.u_th, workers.facts.calibration)
        base = replace(base, u_th_source=u_th_source)
        grid = Grid(args.policies, args.k, args.gamma, args.estimators, args.seeds, u_th)
        out = Path(args.out)
        meta = {"u_th_source": u_th_source, "pair": workers.facts.description, "prompt_file": str(args.prompts),
                "quick": args.quick}
        result = sweep(workers, scorer, SweepSpec(args.models, prompts, grid, base, out, args.tolerance,
                                                  png=not args.no_png, meta=meta))
    finally:
        workers.close()
    print(format_summary(result.summary))
    print("\n" + result.decisions["why"])
    report_outputs(result.figures, f"{out}/results.csv, results.json, summary.csv, decisions.json and figures/")
    for f in result.failed:
        print(f"failed: {f['prompt_id']} {f['setting']}: {f['error']} (the prompt is left out; rerun to retry)",
              file=sys.stderr)
    return 1 if result.failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="measure the energy/quality trade-off over prompts, policies and (k, gamma)",
                       description="The energy/quality trade-off measured on one model pair, and the defaults "
                       "chosen from it.", conflict_handler="resolve")
    add_model_args(p)
    add_run_args(p)  # sampling, --u-th and the link group; the single-valued policy flags are replaced below
    p.add_argument("--policies", "--policy", type=comma_list(str, HYBRID), default=HYBRID,
                   help=f"comma-separated subset of {','.join(HYBRID)} ({with_role('reference')} always runs: it is "
                   "the reference)")
    p.add_argument("--k", type=comma_list(int), default=None, help="comma-separated k values (full: 2,4,8,16)")
    p.add_argument("--gamma", type=comma_list(float), default=None,
                   help="comma-separated gamma values (full: 0,0.5,1,2)")
    p.add_argument("--estimators", "--estimator", type=comma_list(str, ESTIMATORS), default=None,
                   help="comma-separated importance estimators")
    p.add_argument("--seeds", "--seed", type=comma_list(int), default=None, help="comma-separated seeds (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="per run (full: 64, quick: 10)")
    p.add_argument("--skip-rate", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSON Lines prompt file (id, category, prompt)")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts (quick: 4)")
    p.add_argument("--out", required=True, help="output folder; run files cached under OUT/runs")
    p.add_argument("--quick", action="store_true",
                   help="4 prompts x 10 tokens, k 4,16 x gamma 0,1, lookahead: every figure in under 10 minutes")
    p.add_argument("--backbone", default=None, help="BERTScore backbone (default: offline all-MiniLM-L6-v2)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="accuracy-leaning pick: BERTScore at most this far below HLM")
    p.add_argument("--no-png", action="store_true", help="write HTML figures only (PNG export needs a Chrome)")
    add_cluster_args(p)
    p.set_defaults(func=cmd_sweep)
