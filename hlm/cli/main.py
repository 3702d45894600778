"""`python -m hlm`: generate, calibrate, bench, sweep, study, eval, serve-cloud, fleet and references, one module
each here.

The argparse side of every command lives in this package, one module a command (`register` adds its parser,
`cmd_*` turns the flags into plain values for the library). Bad input (`hlm.errors.UserError`) exits with status 2
and one line on stderr; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hlm.cli import bench, calibrate, evaluate, fleet, generate, references, serve, study, sweep
from hlm.errors import UserError

COMMANDS = (generate, calibrate, bench, sweep, study, evaluate, serve, fleet, references)  # the order `--help` lists


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
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
