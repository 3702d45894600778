"""The flags several commands share, and their translation into the plain values `hlm.session` takes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from hlm import session
from hlm.config import (
    COMPILED,
    DEVICE_PROFILES,
    ESTIMATORS,
    KNOB_HELP,
    LINK_PRESETS,
    QUANT_RECIPES,
    DeviceProfile,
    LinkConfig,
    PolicyConfig,
    RunConfig,
    SamplingConfig,
)
from hlm.errors import UserError
from hlm.estimators import REGISTRY
from hlm.policies import NAMES as POLICIES

if TYPE_CHECKING:
    from hlm.decoder import HybridDecoder
    from hlm.experiments.workers import Workers
    from hlm.models.pairs import Calibration


class UsageError(UserError):
    """Bad command-line input."""


def comma_list(kind: type, choices: Sequence[str] | None = None) -> Callable[[str], tuple]:
    """argparse type for a comma-separated list."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {kind.__name__}: {text!r}") from exc
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        bad = [str(v) for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices or ())}")
        return values
    return parse


def report_outputs(figures: dict[str, Any], written: str) -> None:
    """The end of an experiment's report: why PNG figures are missing, if they are, and what was written."""
    if figures.get("png_error"):
        print(f"PNG export failed ({figures['png_error']}); HTML figures written", file=sys.stderr)
    print(f"\nwrote {written}", file=sys.stderr)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=os.environ.get("HLM_MODELS", "embedded"),
                   help="preset (embedded, tiny, qwen, paper) or DRAFT,VERIFIER (hub ids, folders, .gguf files)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None,
                   help="bfloat16, float16 or float32 (default: bf16 where the hardware has fast kernels, else fp32)")
    p.add_argument("--quant", default=os.environ.get("HLM_QUANT", "auto"), choices=("auto", COMPILED, *QUANT_RECIPES),
                   help="weight-only fast path (hlm.quant): auto = the recipe the quality guard accepts per model, "
                        "where it measures faster at load; compiled = auto, and the draft's decode step compiled "
                        "once at load (CPU; about a minute, and the draft's numerics change: docs/speed.md)")


def add_cloud_args(p: argparse.ArgumentParser) -> None:
    """Where the verifier runs: declared once for every front end that can use a remote one (`open_decoder`)."""
    p.add_argument("--cloud", default=os.environ.get("HLM_CLOUD"),
                   help="URL of a remote verifier (`serve-cloud`); default: the verifier runs in this process")
    p.add_argument("--emulate-link", action="store_true", help="with --cloud: delay uploads by the modelled time")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Sampling, policy and link flags; defaults come from the config dataclasses (one source of truth)."""
    s, pol = SamplingConfig(), PolicyConfig()
    p.add_argument("--policy", default=pol.name, choices=POLICIES, help=KNOB_HELP["policy"])
    p.add_argument("--k", type=int, default=pol.k,
                   help=KNOB_HELP["k"])
    p.add_argument("--gamma", type=float, default=pol.gamma,
                   help=KNOB_HELP["gamma"])
    p.add_argument("--u-th", type=float, default=None,
                   help=KNOB_HELP["u_th"])
    p.add_argument("--estimator", default=pol.estimator, choices=ESTIMATORS,
                   help=KNOB_HELP["estimator"] + ": " + "; ".join(f"{n}: {e.description}" for n, e in REGISTRY.items()))
    p.add_argument("--skip-rate", type=float, default=pol.skip_rate, help="random policy: skip probability")
    p.add_argument("--temperature", type=float, default=s.temperature, help=KNOB_HELP["temperature"])
    p.add_argument("--top-p", type=float, default=s.top_p)
    p.add_argument("--max-new-tokens", type=int, default=s.max_new_tokens, help=KNOB_HELP["max_new_tokens"])
    p.add_argument("--seed", type=int, default=s.seed, help=KNOB_HELP["seed"])
    p.add_argument("--no-stop", action="store_true", help="do not stop at end of turn")
    # Names are checked in run_config, not by argparse `choices`, so a bad one is one line and exit status 2.
    p.add_argument("--device-profile", default=DeviceProfile().name,
                   help=KNOB_HELP["device_profile"] + ": " + "; ".join(f"{n}: {c.label}" for n, c in
                                                                      DEVICE_PROFILES.items()))
    p.add_argument("--link-preset", default=RunConfig.link_preset,
                   help=KNOB_HELP["link_preset"] + ": " + "; ".join(f"{n}: {c.label}" for n, c in LINK_PRESETS.items())
                        + " (the flags below override single fields of it)")
    link = p.add_argument_group("link and energy model (LinkConfig; units in the names; default: the preset's)")
    for f in fields(LinkConfig):
        meaning = f"{KNOB_HELP[f.name]}; " if f.name in KNOB_HELP else ""
        link.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                          help=f"{meaning}default preset: {f.default}")


def shared_values(args: argparse.Namespace) -> dict[str, Any]:
    """The `add_run_args` flags every command keeps as they are (the sweep replaces the others with lists)."""
    return {"u_th": args.u_th, "temperature": args.temperature, "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens, "stop_at_eos": not args.no_stop, "device": args.device_profile,
            "link": args.link_preset, "link_overrides": {f.name: getattr(args, f.name) for f in fields(LinkConfig)}}


def run_values(args: argparse.Namespace) -> dict[str, Any]:
    """The `add_run_args` flags as `hlm.session.run_config`'s keyword arguments."""
    return {**shared_values(args), "policy": args.policy, "k": args.k, "gamma": args.gamma,
            "estimator": args.estimator, "skip_rate": args.skip_rate, "seed": args.seed}


def run_config(args: argparse.Namespace, calibration: Calibration | None = None) -> RunConfig:
    return session.run_config(**run_values(args), calibration=calibration)


def open_decoder(args: argparse.Namespace, link: LinkConfig | None = None) -> HybridDecoder:
    """The `add_model_args` flags, and the `add_cloud_args` ones where the command has them, as a decoder."""
    emulate = (link or LinkConfig()) if getattr(args, "emulate_link", False) else None
    return session.open_decoder(args.models, args.device, args.dtype, args.quant, getattr(args, "cloud", None),
                                emulate)


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """Where an experiment's jobs run (`hlm.experiments.workers`): this process, or actors on a Ray cluster."""
    from hlm.cluster import ClusterError, check_address

    def address(text: str) -> str:
        try:
            return check_address(text)
        except ClusterError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    g = p.add_argument_group("cluster (Ray; docs/cluster.md)")
    g.add_argument("--ray", default=None, metavar="ADDRESS", type=address,
                   help="run the jobs on Ray actors: local (a Ray instance on this machine, loopback only), auto (the "
                        "cluster this machine joined with `ray start`) or ray://HOST:10001 (Ray client)")
    g.add_argument("--workers", type=int, default=1, help="with --ray: actors, each holding one model pair")
    g.add_argument("--worker-cpus", type=float, default=1.0, help="with --ray: CPUs reserved per actor")
    g.add_argument("--worker-gpus", type=float, default=0.0, help="with --ray: GPUs per actor (1: one pair per GPU)")


def open_workers(args: argparse.Namespace) -> Workers:
    """The `add_model_args` and `add_cluster_args` flags as the workers an experiment's jobs run on."""
    from hlm.experiments.workers import LocalWorkers, PairSpec, RayWorkers

    if args.ray is None:
        return LocalWorkers(open_decoder(args))
    return RayWorkers(PairSpec(args.models, args.device, args.dtype, args.quant, getattr(args, "cloud", None)),
                      args.workers, args.worker_cpus, args.worker_gpus, args.ray)
