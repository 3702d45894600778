"""`python -m hlm bench`: the speed table of `hlm.experiments.bench` on one pair."""

from __future__ import annotations

import argparse

from hlm.cli.args import add_model_args, open_decoder


def cmd_bench(args: argparse.Namespace) -> int:
    import torch  # here, not at the top: `python -m hlm --help` builds every parser and must not load torch

    from hlm.experiments.bench import bench, plain_vs_fast
    from hlm.models.embedded import ensure_pair_dirs
    from hlm.models.presets import PRESETS

    decoder = open_decoder(args)
    rows = []
    if args.models in PRESETS and args.models != "tiny":
        refs = PRESETS[args.models]
        if args.models == "embedded":
            draft_ref, verifier_ref = (str(p) for p in ensure_pair_dirs(progress=False))
        else:
            draft_ref, verifier_ref = refs.draft, refs.verifier
        rows += plain_vs_fast(decoder, {"draft": draft_ref, "verifier": verifier_ref}, args.tokens, args.prompt,
                              args.guard_prompts)
    rows += bench(decoder, args.tokens, args.repeats, args.prompt)
    print(f"\nhlm bench: pair {decoder.pair.name}, {decoder.pair.describe()['draft']['dtype']} on "
          f"{decoder.device}, {torch.get_num_threads()} threads, {args.tokens} tokens; fast path: "
          f"{decoder.pair.quant or 'none'}\n")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        words = name.replace(":", "").split()
        shown = f"{value:.1%}" if "overhead" in words or "top-1" in words else \
            f"{value:.2f}x" if "ratio" in words else f"{value:.4f}" if "KL" in words else f"{value:.3f}"
        print(f"{name:<{width}}  {shown:>10}  {note}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed benchmark: overhead, verifier scaling, tokens/s per policy")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--guard-prompts", type=int, default=16, help="quality guard: tuning prompts (0 = skip)")
    p.add_argument("--prompt", default="Write a Python function that checks whether a string is a palindrome.")
    add_model_args(p)
    p.set_defaults(func=cmd_bench)
