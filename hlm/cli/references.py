"""`python -m hlm references`: decode the LLM's greedy answers to the page's example prompts into the user cache,
so the app scores them without decoding the LLM (the Dockerfile runs it at build time; the app also builds them in
the background at start-up, `hlm.dashboard.service.Service.build_references`)."""

from __future__ import annotations

import argparse
import sys

from hlm.cli.args import add_model_args


def cmd_references(args: argparse.Namespace) -> int:
    from hlm.dashboard.service import Service  # the models' stack: not for --help

    service = Service.open(args.models, args.device, args.dtype, args.quant)
    built = service.build_references()
    where = service.store.folder if service.store else "memory"
    print(f"{len(built)} reference(s) decoded into {where}; the others were there already", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("references", help="decode the LLM's answers to the page's examples into the user cache")
    add_model_args(p)
    p.set_defaults(func=cmd_references)
