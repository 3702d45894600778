"""`python -m hlm serve-cloud`: the verifier as an HTTP service (`hlm.cloud.server`) on uvicorn."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import TYPE_CHECKING

from hlm.cli.args import UsageError, add_model_args
from hlm.cloud import TOKEN_ENV
from hlm.cloud.server import MIN_TOKEN_CHARS, Limits, create_app, is_loopback
from hlm.cluster import check_address

if TYPE_CHECKING:
    from fastapi import FastAPI


def cmd_serve(args: argparse.Namespace) -> int:
    token = os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and (token is None or len(token) < MIN_TOKEN_CHARS):
        raise UsageError(f"refusing to listen on {args.host} without a bearer token: set {TOKEN_ENV} to a secret "
                         f"of at least {MIN_TOKEN_CHARS} characters (or bind 127.0.0.1)")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    limits = Limits(args.max_sessions, args.idle_s, int(args.max_request_mib * (1 << 20)),
                    int(args.max_kv_mib * (1 << 20)), args.body_timeout_s)
    if limits.max_sessions < 1 or limits.idle_s <= 0 or limits.max_request_bytes < 1024 or limits.max_kv_bytes <= 0 \
            or limits.body_timeout_s <= 0:
        raise UsageError("--max-sessions >= 1, --idle-s > 0, --max-request-mib >= 0.001, --max-kv-mib > 0 and "
                         "--body-timeout-s > 0")
    pooled = args.replicas is not None or args.ray is not None
    if pooled and (args.replicas or 1) < 1 or args.replica_cpus <= 0 or args.replica_gpus < 0:
        raise UsageError("--replicas >= 1, --replica-cpus > 0 and --replica-gpus >= 0")
    check_port_free(args.host, args.port)  # before minutes of model loading, not after
    if pooled:
        return serve_pool(args, limits, token)
    import torch

    from hlm.memory import return_large_buffers
    from hlm.models.presets import load_pair
    from hlm.worker import ModelThread

    if args.threads:
        torch.set_num_threads(args.threads)
    return_large_buffers()  # a server runs for hours: freed large buffers leave the process (`hlm.memory`)
    models = ModelThread("verifier")  # loads, then verifies: no other thread runs a kernel (`hlm.worker`)
    pair = models.call(lambda: load_pair(args.models, device=args.device, dtype=args.dtype, quant=args.quant))
    _serve(create_app(pair, limits, token, models), args, f"verifier {getattr(pair.verifier, 'hlm_name', pair.name)} "
           f"(pair {pair.name})", token)
    return 0


def serve_pool(args: argparse.Namespace, limits: Limits, token: str | None) -> int:
    """The same service over `--replicas` verifier replicas that Ray places (`hlm.cloud.pool`)."""
    from hlm import cluster
    from hlm.cloud.pool import PoolSpec, pool_app

    spec = PoolSpec(args.models, args.replicas or 1, args.replica_cpus, args.replica_gpus, args.threads,
                    args.device, args.dtype, args.quant)
    started = cluster.connect(args.ray or cluster.LOCAL)
    try:
        app, backend = pool_app(spec, limits, token)
        _serve(app, args, f"{spec.replicas} replicas of verifier {backend.facts['model']} (pair "
               f"{backend.facts['pair']}; {spec.cpus:g} CPU, {spec.gpus:g} GPU each, on Ray)", token)
    finally:
        cluster.shutdown(started)
    return 0


def _serve(app: FastAPI, args: argparse.Namespace, what: str, token: str | None) -> None:
    import uvicorn

    print(f"hlm cloud: {what} on http://{args.host}:{args.port}{' (bearer token required)' if token else ''}",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                server_header=False, date_header=False)


def check_port_free(host: str, port: int) -> None:
    """Bind the address as uvicorn will (SO_REUSEADDR, so a port in TIME_WAIT counts as free) and let it go."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): stop what uses that port or "
                         "choose another with --port") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-cloud", help="serve the verifier model over HTTP (for generate --cloud URL)",
                       description=f"Non-loopback hosts require a bearer token in ${TOKEN_ENV}.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-sessions", type=int, default=Limits.max_sessions)
    p.add_argument("--idle-s", type=float, default=Limits.idle_s, help="idle sessions expire after this")
    p.add_argument("--max-request-mib", type=float, default=Limits.max_request_bytes / (1 << 20))
    p.add_argument("--body-timeout-s", type=float, default=Limits.body_timeout_s,
                   help="a request body not received whole within this is cut (408)")
    p.add_argument("--max-kv-mib", type=float, default=Limits.max_kv_bytes / (1 << 20),
                   help="cap on the estimated KV-cache memory of all sessions together")
    pool = p.add_argument_group("a pool of verifier replicas on Ray (docs/fleet.md); without --replicas: one "
                                "model in this process")
    pool.add_argument("--replicas", type=int, default=None, help="verifier replicas, each its own model copy")
    pool.add_argument("--ray", type=check_address, default=None, metavar="ADDRESS",
                      help="local (default with --replicas: Ray on this machine, loopback only), auto or ray://HOST:PORT")
    pool.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    pool.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves per replica")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    add_model_args(p)
    p.set_defaults(func=cmd_serve)
