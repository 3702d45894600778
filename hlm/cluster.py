"""Ray, only when asked: `--ray ADDRESS` on a command joins or starts the cluster its work runs on.

`local` starts a Ray instance on this machine, bound to 127.0.0.1 only; `auto` joins the cluster this machine
belongs to (`ray start` ran here); `ray://HOST:10001` connects as a Ray client. The `hlm` package travels to every
worker in the job's runtime environment (so nodes need only the requirements installed, not this checkout); model
files are resolved on each node as they would be there (`HLM_*` and `HF_HUB_OFFLINE` are passed along). Ray is
imported here, inside the functions, so a command without `--ray` never loads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hlm.errors import UserError

LOCAL, AUTO = "local", "auto"
# Ray on one machine otherwise advertises the machine's interface address; with this it stays on 127.0.0.1. Ray
# reads it when imported, so `connect` sets it before the import (a process that imported Ray earlier sets it first).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PASSED_ENV_PREFIXES = ("HLM_", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE")


class ClusterError(UserError):
    """The cluster named by --ray cannot be reached or used."""


def check_address(address: str) -> str:
    """`address` if it is one `connect` understands (argparse type: a bad one is one line, exit status 2)."""
    if address in (LOCAL, AUTO) or address.startswith("ray://"):
        return address
    raise ClusterError(f"--ray {address!r}: give local, auto or ray://HOST:PORT")


def runtime_env() -> dict[str, Any]:
    """What every worker gets: this `hlm` package and the environment variables that say where models live."""
    import hlm

    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV_PREFIXES)}
    return {"py_modules": [str(Path(hlm.__file__).parent)], "env_vars": env}


def connect(address: str, num_cpus: int | None = None) -> bool:
    """Join or start the cluster at `address` (see the module doc); returns True if this call started a local
    instance (the caller then shuts it down). A process already connected stays on its cluster."""
    check_address(address)
    if address == LOCAL:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"runtime_env": runtime_env(), "include_dashboard": False, "log_to_driver": False,
                              "configure_logging": False}
    if address == LOCAL:  # "local": a new instance even where `ray start` runs (ray.init() alone would join it)
        kwargs |= {"address": LOCAL, "num_cpus": num_cpus}
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {exc}") from exc
    return address == LOCAL


def shutdown(started: bool) -> None:
    """Stop the local instance this process started (`connect` returned True); a joined cluster is left as it is."""
    if started:
        import ray

        ray.shutdown()
