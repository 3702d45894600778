"""`python -m hlm study`: the selection study of `hlm.experiments.study` on one pair, with its report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hlm import session
from hlm.cli.args import UsageError, add_cluster_args, add_model_args, open_workers
from hlm.config import PolicyConfig, RunConfig, SamplingConfig
from hlm.experiments.prompts import DEFAULT_PROMPTS, load_prompts
from hlm.policies import with_role

if TYPE_CHECKING:
    import numpy as np

    from hlm.estimators import SelectionCalibration
    from hlm.experiments.workers import Workers


def _subject(args: argparse.Namespace, temperature: float, max_new_tokens: int) -> RunConfig:
    """The policy under study at the knobs given (--estimator, --k, --gamma)."""
    policy = PolicyConfig(name=with_role("subject"), k=args.k, gamma=args.gamma,
                          **({"estimator": args.estimator} if args.estimator else {}))
    return RunConfig(SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens), policy)


def _calibration(args: argparse.Namespace, workers: Workers, prompts: list[dict[str, str]],
                 records: list[dict[str, Any]]) -> tuple[SelectionCalibration, dict[str, list[np.ndarray]] | None]:
    """The pair's selection calibration, or with --fit one fitted on these records (written to --fit, the judge
    beside it), with the learned scores' out-of-fold scores."""
    from hlm.experiments.study import fit_calibration

    if not args.fit:
        return workers.facts.selection, None
    note = (f"fitted by `python -m hlm study --fit` on {args.prompts} ({len(prompts)} prompts, "
            f"{args.max_new_tokens} tokens, greedy + T={args.temperature} seeds {list(args.seeds)})")
    cal, oof = fit_calibration(records, note, [p["prompt"] for p in prompts])
    cal.save(args.fit)
    print(f"[study] wrote the selection calibration to {args.fit}", file=sys.stderr)
    return cal, oof


def _end_to_end(args: argparse.Namespace, workers: Workers, prompts: list[dict[str, str]],
                records: list[dict[str, Any]], result: dict[str, Any]) -> None:
    """--quality and --confirm: real decoder runs of the subject against its counterfactual and its control."""
    from hlm.experiments.study import confirm, sampled_quality

    out = Path(args.out)
    if args.quality:
        config = _subject(args, args.temperature, args.quality)
        result["quality"] = sampled_quality(workers, prompts[: args.quality_limit], out, config, args.references)
    if args.confirm:
        config = _subject(args, 0.0, args.confirm)
        refs = {r["prompt_id"]: r["tokens"] for r in records if r["mode"] == "greedy"}
        chosen = [p for p in prompts if p["id"] in refs][: args.confirm_limit]
        result["confirm"] = confirm(workers, chosen, refs, out, config, args.coin_seeds)
        result["confirm"]["config"] = config.to_dict()


def cmd_study(args: argparse.Namespace) -> int:
    from hlm.experiments.study import print_report, write_outputs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [p for path in args.prompts.split(",") for p in load_prompts(path)][: args.limit]
    workers = open_workers(args)
    try:
        leaked = workers.facts.selection.leaked([p["prompt"] for p in prompts])
        if leaked and not args.fit:
            raise UsageError(f"{len(leaked)} of these prompts were used to fit the pair's selection calibration "
                             f"({workers.facts.selection.note}); report on prompts it has not seen "
                             "(e.g. hlm/assets/prompts-heldout.jsonl)")
        result = _study(args, workers, prompts, out)
    finally:
        workers.close()
    write_outputs(result, out)
    print_report(result)
    return 0


def _study(args: argparse.Namespace, workers: Workers, prompts: list[dict[str, str]], out: Path) -> dict[str, Any]:
    """Collect (resuming), score and, if asked, fit and run the end-to-end checks."""
    from hlm.experiments.study import analyse, choose_defaults, collect

    records = collect(workers, args.models, prompts, out, args.max_new_tokens, args.seeds, args.temperature,
                      args.batch)
    if not records:
        raise UsageError("no prompt produced an answer to study")
    cal, oof = _calibration(args, workers, prompts, records)
    u_th = session.resolve_u_th(args.u_th, workers.facts.calibration)[0]
    result = analyse(records, cal, oof, args.k, args.gamma, u_th)
    result.update({"prompts_file": str(args.prompts), "models": args.models, "max_new_tokens": args.max_new_tokens,
                   "probe": "out-of-fold (4 folds by prompt)" if oof is not None else "the pair's calibration",
                   "judge": "out-of-fold (4 folds by prompt)" if oof and "judge" in oof else "the pair's calibration"})
    if args.fit:
        result["decisions"] = choose_defaults(result)
        (out / "decisions.json").write_text(json.dumps(result["decisions"], indent=1) + "\n", encoding="utf-8")
    if args.confirm or args.quality:
        _end_to_end(args, workers, prompts, records, result)
    return result


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="token-level selection study: every score vs a coin and an oracle")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="prompt files, comma-separated")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default="runs/study")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",") if x], default=[0],
                   help="sampled-path seeds, comma-separated (empty: greedy replay only)")
    p.add_argument("--temperature", type=float, default=0.7, help="of the sampled paths and --quality")
    p.add_argument("--batch", type=int, default=8, help="prompts per batched generation")
    p.add_argument("--fit", default=None, metavar="JSON",
                   help="fit the pair's selection calibration on these prompts and write it here")
    p.add_argument("--k", type=int, default=PolicyConfig.k, help="the knob setting to report (score estimators)")
    p.add_argument("--gamma", type=float, default=PolicyConfig.gamma)
    p.add_argument("--u-th", type=float, default=None, help="paper-literal rule (default: the pair's calibrated)")
    p.add_argument("--confirm", type=int, default=0, metavar="N",
                   help="end to end: real greedy runs of N tokens, ours (--estimator, --k, --gamma) vs a coin matched "
                        "per prompt to its upload count, against the LLM's greedy answer")
    p.add_argument("--confirm-limit", type=int, default=None, help="prompts for --confirm (default: all)")
    p.add_argument("--quality", type=int, default=0, metavar="N",
                   help="at --temperature: ours vs hlm over N tokens, BERTScore against several LLM samples")
    p.add_argument("--references", type=int, default=3, help="LLM samples per prompt for --quality")
    p.add_argument("--quality-limit", type=int, default=None, help="prompts for --quality (default: all)")
    p.add_argument("--coin-seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--estimator", default=None, help="for --confirm (default: PolicyConfig's)")
    add_model_args(p)
    add_cluster_args(p)
    p.set_defaults(func=cmd_study)
