"""`python -m hlm eval BENCHMARK`: task benchmarks that judge a policy by whether its answer works. One today:
`humaneval` (pass@1, `hlm.experiments.humaneval`; docs/humaneval.md), and `merge` to report its parts as one."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from hlm import session
from hlm.cli.args import UsageError, add_cluster_args, add_model_args, comma_list, open_workers, report_outputs
from hlm.config import DEVICE_PROFILES, ESTIMATORS, LINK_PRESETS, PolicyConfig, RunConfig
from hlm.experiments.humaneval.harness import MAX_NEW_TOKENS, MEMORY_MB, TIMEOUT_S, TOTAL
from hlm.policies import NAMES, floor, with_role

if TYPE_CHECKING:
    from hlm.experiments.humaneval.evaluate import Result

# The ceiling, the floor, the method and its matched coin: llm, slm, ours, random.
POLICIES = (with_role("reference"), floor(), with_role("subject"), with_role("control"))


def _report(result: Result, out: str) -> None:
    print(result.table)
    report_outputs(result.figures, f"{out}/results.csv, results.json, table.txt, completions.jsonl and figures/")


def cmd_humaneval(args: argparse.Namespace) -> int:
    from hlm.experiments.humaneval.evaluate import EvalSpec, evaluate
    from hlm.experiments.humaneval.harness import problems, self_check
    from hlm.experiments.sweep import Grid

    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if not 0 <= args.skip < TOTAL:
        raise UsageError(f"--skip must be from 0 to {TOTAL - 1}")
    if args.timeout_s <= 0 or args.memory_mb < 64:
        raise UsageError("--timeout-s must be above 0 and --memory-mb at least 64")
    base = session.run_config(policy=with_role("counterfactual"), temperature=0.0, max_new_tokens=args.max_new_tokens,
                              device=args.device_profile, link=args.link_preset)  # bad names: one line, exit 2
    Grid(args.policies, args.k, (args.gamma,), args.estimators)  # validate before any model work
    chosen = problems(args.limit, args.skip)
    self_check(args.timeout_s, args.memory_mb)  # the harness really runs the tests, before hours of decoding
    workers = open_workers(args)
    try:
        u_th, u_th_source = session.resolve_u_th(None, workers.facts.calibration)
        grid = Grid(args.policies, args.k, (args.gamma,), args.estimators, (0,), u_th)
        spec = EvalSpec(args.models, chosen, grid, replace(base, u_th_source=u_th_source), Path(args.out),
                        args.timeout_s, args.memory_mb, png=not args.no_png, meta={"u_th_source": u_th_source,
                                                                                  "pair": workers.facts.description})
        result = evaluate(workers, spec)
    finally:
        workers.close()
    _report(result, args.out)
    for f in result.failed:
        print(f"failed: {f['prompt_id']} {f['policy']} {f['setting']}: {f['error']} (the problem is left out; rerun "
              "to retry)", file=sys.stderr)
    return 1 if result.failed else 0


def cmd_merge(args: argparse.Namespace) -> int:
    from hlm.experiments.humaneval.evaluate import merge

    if len(args.folders) + len(args.reference_from) < 2:
        raise UsageError("name at least two folders to merge")
    if Path(args.out).resolve() in {Path(f).resolve() for f in [*args.folders, *args.reference_from]}:
        raise UsageError("--out must be a new folder, not one of the parts")
    result = merge([Path(f) for f in args.folders], Path(args.out), png=not args.no_png,
                   reference_from=[Path(f) for f in args.reference_from])
    _report(result, args.out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="task benchmarks: does the answer still work (HumanEval pass@1)",
                       description=__doc__.splitlines()[0])
    benchmarks = p.add_subparsers(dest="benchmark", required=True)
    h = benchmarks.add_parser(
        "humaneval", help="pass@1 per policy, paired differences, and pass@1 against upload rate over k",
        description="HumanEval pass@1 (evaluation only: nothing is chosen on it). Each problem's prompt goes "
        "through each policy, greedy; the completion runs against the problem's tests in a separate interpreter "
        "with time and memory limits, here and nowhere else.")
    add_model_args(h)
    h.add_argument("--policies", "--policy", type=comma_list(str, NAMES), default=POLICIES,
                   help=f"comma-separated (default {','.join(POLICIES)}); {with_role('control')} is matched per "
                   f"problem to the upload rate of {with_role('subject')} at each setting")
    h.add_argument("--ks", "--k", dest="k", metavar="KS", type=comma_list(int), default=(PolicyConfig.k,),
                   help=f"comma-separated k of {with_role('subject')}: the points of the curve (default "
                   f"{PolicyConfig.k}, the shipped default; e.g. 2,4,8,16)")
    h.add_argument("--gamma", type=float, default=PolicyConfig.gamma)
    h.add_argument("--estimators", "--estimator", type=comma_list(str, ESTIMATORS), default=(PolicyConfig.estimator,),
                   help="comma-separated importance estimators (a curve each)")
    h.add_argument("--limit", type=int, default=None, help="the first N problems (after --skip; default: all 164)")
    h.add_argument("--skip", type=int, default=0,
                   help="leave out the first N problems (with --limit M: problems N+1 to N+M), e.g. those a "
                   "setting was chosen on")
    h.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                   help=f"per answer (default {MAX_NEW_TOKENS}); a run also ends at its closed code block")
    h.add_argument("--timeout-s", type=float, default=TIMEOUT_S, help="wall-clock limit of one problem's tests")
    h.add_argument("--memory-mb", type=int, default=MEMORY_MB,
                   help="address-space limit of the interpreter running them")
    h.add_argument("--device-profile", default="phone",
                   help="modelled device energy (default phone): " + ", ".join(DEVICE_PROFILES))
    h.add_argument("--link-preset", default=RunConfig.link_preset, help="link model: " + ", ".join(LINK_PRESETS))
    h.add_argument("--out", default="runs/humaneval", help="output folder; runs cached under OUT/runs, verdicts "
                   "under OUT/checks")
    h.add_argument("--no-png", action="store_true", help="write the HTML figure only (PNG export needs a Chrome)")
    add_cluster_args(h)
    h.set_defaults(func=cmd_humaneval)
    m = benchmarks.add_parser(
        "merge", help="several `eval humaneval` folders of one setup reported as one (runs nothing)",
        description="HumanEval results split into parts (by --skip/--limit, or run on other machines or days) "
        "reported as one: the rows joined and every number computed again. Parts must share the pair, its numerics, "
        "the calibration, prompt, sampling, energy model and test limits, and no job may be in two of them.")
    m.add_argument("folders", nargs="+", metavar="FOLDER", help="`eval humaneval` output folders")
    m.add_argument("--reference-from", nargs="+", default=[], metavar="FOLDER",
                   help="folders to take only the LLM-alone runs from (the ceiling), whatever draft they ran "
                   "beside: the LLM alone never runs the draft, so only its verifier's numerics must agree")
    m.add_argument("--out", required=True, help="a new output folder for the joined report")
    m.add_argument("--no-png", action="store_true", help="write the HTML figure only (PNG export needs a Chrome)")
    m.set_defaults(func=cmd_merge)
