"""`python -m hlm`: generate, calibrate, bench, and the subcommands other modules register.

Bad input exits with status 2 and one line on stderr; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import fields, replace

from hlm.config import (
    DEVICE_PROFILES,
    ESTIMATORS,
    LINK_PRESETS,
    MAX_PROMPT_CHARS,
    POLICIES,
    QUANT_RECIPES,
    DeviceProfile,
    LinkConfig,
    PolicyConfig,
    RunConfig,
    SamplingConfig,
    device_profile,
    link_preset,
)
from hlm.errors import UserError
from hlm.estimators import REGISTRY

SUBCOMMAND_MODULES: tuple[str, ...] = ("hlm.experiments.calibrate", "hlm.experiments.bench", "hlm.experiments.sweep",
                                      "hlm.experiments.study", "hlm.cloud.server")
COLOURS = {"local": "", "cloud_accepted": "\033[32m", "cloud_resampled": "\033[31m", "cloud_sampled": "\033[34m",
           "unverified": "\033[33m"}


class UsageError(UserError):
    """Bad command-line input."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=os.environ.get("HLM_MODELS", "embedded"),
                   help="preset (embedded, tiny, qwen, paper) or DRAFT,VERIFIER (hub ids, folders, .gguf files)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None,
                   help="bfloat16, float16 or float32 (default: bf16 where the hardware has fast kernels, else fp32)")
    p.add_argument("--quant", default=os.environ.get("HLM_QUANT", "auto"), choices=("auto", *QUANT_RECIPES),
                   help="weight-only fast path (hlm.quant): auto = the recipe the quality guard accepts per model, "
                        "where it measures faster at load")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Sampling, policy and link flags; defaults come from the config dataclasses (one source of truth)."""
    s, pol = SamplingConfig(), PolicyConfig()
    p.add_argument("--policy", default=pol.name, choices=POLICIES)
    p.add_argument("--k", type=int, default=pol.k,
                   help="ours: about k uploads per 32 drafts, 1..32 (paper-* estimators: attention-row rank bound)")
    p.add_argument("--gamma", type=float, default=pol.gamma,
                   help="ours: strictness, raises the bar by gamma std of the score (paper-*: row mean + gamma*std)")
    p.add_argument("--u-th", type=float, default=None,
                   help="uncertainty threshold in [0, 1] (default: the pair's calibrated risk-averse value)")
    p.add_argument("--estimator", default=pol.estimator, choices=ESTIMATORS,
                   help="how ours scores a draft: " + "; ".join(f"{n}: {e.description}" for n, e in REGISTRY.items()))
    p.add_argument("--skip-rate", type=float, default=pol.skip_rate, help="random policy: skip probability")
    p.add_argument("--temperature", type=float, default=s.temperature)
    p.add_argument("--top-p", type=float, default=s.top_p)
    p.add_argument("--max-new-tokens", type=int, default=s.max_new_tokens)
    p.add_argument("--seed", type=int, default=s.seed)
    p.add_argument("--no-stop", action="store_true", help="do not stop at end of turn")
    # Names are checked in run_config, not by argparse `choices`, so a bad one is one line and exit status 2.
    p.add_argument("--device-profile", default=DeviceProfile().name,
                   help="who drafts: " + "; ".join(f"{n}: {c.label}" for n, c in DEVICE_PROFILES.items()))
    p.add_argument("--link-preset", default=RunConfig.link_preset,
                   help="the link: " + "; ".join(f"{n}: {c.label}" for n, c in LINK_PRESETS.items())
                        + " (the flags below override single fields of it)")
    link = p.add_argument_group("link and energy model (LinkConfig; units in the names; default: the preset's)")
    for f in fields(LinkConfig):
        link.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                          help=f"default preset: {f.default}")


def run_config(args: argparse.Namespace, calibrated_u_th: float | None = None) -> RunConfig:
    u_th = args.u_th if args.u_th is not None else calibrated_u_th
    policy = {"name": args.policy, "k": args.k, "gamma": args.gamma, "estimator": args.estimator,
              "skip_rate": args.skip_rate, **({"u_th": u_th} if u_th is not None else {})}
    return RunConfig(
        SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                       seed=args.seed, stop_at_eos=not args.no_stop),
        PolicyConfig(**policy),
        replace(link_preset(args.link_preset),
                **{f.name: getattr(args, f.name) for f in fields(LinkConfig) if getattr(args, f.name) is not None}),
        device_profile(args.device_profile),
        args.link_preset,
    )


def load_decoder(args: argparse.Namespace, link: LinkConfig | None = None):  # -> HybridDecoder (lazy torch import)
    from hlm.decoder import HybridDecoder
    from hlm.models.presets import load_pair

    pair = load_pair(args.models, device=args.device, dtype=args.dtype, quant=args.quant)
    verifier = None
    if getattr(args, "cloud", None):
        from hlm.cloud.client import HttpVerifier

        verifier = HttpVerifier(args.cloud, vocab_size=pair.vocab_size, token=os.environ.get("HLM_CLOUD_TOKEN"),
                                emulate_link=(link or LinkConfig()) if args.emulate_link else None)
    return HybridDecoder(pair, verifier)


def cmd_generate(args: argparse.Namespace) -> int:
    config_check = run_config(args)  # validate flags before loading any model
    decoder = load_decoder(args, config_check.link)
    cal = decoder.pair.calibration
    config = run_config(args, cal.risk_averse if cal else None) if args.u_th is None else config_check
    if args.json:
        text, events, summary = decoder.run(args.prompt, config)
        json.dump({"text": text, "tokens": [e.to_dict() for e in events], "summary": summary, "config":
                   config.to_dict(), "numerics": decoder.pair.numerics, "fast_path": decoder.pair.quant}, sys.stdout)
        print()
        return 0
    from hlm.metrics import summarize

    colour = sys.stdout.isatty()
    events = []
    for e in decoder.generate(args.prompt, config):
        events.append(e)
        sys.stdout.write(f"{COLOURS[e.source]}{e.text}\033[0m" if colour and COLOURS[e.source] else e.text)
        sys.stdout.flush()
    s = summarize(events, config.link, decoder.pair.vocab_size, config.policy.name,
                  decoder.energy_methods(config.link, config.device), decoder.call_s,
                  device_profile=config.device.name, link_preset=config.link_preset)
    saving = f"{s.energy_saving:.1%}" if s.energy_saving is not None else "n/a"
    print(f"\n\n[{s.policy}] {s.tokens} tokens, upload rate {s.upload_rate:.1%}, {s.llm_calls} LLM calls, "
          f"accepted {s.accepted}, resampled {s.resampled}, unverified {s.unverified}; device energy "
          f"{s.device_energy_j:.3f} J of which link {s.link_energy_j:.3f} J (HLM {s.hlm_device_energy_j or 0:.3f} J, "
          f"saving {saving}); device {s.device_profile}, link {s.link_preset}; "
          f"{s.tokens_per_s:.2f} tok/s measured, {s.tokens_per_s_modelled_link:.2f} tok/s with the modelled link; "
          f"models: {decoder.pair.numerics}", file=sys.stderr)
    if colour:
        print("colours: plain = kept locally, green = cloud accepted, red = cloud resampled, "
              "blue = cloud only, yellow = unverified", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text with the hybrid decoder")
    gen.add_argument("--prompt", required=True, help=f"up to {MAX_PROMPT_CHARS:,} characters (and the pair's context)")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, summary")
    gen.add_argument("--cloud", default=os.environ.get("HLM_CLOUD"), help="URL of `serve-cloud` (default: in process)")
    gen.add_argument("--emulate-link", action="store_true", help="with --cloud: delay uploads by the modelled time")
    add_model_args(gen)
    add_run_args(gen)
    gen.set_defaults(func=cmd_generate)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from hlm.verifier import CloudUnavailable

    try:
        return args.func(args)
    except CloudUnavailable as exc:
        print(f"error: the cloud verifier is unavailable: {exc}", file=sys.stderr)
        return 1
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
