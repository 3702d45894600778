"""`python -m hlm fleet`: the flags of `hlm.experiments.fleet` and its report. Against `--cloud URL` (a running
`serve-cloud`, pooled or not), or, without it, a pool of `--replicas` started in this process on Ray."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from hlm import session
from hlm.cli.args import (
    UsageError,
    add_model_args,
    add_run_args,
    comma_list,
    open_decoder,
    report_outputs,
    shared_values,
)
from hlm.cloud import TOKEN_ENV
from hlm.cluster import check_address
from hlm.experiments.prompts import load_prompts
from hlm.policies import REGISTRY, with_role

REPLAYED = tuple(n for n, p in REGISTRY.items() if p.drafts and p.uploads)  # policies whose uploads can be replayed
HELDOUT = Path(__file__).resolve().parent.parent / "assets" / "prompts-heldout.jsonl"


@contextlib.contextmanager
def own_pool(args: argparse.Namespace, max_devices: int) -> Iterator[str]:
    """A pool of `--replicas` on Ray (local by default), served on a free loopback port; yields its URL."""
    from hlm import cluster
    from hlm.cloud.pool import PoolSpec, pool_app
    from hlm.cloud.server import Limits, serve_in_thread

    spec = PoolSpec(args.models, args.replicas, args.replica_cpus, args.replica_gpus, 0, args.device, args.dtype,
                    args.quant)
    limits = Limits(max_sessions=max(Limits.max_sessions, max_devices))
    started = cluster.connect(args.ray or cluster.LOCAL)
    try:
        app, _ = pool_app(spec, limits)
        with serve_in_thread(app) as url:
            yield url
    finally:
        cluster.shutdown(started)


def cmd_fleet(args: argparse.Namespace) -> int:
    from hlm.experiments.fleet import FleetSpec, fleet, format_rows
    from hlm.experiments.sweep import Grid

    if args.replicas < 1 or args.replica_cpus <= 0 or args.replica_gpus < 0:
        raise UsageError("--replicas >= 1, --replica-cpus > 0 and --replica-gpus >= 0")
    base = session.run_config(**shared_values(args), policy=with_role("counterfactual"), seed=args.seed)
    prompts = load_prompts(args.prompts, args.limit)
    if len({p["id"] for p in prompts}) != len(prompts):
        raise UsageError(f"{args.prompts}: prompt ids must be unique (they key the trace cache)")
    grid = Grid(args.policies, (args.k,), (args.gamma,), (args.estimator,), (args.seed,))  # validates
    FleetSpec(args.models, prompts, grid, base, args.cloud or "", Path(args.out), args.devices, args.duration_s,
              args.budget_ms)  # validates before any model is loaded
    decoder = open_decoder(argparse.Namespace(**{**vars(args), "cloud": None}))  # records in process
    u_th, u_th_source = session.resolve_u_th(args.u_th, decoder.pair.calibration)
    grid = Grid(args.policies, (args.k,), (args.gamma,), (args.estimator,), (args.seed,), u_th)
    meta = {"u_th_source": u_th_source, "pair": decoder.pair.describe(), "prompt_file": str(args.prompts),
            "pool": args.cloud or f"{args.replicas} replica(s) started by fleet ({args.replica_cpus:g} CPU, "
                                  f"{args.replica_gpus:g} GPU each)"}
    with contextlib.nullcontext(args.cloud) if args.cloud else own_pool(args, max(args.devices)) as url:
        spec = FleetSpec(args.models, prompts, grid, replace(base, u_th_source=u_th_source), url, Path(args.out),
                         args.devices, args.duration_s, args.budget_ms, os.environ.get(TOKEN_ENV) or None,
                         args.seed, png=not args.no_png, meta=meta)
        result = fleet(decoder, spec)
    print(format_rows(result.rows, result.capacity))
    report_outputs(result.figures, f"{args.out}/fleet.csv, fleet.json and figures/fleet_p95.html")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fleet", help="how many devices a verifier pool serves per policy, from recorded traces",
                       description="Record each policy's verify calls on held-back prompts, then replay them from N "
                       "simulated devices (paced by the device profile and the modelled link) against a verifier "
                       "pool over HTTP; docs/fleet.md.", conflict_handler="resolve")
    add_model_args(p)
    add_run_args(p)
    p.set_defaults(device_profile="phone")
    p.add_argument("--policies", "--policy", type=comma_list(str, REPLAYED), default=REPLAYED,
                   help=f"comma-separated subset of {','.join(REPLAYED)} ({with_role('control')} is matched to "
                   f"{with_role('subject')}'s upload rate)")
    p.add_argument("--prompts", default=str(HELDOUT), help="JSON Lines prompt file (default: the held-back set)")
    p.add_argument("--limit", type=int, default=4, help="use the first N prompts (0: all)")
    p.add_argument("--devices", type=comma_list(int), default=(1, 2, 4, 8), help="comma-separated numbers of devices")
    p.add_argument("--duration-s", type=float, default=30.0,
                   help="per (policy, N): devices start another trace until this has passed (0: one trace each)")
    p.add_argument("--budget-ms", type=float, default=1000.0, help="p95 verify latency a pool must stay within")
    p.add_argument("--cloud", default=None, help=f"URL of a running serve-cloud (token from ${TOKEN_ENV}); "
                   "default: start a pool here")
    p.add_argument("--replicas", type=int, default=1, help="without --cloud: replicas of the pool started here")
    p.add_argument("--ray", type=check_address, default=None, metavar="ADDRESS",
                   help="without --cloud: local (default; loopback only), auto or ray://HOST:PORT")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="without --cloud: CPUs per replica")
    p.add_argument("--replica-gpus", type=float, default=0.0, help="without --cloud: GPUs per replica")
    p.add_argument("--out", required=True, help="output folder; traces cached under OUT/traces")
    p.add_argument("--no-png", action="store_true", help="write the HTML figure only")
    p.set_defaults(func=cmd_fleet)

