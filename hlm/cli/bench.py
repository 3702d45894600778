"""`python -m hlm bench`: the speed table of `hlm.experiments.bench` on one pair."""

from __future__ import annotations

import argparse
import functools

from hlm.cli.args import add_model_args, comma_list, open_decoder
from hlm.config import BENCH_SECTIONS as SECTIONS


def cmd_bench(args: argparse.Namespace) -> int:
    import torch  # here, not at the top: `python -m hlm --help` builds every parser and must not load torch

    from hlm.experiments.bench import bench
    from hlm.models.presets import load_unquantised

    decoder = open_decoder(args)
    rows = bench(decoder, functools.partial(load_unquantised, args.models), args.sections, n_tokens=args.tokens,
                 repeats=args.repeats, prompt=args.prompt, guard_prompts=args.guard_prompts, n_prompts=args.prompts,
                 bandwidth_mib=args.bandwidth_mib)
    print(f"\nhlm bench: pair {decoder.pair.name}, {decoder.pair.describe()['draft']['dtype']} on "
          f"{decoder.device}, {torch.get_num_threads()} threads, {args.tokens} tokens; fast path: "
          f"{decoder.pair.quant or 'none'}\n")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        words = name.replace(":", "").split()
        shown = f"{value:.{2 if abs(value) < 0.01 else 1}%}" if {"overhead", "top-1", "fraction"} & set(words) else \
            f"{value:.2f}x" if "ratio" in words else f"{value:.4f}" if "KL" in words else f"{value:.3f}"
        print(f"{name:<{width}}  {shown:>10}  {note}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed benchmark: the bandwidth bound, plain generate vs the project's path on "
                                     "held-back prompts, overhead, verifier scaling, tokens/s per policy")
    p.add_argument("--tokens", type=_positive, default=64, help="new tokens per run (the speed targets use 96)")
    p.add_argument("--repeats", type=_positive, default=3)
    p.add_argument("--prompts", type=_positive, default=8,
                   help="held-back prompts of the heldout section (the first of each category, then in order)")
    p.add_argument("--sections", type=comma_list(str, SECTIONS), default=SECTIONS,
                   help=f"comma-separated, run in this order: {','.join(SECTIONS)} (default: all)")
    p.add_argument("--bandwidth-mib", type=_positive, default=1024,
                   help="limit section: the buffer the memory bandwidth is measured over (far above the L3 cache)")
    p.add_argument("--guard-prompts", type=int, default=16, help="quality guard: tuning prompts (0 = skip)")
    p.add_argument("--prompt", default="Write a Python function that checks whether a string is a palindrome.")
    add_model_args(p)
    p.set_defaults(func=cmd_bench)
