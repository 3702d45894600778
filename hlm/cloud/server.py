"""`python -m hlm serve-cloud`: the verifier model as an HTTP service (FastAPI on uvicorn).

Endpoints; all but /health need `Authorization: Bearer $HLM_CLOUD_TOKEN` when the server has a token:
  GET    /health                    liveness and model facts
  GET    /metrics                   JSON: uploads, accepts, resamples, body bytes in/out, latency, sessions
  POST   /v1/sessions               JSON {"temperature", "top_p", "seed"} -> {"session", "vocab_size", ...}
  POST   /v1/sessions/{id}/verify   binary request of `hlm.cloud.wire` -> binary verdict
  POST   /v1/sessions/{id}/prefill  the same request without a draft: read the prompt now -> {"held": n}
  DELETE /v1/sessions/{id}
Each session is a `LocalVerifier` (its own KV cache and RNG, seeded as in process, so tokens match the
in-process path exactly) over the one shared model. Every model call and every change to session state runs
on a single worker thread: sessions never race, and torch is not oversubscribed on a small CPU. The same app
fronts a pool of replicas on Ray (`hlm.cloud.pool`): only its `Backend` differs. Errors are
JSON {"error": message} with a 4xx/5xx status; nothing a client sends can crash the server.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime, and fastapi
# itself is imported lazily (in `create_app` and the two helpers it calls) so the rest of the CLI does not pay
# for it.

import asyncio
import contextlib
import functools
import ipaddress
import json
import os
import secrets
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from hlm.cloud import RESYNC_HEADER, RESYNC_REASONS
from hlm.config import ConfigError, SamplingConfig
from hlm.worker import ModelThread

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.requests import Request
    from transformers import PreTrainedModel

    from hlm.cloud.wire import VerifyRequest
    from hlm.models.pairs import ModelPair
    from hlm.verifier import LocalVerifier, Verdict

MIN_TOKEN_CHARS = 16
CONTROL_BYTES = 4096  # cap on JSON bodies of control endpoints
OPEN_FIELDS = ("temperature", "top_p", "seed")
LATENCY_WINDOW = 4096  # the percentiles cover the most recent verifies


class HttpError(Exception):
    """A request the server refuses; becomes a JSON error with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def __reduce__(self) -> tuple[type, tuple[int, str]]:  # a replica (`hlm.cloud.pool`) raises it to the ingress
        return type(self), (self.status, self.message)


@dataclass
class Limits:
    max_sessions: int = 16
    idle_s: float = 300.0
    max_request_bytes: int = 4 << 20
    max_kv_bytes: int = 4 << 30
    body_timeout_s: float = 30.0  # a body that has not arrived whole by then is cut (a slow or stalled client)


@dataclass
class Session:
    verifier: "LocalVerifier"  # holds the session's ids (`held`) with its KV cache
    last_used: float = field(default_factory=time.monotonic)


def kv_bytes_per_token(model: "PreTrainedModel") -> int:
    """KV-cache bytes one token costs: 2 (K and V) x layers x KV heads x head dim x element size."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize


class SessionStore:
    """All sessions and their verifiers. Not thread-safe by design: only the worker thread calls it."""

    def __init__(self, pair: "ModelPair", limits: Limits) -> None:
        from hlm.energy import open_meter

        self.pair, self.limits = pair, limits
        self.meter = open_meter(pair.verifier.device)
        self.kv_per_token = kv_bytes_per_token(pair.verifier)
        self.sessions: dict[str, Session] = {}
        self.counts: Counter[str] = Counter()
        self.busy_s = 0.0  # time in model calls: what a replica's busy fraction is made of

    @property
    def kv_tokens(self) -> int:
        return sum(len(s.verifier.held) for s in self.sessions.values())

    def expire(self) -> list[str]:
        """Drop the sessions idle longer than the limit; returns their ids (a pool forgets their routes)."""
        cutoff = time.monotonic() - self.limits.idle_s
        gone = [sid for sid, s in self.sessions.items() if s.last_used < cutoff]
        for sid in gone:
            del self.sessions[sid]
            self.counts["expired"] += 1
        return gone

    def facts(self) -> dict[str, Any]:
        """What a client learns about the model when it opens a session (and /health shows)."""
        return {"model": getattr(self.pair.verifier, "hlm_name", self.pair.name), "pair": self.pair.name,
                "vocab_size": self.pair.vocab_size, "max_context": self.pair.max_context,
                "energy_method": self.meter.method if self.meter else None}

    def usage(self) -> dict[str, Any]:
        """This store's part of /metrics: its sessions, its KV cache and its model work."""
        return {"sessions": {"active": len(self.sessions), "max": self.limits.max_sessions,
                             "idle_expiry_s": self.limits.idle_s,
                             **{k: self.counts[k] for k in ("opened", "closed", "expired")}},
                "kv_cache": {"tokens": self.kv_tokens, "bytes_estimate": self.kv_tokens * self.kv_per_token,
                             "cap_bytes": self.limits.max_kv_bytes},
                "work": {"sessions": len(self.sessions), "calls": self.counts["calls"],
                         "busy_s": round(self.busy_s, 4)}}

    def open(self, sampling: SamplingConfig) -> str:
        from hlm.verifier import LocalVerifier

        self.expire()
        if len(self.sessions) >= self.limits.max_sessions:
            raise HttpError(503, f"all {self.limits.max_sessions} sessions are in use; try again later")
        verifier = LocalVerifier(self.pair.verifier, self.pair.valid, self.meter, self.pair.template_head)
        verifier.open(sampling)
        sid = secrets.token_urlsafe(18)
        self.sessions[sid] = Session(verifier)
        self.counts["opened"] += 1
        return sid

    def close(self, sid: str) -> None:
        self._get(sid)
        del self.sessions[sid]
        self.counts["closed"] += 1

    def verify(self, sid: str, body: bytes) -> tuple[bytes, "Verdict"]:
        from hlm.cloud.wire import pack_verdict

        s, req = self._request(sid, body)
        verdict = self._step(sid, s.verifier.verify, s.verifier.held + req.ids, req.draft, req.payload)
        return pack_verdict(verdict, len(s.verifier.held)), verdict

    def prefill(self, sid: str, body: bytes) -> int:
        """Read the prompt before the first draft arrives (the device drafts meanwhile); returns the ids held."""
        s, req = self._request(sid, body)
        if req.draft is not None or req.payload is not None:
            raise HttpError(400, "a prefill carries ids only, no draft")
        self._step(sid, s.verifier.prefill, s.verifier.held + req.ids)
        return len(s.verifier.held)

    def _request(self, sid: str, body: bytes) -> tuple[Session, "VerifyRequest"]:
        """A checked request for session `sid`: ids in the vocabulary and in step, within the caps."""
        from hlm.cloud.wire import WireError, unpack_request
        from hlm.payload import PayloadError, decode

        s = self._get(sid)
        n_held = len(s.verifier.held)
        try:
            req = unpack_request(body, self.pair.vocab_size, self.pair.max_context - n_held)
            if req.payload is not None:  # check before the model runs, so a bad payload leaves the session intact
                decode(req.payload, self.pair.vocab_size)
        except (WireError, PayloadError) as exc:
            raise HttpError(400, str(exc)) from exc
        if req.base != n_held:
            raise HttpError(409, f"the session holds {n_held} ids, the request assumes {req.base}")
        if not n_held and not req.ids:
            raise HttpError(400, "the first request of a session must carry the prompt ids")
        if (self.kv_tokens + len(req.ids) + 1) * self.kv_per_token > self.limits.max_kv_bytes:
            raise HttpError(503, "the KV-cache memory cap is reached; try again later")
        return s, req

    def _step(self, sid: str, call: Callable[..., Any], *args: Any) -> Any:
        """One model call of session `sid`. A failure may leave its cache half-updated, so the session goes
        (the client re-opens on 404)."""
        t0 = time.perf_counter()
        try:
            result = call(*args)
        except Exception:
            del self.sessions[sid]
            raise
        finally:
            self.busy_s += time.perf_counter() - t0
            self.counts["calls"] += 1
        self.sessions[sid].last_used = time.monotonic()
        return result

    def _get(self, sid: str) -> Session:
        s = self.sessions.get(sid)
        if s is None:
            raise HttpError(404, "unknown or expired session")
        return s


def _percentiles(values: deque[float]) -> dict[str, float | None]:
    ordered = sorted(values)

    def at(q: float) -> float | None:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None
    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1.0)}


class Metrics:
    """Counters for /metrics; touched only on the event-loop thread."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.counts: Counter[str] = Counter()
        self.status: Counter[str] = Counter()
        self.latency_s: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.compute_s: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def record(self, verdict: "Verdict", latency_s: float) -> None:
        if verdict.accepted is None:
            self.counts["samples"] += 1
        else:
            self.counts["uploads"] += 1
            self.counts["accepts" if verdict.accepted else "resamples"] += 1
        self.latency_s.append(latency_s)
        self.compute_s.append(verdict.compute_s)

    def snapshot(self, usage: dict[str, Any]) -> dict[str, Any]:
        """/metrics: this front's counters beside the backend's `usage` (sessions, KV cache, replicas)."""
        c = self.counts
        return {
            "uptime_s": round(time.monotonic() - self.started, 1),
            **{k: c[k] for k in ("uploads", "accepts", "resamples", "samples", "resyncs")},
            "bytes_in": c["bytes_in"], "bytes_out": c["bytes_out"], "bytes_counted": "HTTP bodies",
            "latency_ms": _percentiles(self.latency_s), "compute_ms": _percentiles(self.compute_s),
            "responses": dict(self.status), **usage,
        }


async def read_body(request: "Request", cap: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it exceeds `cap` (by its declared length, or while streaming), and
    with 408 if it has not arrived whole within `timeout_s` (a stalled client must not hold a connection)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > cap):
        raise HttpError(413, f"request body over the limit of {cap:,} bytes")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise HttpError(413, f"request body over the limit of {cap:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise HttpError(408, f"request body not received within {timeout_s:g} s") from None


def parse_open(body: bytes) -> SamplingConfig:
    """The sampling settings a session's RNG and distribution transform need; everything else is refused."""
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HttpError(400, f"body is not JSON: {exc}") from exc
    if not isinstance(fields, dict) or set(fields) != set(OPEN_FIELDS):
        raise HttpError(400, f"body must be a JSON object with exactly {', '.join(OPEN_FIELDS)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in fields.values()) or \
            not isinstance(fields["seed"], int):
        raise HttpError(400, "temperature and top_p must be numbers, seed an integer")
    try:
        return SamplingConfig(**fields)
    except ConfigError as exc:
        raise HttpError(400, str(exc)) from exc


def check_bearer(authorization: str, token: str | None) -> None:
    """Refuse with 401 unless the Authorization header carries the server's token (compared in constant time)."""
    if token is not None and not secrets.compare_digest(authorization.encode(), f"Bearer {token}".encode()):
        raise HttpError(401, "missing or wrong bearer token")


class Backend(Protocol):
    """Where sessions live and model calls run: one store in this process (`LocalBackend`) or a pool of replicas
    (`hlm.cloud.pool.PoolBackend`). Raises `HttpError` for what a client did wrong or must retry."""

    facts: dict[str, Any]  # `SessionStore.facts` of the model(s) behind it
    replicas: int

    async def open(self, sampling: SamplingConfig) -> str: ...
    async def verify(self, sid: str, body: bytes) -> tuple[bytes, "Verdict"]: ...
    async def prefill(self, sid: str, body: bytes) -> int: ...
    async def close(self, sid: str) -> None: ...
    async def expire(self) -> None: ...
    async def usage(self) -> dict[str, Any]: ...
    def active(self) -> int: ...
    def shutdown(self) -> None: ...


def replica_entry(index: int, work: dict[str, Any], uptime_s: float, node: str) -> dict[str, Any]:
    """One replica's row of /metrics' `replicas`: its sessions, calls and busy seconds, and where it runs."""
    return {"replica": index, "node": node, "pid": os.getpid(), "uptime_s": round(uptime_s, 1), **work,
            "busy_fraction": round(work["busy_s"] / uptime_s, 4) if uptime_s > 0 else None}


class LocalBackend:
    """Today's serve-cloud: one `SessionStore` whose every call runs on one worker thread, so sessions never race
    and torch is not oversubscribed."""

    replicas = 1

    def __init__(self, pair: "ModelPair", limits: Limits, models: ModelThread | None = None) -> None:
        self.store = SessionStore(pair, limits)
        self.facts = self.store.facts()
        # the thread the pair was loaded on, where given: one thread runs every kernel (`hlm.worker`)
        self.worker = models or ModelThread("verifier")
        self.started = time.monotonic()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.worker.submit(functools.partial(fn, *args)))

    async def open(self, sampling: SamplingConfig) -> str:
        return await self.run(self.store.open, sampling)

    async def verify(self, sid: str, body: bytes) -> tuple[bytes, "Verdict"]:
        return await self.run(self.store.verify, sid, body)

    async def prefill(self, sid: str, body: bytes) -> int:
        return await self.run(self.store.prefill, sid, body)

    async def close(self, sid: str) -> None:
        await self.run(self.store.close, sid)

    async def expire(self) -> None:
        await self.run(self.store.expire)

    async def usage(self) -> dict[str, Any]:
        usage = self.store.usage()
        work = usage.pop("work")
        return {**usage, "replicas": [replica_entry(0, work, time.monotonic() - self.started, "this process")]}

    def active(self) -> int:
        return len(self.store.sessions)

    def shutdown(self) -> None:
        self.worker.shutdown()


class CloudService:
    """What each endpoint does, over a `Backend` (where the sessions live); `Metrics` is touched only on the event
    loop."""

    def __init__(self, backend: Backend, limits: Limits) -> None:
        self.backend, self.limits = backend, limits
        self.metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: "FastAPI") -> AsyncIterator[None]:
        """Idle sessions expire while the app runs; at shutdown, queued model calls are dropped."""
        task = asyncio.create_task(self._sweep())
        yield
        task.cancel()
        self.backend.shutdown()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(self.limits.idle_s / 4, 10.0))
            with contextlib.suppress(HttpError):
                await self.backend.expire()

    async def _read(self, request: "Request", cap: int) -> bytes:
        body = await read_body(request, cap, self.limits.body_timeout_s)
        self.metrics.counts["bytes_in"] += len(body)
        return body

    def health(self) -> dict[str, Any]:
        f = self.backend.facts
        return {"status": "ok", "model": f["model"], "pair": f["pair"], "vocab_size": f["vocab_size"],
                "sessions": self.backend.active(), "replicas": self.backend.replicas}

    async def snapshot(self) -> dict[str, Any]:
        return self.metrics.snapshot(await self.backend.usage())

    async def open_session(self, request: "Request") -> dict[str, Any]:
        """A new session. A client that lost its session says so (`RESYNC_HEADER`): /metrics counts resyncs."""
        sid = await self.backend.open(parse_open(await self._read(request, CONTROL_BYTES)))
        if request.headers.get(RESYNC_HEADER) in RESYNC_REASONS:
            self.metrics.counts["resyncs"] += 1
        self.metrics.status["200"] += 1
        f = self.backend.facts
        answer = {"session": sid, **{k: f[k] for k in ("vocab_size", "max_context", "model", "energy_method")}}
        self.metrics.counts["bytes_out"] += len(json.dumps(answer, separators=(",", ":")))
        return answer

    async def verify(self, sid: str, request: "Request") -> bytes:
        """The binary verdict; its latency counts from the request's arrival to the verdict (queueing included)."""
        t0 = time.perf_counter()
        body = await self._read(request, self.limits.max_request_bytes)
        out, verdict = await self.backend.verify(sid, body)
        self.metrics.record(verdict, time.perf_counter() - t0)
        self.metrics.counts["bytes_out"] += len(out)
        self.metrics.status["200"] += 1
        return out

    async def prefill(self, sid: str, request: "Request") -> dict[str, int]:
        held = await self.backend.prefill(sid, await self._read(request, self.limits.max_request_bytes))
        self.metrics.status["200"] += 1
        return {"held": held}

    async def close(self, sid: str) -> dict[str, bool]:
        await self.backend.close(sid)
        self.metrics.status["200"] += 1
        return {"closed": True}

    def error(self, status: int, message: str) -> "JSONResponse":
        from fastapi.responses import JSONResponse

        self.metrics.status[str(status)] += 1
        return JSONResponse({"error": message}, status_code=status)


def create_app(pair: "ModelPair", limits: Limits, token: str | None = None,
               models: ModelThread | None = None) -> "FastAPI":
    """The service's FastAPI app: JSON errors, /health open, every other route behind the bearer token; `models`:
    the thread the pair was loaded on, which then runs every verify."""
    return build_app(CloudService(LocalBackend(pair, limits, models), limits), token)


def build_app(service: CloudService, token: str | None = None) -> "FastAPI":
    """The FastAPI app over `service`, whatever its backend: the same routes, auth, limits and errors."""
    from fastapi import FastAPI

    app = FastAPI(title="hlm cloud verifier", lifespan=service.lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    _add_error_handlers(app, service)
    _add_routes(app, service, token)
    return app


def _add_error_handlers(app: "FastAPI", service: CloudService) -> None:
    """Refusals, unknown paths and wrong methods, and crashes all answer JSON {"error": message}, counted."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(HttpError)
    async def on_http_error(request: Request, exc: HttpError) -> JSONResponse:
        return service.error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def on_route_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown path, wrong method
        return service.error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        print(f"internal error on {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return service.error(500, f"internal error: {type(exc).__name__}")


def _add_routes(app: "FastAPI", service: CloudService, token: str | None) -> None:
    """Each route hands its request to one `CloudService` method. Defined here, after the lazy import, because
    FastAPI reads the handlers' annotations at runtime."""
    from fastapi import APIRouter, Depends, Request, Response

    def bearer(request: Request) -> None:
        check_bearer(request.headers.get("authorization", ""), token)

    api = APIRouter(dependencies=[Depends(bearer)])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return service.health()

    @api.get("/metrics")
    async def get_metrics() -> dict[str, Any]:
        return await service.snapshot()

    @api.post("/v1/sessions")
    async def open_session(request: Request) -> dict[str, Any]:
        return await service.open_session(request)

    @api.post("/v1/sessions/{sid}/verify")
    async def verify(sid: str, request: Request) -> Response:
        return Response(await service.verify(sid, request), media_type="application/octet-stream")

    @api.post("/v1/sessions/{sid}/prefill")
    async def prefill(sid: str, request: Request) -> dict[str, int]:
        return await service.prefill(sid, request)

    @api.delete("/v1/sessions/{sid}")
    async def close_session(sid: str) -> dict[str, bool]:
        return await service.close(sid)

    app.include_router(api)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def serve_in_thread(app: "FastAPI", host: str = "127.0.0.1", port: int = 0,
                    timeout_s: float = 120.0) -> Iterator[str]:
    """`app` on uvicorn on a thread of this process (tests, `fleet` without --cloud); yields its URL."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True, name="hlm-cloud")
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the in-process cloud did not start")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(10)
