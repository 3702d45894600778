"""`serve-cloud --replicas N`: the verifier as a pool of Ray actors behind the one FastAPI front of `hlm.cloud.server`.

The front (this process) keeps everything a client meets as it is: the routes, bearer-token auth, request-size
caps, body timeouts, JSON errors and /metrics. Only its `Backend` differs: N `Replica` actors, each a model pair and
a `SessionStore` in a process Ray placed (with `--replica-cpus/--replica-gpus` each, on any node of the cluster).

Strict session affinity: a session's KV cache lives in one replica, so the front picks the replica when the session
opens (the one holding the fewest sessions) and keeps `session id -> replica`; every later request of that id goes
to that replica, and nowhere else. Ray runs an actor's calls one at a time, in order (as the single worker thread
does in one process): sessions never race.

Faults: Ray restarts a replica whose process dies (`max_restarts`); the sessions it held are gone. The request that
finds it dead answers 503 (the client keeps its draft as `unverified` and backs off) and its route is dropped; a
later request for a session the restarted replica no longer knows answers 404. Either way the client's resync
(`hlm.cloud.client`: re-open, re-send the committed context) rebuilds the session on a live replica. /metrics
counts `lost_sessions` (routes dropped because their replica died or no longer held them), `replica_failures`
(calls that found their replica dead) and, as the single server does, `resyncs` (re-opens a client marked as one).

Ray carries bodies between trusted processes of one cluster; the network input is parsed by `hlm.cloud.wire` in the
replica, as in one process. Ray's own ports have no authentication: keep the cluster on a private network.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hlm.cloud.server import CloudService, HttpError, Limits, SessionStore, build_app, replica_entry
from hlm.cluster import ClusterError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from hlm.config import SamplingConfig
    from hlm.verifier import Verdict

MAX_RESTARTS = -1  # Ray restarts a dead replica as often as it dies (a model that fails to load is not restarted)
METRICS_TIMEOUT_S = 10.0  # /metrics does not wait longer for a replica (a dead or restarting one)


@dataclass(frozen=True)
class PoolSpec:
    """What each replica loads and what Ray reserves for it."""

    models: str
    replicas: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    threads: int = 0  # torch CPU threads per replica (0: one per reserved CPU)
    device: str | None = None
    dtype: str | None = None
    quant: str = "auto"
    start_timeout_s: float = 900.0  # loading the models and placing every replica


class Replica:
    """One verifier replica (a Ray actor): the pair's verifier and a `SessionStore`, plus its work figures."""

    def __init__(self, index: int, spec: PoolSpec, limits: Limits) -> None:
        import torch

        from hlm.memory import return_large_buffers
        from hlm.models.presets import load_pair

        torch.set_num_threads(spec.threads or max(1, int(spec.cpus)))
        return_large_buffers()  # each replica serves for hours (`hlm.memory`)
        self.index, self.started = index, time.monotonic()
        self.store = SessionStore(load_pair(spec.models, device=spec.device, dtype=spec.dtype, quant=spec.quant),
                                  limits)

    def facts(self) -> dict[str, Any]:
        return self.store.facts()

    def open(self, sampling: SamplingConfig) -> str:
        return self.store.open(sampling)

    def verify(self, sid: str, body: bytes) -> tuple[bytes, Verdict]:
        return self.store.verify(sid, body)

    def prefill(self, sid: str, body: bytes) -> int:
        return self.store.prefill(sid, body)

    def close(self, sid: str) -> None:
        self.store.close(sid)

    def expire(self) -> list[str]:
        return self.store.expire()

    def usage(self) -> dict[str, Any]:
        """`SessionStore.usage`, its work as this replica's row of /metrics' `replicas`."""
        import ray

        usage = self.store.usage()
        usage["replica"] = replica_entry(self.index, usage.pop("work"), time.monotonic() - self.started,
                                         ray.util.get_node_ip_address())
        return usage


class ReplicaDown(HttpError):
    """The replica holding a session died; the session is lost (the client re-opens it after its backoff)."""

    def __init__(self, index: int) -> None:
        super().__init__(503, f"verifier replica {index} failed; its sessions are lost, re-open")
        self.index = index

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return type(self), (self.index,)


def start_replicas(spec: PoolSpec, limits: Limits) -> list[Any]:
    """The replicas as Ray actors (connect first: `hlm.cluster.connect`), once every one has loaded its model."""
    import ray

    actor = ray.remote(Replica).options(num_cpus=spec.cpus, num_gpus=spec.gpus, max_restarts=MAX_RESTARTS,
                                        max_task_retries=0, max_concurrency=1)
    actors = [actor.remote(i, spec, limits) for i in range(spec.replicas)]
    try:
        ray.get([a.facts.remote() for a in actors], timeout=spec.start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(f"Ray did not place and load {spec.replicas} replicas of {spec.cpus:g} CPU and "
                           f"{spec.gpus:g} GPU each within {spec.start_timeout_s:g} s (cluster: "
                           f"{ray.cluster_resources()})") from None
    return actors


class PoolBackend:
    """`hlm.cloud.server.Backend` over replica actors, with strict session affinity (module doc). Its state (the
    routes, the counters) is touched only on the front's event loop."""

    def __init__(self, actors: list[Any], facts: dict[str, Any]) -> None:
        self.actors, self.facts, self.replicas = actors, facts, len(actors)
        self.routes: dict[str, int] = {}  # session id -> the replica that holds it
        self.opening = [0] * len(actors)  # opens under way per replica (they count as its sessions)
        self.counts: Counter[str] = Counter()

    @classmethod
    def start(cls, spec: PoolSpec, limits: Limits) -> PoolBackend:
        import ray

        actors = start_replicas(spec, limits)
        return cls(actors, ray.get(actors[0].facts.remote()))

    async def _call(self, index: int, method: str, *args: Any) -> Any:
        """`method` on replica `index`; its `HttpError` as it was raised there, `ReplicaDown` if it is dead."""
        import ray

        try:
            return await getattr(self.actors[index], method).remote(*args)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, HttpError):
                raise exc.cause from None
            raise
        except ray.exceptions.RayActorError:
            self.counts["replica_failures"] += 1
            raise ReplicaDown(index) from None

    async def _session_call(self, sid: str, method: str, *args: Any) -> Any:
        """`method` for session `sid` on the replica that holds it; its route dropped once the session is gone."""
        index = self.routes.get(sid)
        if index is None:
            raise HttpError(404, "unknown or expired session")
        try:
            return await self._call(index, method, sid, *args)
        except HttpError as exc:
            if (isinstance(exc, ReplicaDown) or exc.status == 404) and self.routes.pop(sid, None) is not None:
                self.counts["lost_sessions"] += 1
            raise

    def load(self) -> list[int]:
        """Sessions routed to each replica, or being opened there."""
        load = list(self.opening)
        for index in self.routes.values():
            load[index] += 1
        return load

    async def open(self, sampling: SamplingConfig) -> str:
        """On the replica holding the fewest sessions; a full or dead one passes to the next (503 if none)."""
        load = self.load()
        refused: HttpError | None = None
        for index in sorted(range(self.replicas), key=lambda i: (load[i], i)):
            self.opening[index] += 1
            try:
                sid = await self._call(index, "open", sampling)
            except HttpError as exc:
                if exc.status != 503:
                    raise
                refused = exc
                continue
            finally:
                self.opening[index] -= 1
            self.routes[sid] = index
            return sid
        raise refused or HttpError(503, "no verifier replica")

    async def verify(self, sid: str, body: bytes) -> tuple[bytes, Verdict]:
        return await self._session_call(sid, "verify", body)

    async def prefill(self, sid: str, body: bytes) -> int:
        return await self._session_call(sid, "prefill", body)

    async def close(self, sid: str) -> None:
        await self._session_call(sid, "close")
        self.routes.pop(sid, None)

    async def expire(self) -> None:
        """Each replica drops its idle sessions; their routes go too."""
        for index in range(self.replicas):
            try:
                gone = await self._call(index, "expire")
            except HttpError:
                continue
            for sid in gone:
                self.routes.pop(sid, None)

    async def _usage(self, index: int) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(self._call(index, "usage"), METRICS_TIMEOUT_S)
        except (HttpError, asyncio.TimeoutError):
            return None

    async def usage(self) -> dict[str, Any]:
        """The replicas' sessions and KV caches summed, a row per replica (`alive: false` where one did not answer),
        and the pool's own counters."""
        parts = await asyncio.gather(*(self._usage(i) for i in range(self.replicas)))
        live = [p for p in parts if p is not None]
        merged: dict[str, Any] = {}
        for section in ("sessions", "kv_cache"):
            merged[section] = {k: sum(p[section][k] for p in live) for k in (live[0][section] if live else {})}
        if live:
            merged["sessions"]["idle_expiry_s"] = live[0]["sessions"]["idle_expiry_s"]
        merged["replicas"] = [{**p["replica"], "alive": True} if p else {"replica": i, "alive": False}
                              for i, p in enumerate(parts)]
        routed = [list(self.routes.values()).count(i) for i in range(self.replicas)]
        for row in merged["replicas"]:
            row["routed_sessions"] = routed[row["replica"]]
        merged["pool"] = {k: self.counts[k] for k in ("lost_sessions", "replica_failures")}
        return merged

    def active(self) -> int:
        return len(self.routes)

    def shutdown(self) -> None:
        """The replicas go with the Ray job (`hlm.cluster.shutdown`); nothing to drop here."""


def pool_app(spec: PoolSpec, limits: Limits, token: str | None = None) -> tuple[FastAPI, PoolBackend]:
    """serve-cloud's app over a pool of `spec.replicas` replicas on the connected Ray cluster, and that pool."""
    backend = PoolBackend.start(spec, limits)
    return build_app(CloudService(backend, limits), token), backend
