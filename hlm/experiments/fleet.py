"""`python -m hlm fleet`: how many devices a verifier pool serves, per upload policy, from recorded traces.

Recording: each (policy, prompt) runs once through the decoder in this process, its verifier wrapped by
`RecordingVerifier`, which keeps per verify call the body `HttpVerifier` would send (`hlm.cloud.client.verify_body`:
the ids the cloud lacks, the draft and its payload) and how many tokens the device drafted since the previous call.
Traces are cached as DIR/traces/<hash>.json + .bin, the hash over the pair, the prompt and the full RunConfig (as
the sweep caches its runs). The control (`random`) is matched to the subject's upload rate on the same prompts.

Replay: N simulated devices, each replaying traces of one policy one after another (device i starts with trace i,
at a seeded offset within one call interval), against the real verifier pool over HTTP: open a session, send the
prompt (the prefill, while drafting starts), then per call wait the drafted tokens x the device profile's time per
token plus the modelled upload time of that body (`hlm.link.upload_cost`), send the recorded body, wait for the
verdict (the measured latency: upload on loopback, queueing and the cloud's work), then the modelled downlink and
round trip. A device starts another trace while the cell's `duration_s` has not passed. The cloud's work is real;
the device's is modelled (its profile, charged per emitted token as the decoder charges it), so one machine can
stand in for many phones. Per (policy, N): verify calls/s, each replica's busy fraction (from /metrics), p50/p95/p99
latency and device tokens/s; per policy, the largest N whose p95 stays within the budget.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from tqdm import tqdm

from hlm.cloud.client import verify_body
from hlm.config import ConfigError, LinkConfig, RunConfig, SamplingConfig
from hlm.experiments.sweep import Grid, Job, write_atomic
from hlm.experiments.workers import facts_of
from hlm.link import upload_cost
from hlm.policies import REGISTRY as POLICIES

if TYPE_CHECKING:
    from hlm.decoder import HybridDecoder
    from hlm.verifier import Verdict, Verifier

PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class Call:
    drafted: int  # tokens the device drafted since the previous call, this call's draft included
    body: bytes  # the verify request's body as `HttpVerifier` sends it


@dataclass
class Trace:
    policy: str
    label: str  # the policy with its knobs (`Policy.label`)
    prompt_id: str
    sampling: dict[str, Any]  # what the session open sends: temperature, top_p, seed
    prompt_body: bytes  # the prefill's body: the prompt's ids
    calls: list[Call]
    tokens: int  # tokens the run emitted
    uploads: int

    @property
    def drafted_after(self) -> int:
        """Tokens emitted after the last call (drafted and kept locally)."""
        return max(0, self.tokens - sum(c.drafted for c in self.calls))


class RecordingVerifier:
    """A `Verifier` that hands every call to `inner` and keeps what `HttpVerifier` would have sent: the prefill of
    the prompt at `open`, then per verify the body built from what the cloud holds (its `held`, tracked as the
    client tracks it) and the tokens drafted since the previous call."""

    def __init__(self, inner: Verifier) -> None:
        self.inner, self.vocab_size = inner, inner.vocab_size
        self.held: list[int] = []
        self.prompt_body = b""
        self.calls: list[Call] = []

    @property
    def meter(self) -> Any:
        return getattr(self.inner, "meter", None)

    def open(self, sampling: SamplingConfig, prompt: Sequence[int] = ()) -> None:
        self.inner.open(sampling, prompt)
        self.held, self.calls = list(prompt), []  # HttpVerifier prefills the prompt as the run starts
        self.prompt_body = verify_body([], prompt, None, None)

    def verify(self, context: list[int], draft: int | None, payload: bytes | None) -> Verdict:
        body = verify_body(self.held, context, draft, payload)
        drafted = len(context) - len(self.held) + (draft is not None)
        verdict = self.inner.verify(context, draft, payload)
        self.calls.append(Call(drafted, body))
        self.held = [*context, verdict.token]
        return verdict

    def close(self) -> None:
        self.inner.close()


def _trace_path(traces_dir: Path, job: Job, models: str, key: list[str]) -> Path:
    text = json.dumps([job.identity(models), *key], sort_keys=True)
    return traces_dir / hashlib.sha256(text.encode()).hexdigest()[:24]


def save_trace(path: Path, trace: Trace) -> None:
    """The bodies in PATH.bin, the rest in PATH.json (written last: a trace is whole when its JSON exists)."""
    path.with_suffix(".bin").write_bytes(trace.prompt_body + b"".join(c.body for c in trace.calls))
    meta = {k: v for k, v in asdict(trace).items() if k not in ("calls", "prompt_body")}
    meta |= {"prompt_bytes": len(trace.prompt_body), "calls": [[c.drafted, len(c.body)] for c in trace.calls]}
    write_atomic(path.with_suffix(".json"), meta)


def load_trace(path: Path) -> Trace:
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    blob = path.with_suffix(".bin").read_bytes()
    at, calls = meta.pop("prompt_bytes"), []
    prompt_body = blob[:at]
    for drafted, size in meta.pop("calls"):
        calls.append(Call(drafted, blob[at:at + size]))
        at += size
    return Trace(**meta, prompt_body=prompt_body, calls=calls)


def record(decoder: HybridDecoder, job: Job, models: str, traces_dir: Path) -> Trace:
    """The trace of `job` (cached): one in-process run with its verifier recorded."""
    path = _trace_path(traces_dir, job, models, facts_of(decoder).run_key(job.config))  # as the sweep keys its runs
    if path.with_suffix(".json").is_file():
        return load_trace(path)
    recorder = RecordingVerifier(decoder.verifier)
    decoder.verifier = recorder
    try:
        _, _, summary = decoder.run(job.prompt["prompt"], job.config)
    finally:
        decoder.verifier = recorder.inner
    s = job.config.sampling
    trace = Trace(job.config.policy.name, job.policy.label(job.config.policy), job.prompt["id"],
                  {"temperature": s.temperature, "top_p": s.top_p, "seed": s.seed}, recorder.prompt_body,
                  recorder.calls, summary["tokens"], summary["uploads"])
    if trace.uploads != len(trace.calls):
        raise RuntimeError(f"{trace.label} on {trace.prompt_id}: {trace.uploads} uploads but {len(trace.calls)} calls")
    save_trace(path, trace)
    return trace


@dataclass(frozen=True)
class FleetSpec:
    """What one fleet experiment replays, against which pool, and where it writes."""

    models: str  # the pair's spec, part of every trace's cache identity
    prompts: Sequence[dict[str, str]]
    grid: Grid  # its policies and the subject's one setting (the control is matched to it)
    base: RunConfig  # sampling, link and device profile every run shares
    url: str  # the verifier pool (`serve-cloud`, with or without --replicas)
    out_dir: Path
    devices: tuple[int, ...] = (1, 2, 4, 8)
    duration_s: float = 30.0  # a device starts another trace while this has not passed (0: one trace each)
    budget_ms: float = 1000.0
    token: str | None = None
    seed: int = 0  # the devices' start offsets
    png: bool = True
    progress: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.devices or min(self.devices) < 1 or self.duration_s < 0 or self.budget_ms <= 0:
            raise ConfigError("--devices >= 1 each, --duration-s >= 0 and --budget-ms > 0")
        if self.base.device.slm_time_per_token_s is None:
            raise ConfigError("fleet paces each device by a modelled device profile: choose one with a time per "
                              "token (--device-profile phone)")
        bad = [p for p in self.grid.policies if not (POLICIES[p].drafts and POLICIES[p].uploads)]
        if bad:
            raise ConfigError(f"fleet replays uploads: {', '.join(bad)} make none from drafts")


def first_jobs(spec: FleetSpec) -> list[Job]:
    """Every policy but the control, at the grid's one setting, on every prompt."""
    grid, jobs = spec.grid, []
    for name in grid.policies:
        role = POLICIES[name].role
        if role != "control":
            config = grid.settings[0] if role == "subject" else grid.config(name)
            jobs += [Job(prompt, replace(spec.base, policy=config)) for prompt in spec.prompts]
    return jobs


def record_all(decoder: HybridDecoder, spec: FleetSpec) -> dict[str, list[Trace]]:
    """Traces per policy (in the grid's order), recorded or loaded; the control's after the subject's."""
    traces_dir = spec.out_dir / "traces"
    traces_dir.mkdir(parents=True, exist_ok=True)
    first = first_jobs(spec)
    total = len(first) + spec.grid.control_count(spec.prompts)
    with tqdm(total=total, unit="trace", desc="record", disable=not spec.progress, dynamic_ncols=True,
              file=sys.stderr) as bar:
        done = []
        for jobs in (first, None):
            if jobs is None:  # matched to the subject's pooled upload rate on the same prompts
                jobs = spec.grid.control_jobs([(j, {"summary": {"uploads": t.uploads, "tokens": t.tokens}})
                                               for j, t in done])
            for job in jobs:
                bar.set_postfix_str(f"{job.prompt['id']} {job.policy.label(job.config.policy)}", refresh=False)
                done.append((job, record(decoder, job, spec.models, traces_dir)))
                bar.update(1)
    by_policy: dict[str, list[Trace]] = {name: [] for name in spec.grid.policies}
    for _, trace in done:
        by_policy[trace.policy].append(trace)
    return by_policy


@dataclass(frozen=True)
class Pace:
    """How a simulated device spends time between calls: drafting at its profile's rate, the modelled link."""

    token_s: float
    link: LinkConfig

    def before(self, call: Call) -> float:
        return call.drafted * self.token_s + upload_cost(self.link, 8 * len(call.body), 0.0).uplink_s

    def after(self, call: Call) -> float:
        return upload_cost(self.link, 8 * len(call.body), 0.0).wait_s  # downlink and round trip, the cloud excluded


@dataclass
class Cell:
    """What one (policy, N) measured."""

    latencies_s: list[float] = field(default_factory=list)
    device_tokens_per_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    traces: int = 0
    uploads: int = 0  # of the traces replayed
    tokens: int = 0  # of the traces replayed

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


OCTETS = {"content-type": "application/octet-stream"}


async def _post(client: httpx.AsyncClient, path: str, cell: Cell, **kwargs: Any) -> httpx.Response | None:
    """The answer, or None with the failure counted in `cell`."""
    try:
        response = await client.post(path, **kwargs)
    except httpx.HTTPError as exc:
        cell.error(type(exc).__name__)
        return None
    if response.status_code != 200:
        cell.error(str(response.status_code))
        return None
    return response


async def _prefill(client: httpx.AsyncClient, sid: str, trace: Trace, pace: Pace, cell: Cell) -> bool:
    await asyncio.sleep(upload_cost(pace.link, 8 * len(trace.prompt_body), 0.0).uplink_s)
    return await _post(client, f"/v1/sessions/{sid}/prefill", cell, content=trace.prompt_body,
                       headers=OCTETS) is not None


async def replay(client: httpx.AsyncClient, trace: Trace, pace: Pace, cell: Cell) -> None:
    """One device runs `trace` against the pool: a session, the prompt read while it drafts, then each recorded
    call paced by the device and the link; a refused call ends the trace (counted in `cell.errors`)."""
    opened = await _post(client, "/v1/sessions", cell, json=trace.sampling)
    if opened is None:
        return
    sid = opened.json()["session"]
    prefill = asyncio.create_task(_prefill(client, sid, trace, pace, cell))
    try:
        for call in trace.calls:
            await asyncio.sleep(pace.before(call))
            if not await prefill:  # the client waits for its prefill before the first verify
                return
            t0 = time.perf_counter()
            if await _post(client, f"/v1/sessions/{sid}/verify", cell, content=call.body, headers=OCTETS) is None:
                return
            cell.latencies_s.append(time.perf_counter() - t0)
            await asyncio.sleep(pace.after(call))
        await asyncio.sleep(trace.drafted_after * pace.token_s)
    finally:
        prefill.cancel()
        try:
            await client.delete(f"/v1/sessions/{sid}")
        except httpx.HTTPError:
            pass


async def device(client: httpx.AsyncClient, traces: Sequence[Trace], first: int, offset_s: float, deadline: float,
                 pace: Pace, cell: Cell) -> None:
    """One simulated device: traces `first`, `first` + 1, ... until `deadline` (at least one)."""
    await asyncio.sleep(offset_s)
    t0, tokens, i = time.perf_counter(), 0, first
    while True:
        trace = traces[i % len(traces)]
        i += 1
        await replay(client, trace, pace, cell)
        tokens, cell.traces, cell.uploads = tokens + trace.tokens, cell.traces + 1, cell.uploads + trace.uploads
        cell.tokens += trace.tokens
        if time.perf_counter() >= deadline:
            break
    cell.device_tokens_per_s.append(tokens / (time.perf_counter() - t0))


async def _replicas(client: httpx.AsyncClient) -> dict[int, float]:
    """Busy seconds per live replica from /metrics (`replicas`)."""
    response = await client.get("/metrics")
    response.raise_for_status()
    return {r["replica"]: r["busy_s"] for r in response.json().get("replicas", []) if r.get("alive", True)}


async def run_cell(spec: FleetSpec, traces: Sequence[Trace], n: int) -> dict[str, Any]:
    """N devices replaying `traces` against the pool at once; one row of fleet.csv."""
    pace = Pace(spec.base.device.slm_time_per_token_s or 0.0, spec.base.link)
    calls = [c for t in traces for c in t.calls]
    interval = sum(pace.before(c) for c in calls) / len(calls) if calls else 0.0
    rng = random.Random(f"{spec.seed}-{traces[0].label}-{n}")
    headers = {"authorization": f"Bearer {spec.token}"} if spec.token else {}
    cell = Cell()
    async with httpx.AsyncClient(base_url=spec.url, headers=headers, timeout=httpx.Timeout(300.0, connect=10.0),
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as client:
        before = await _replicas(client)
        t0 = time.perf_counter()
        await asyncio.gather(*(device(client, traces, i, rng.uniform(0, interval), t0 + spec.duration_s, pace, cell)
                               for i in range(n)))
        wall = time.perf_counter() - t0
        after = await _replicas(client)
    busy = {i: (after[i] - before[i]) / wall for i in sorted(after) if i in before and after[i] >= before[i]}
    return cell_row(traces[0], n, cell, wall, busy, spec.budget_ms)


def cell_row(trace: Trace, n: int, cell: Cell, wall_s: float, busy: dict[int, float],
             budget_ms: float) -> dict[str, Any]:
    """Latency percentiles (linear interpolation, so p50 <= p95 <= p99), rates and busy fractions of one cell."""
    ms = np.asarray(cell.latencies_s) * 1000
    pct = {f"p{q}_ms": float(np.percentile(ms, q)) if len(ms) else None for q in PERCENTILES}
    errors = sum(cell.errors.values())
    return {"policy": trace.policy, "label": trace.label, "devices": n, "replicas": len(busy), "traces": cell.traces,
            "uploads": cell.uploads, "tokens": cell.tokens, "calls": len(ms), "errors": errors,
            "error_kinds": ";".join(f"{k}:{v}" for k, v in sorted(cell.errors.items())), "wall_s": wall_s,
            "calls_per_s": len(ms) / wall_s if wall_s else None, **pct,
            "mean_ms": float(ms.mean()) if len(ms) else None,
            "device_tokens_per_s": float(np.mean(cell.device_tokens_per_s)) if cell.device_tokens_per_s else None,
            "busy_fraction_mean": float(np.mean(list(busy.values()))) if busy else None,
            "busy_fraction_max": max(busy.values(), default=None),
            "busy_by_replica": ";".join(f"{i}:{b:.3f}" for i, b in busy.items()),
            "busy_s": sum(busy.values()) * wall_s,
            # the cloud's cost of a device token: what a replica's time buys, whatever pace the devices keep
            "cloud_ms_per_token": 1000 * sum(busy.values()) * wall_s / cell.tokens if busy and cell.tokens else None,
            "within_budget": bool(errors == 0 and pct["p95_ms"] is not None and pct["p95_ms"] <= budget_ms)}


def capacity(rows: Sequence[dict[str, Any]], budget_ms: float) -> list[dict[str, Any]]:
    """Per policy: the largest N whose p95 stayed within the budget with no refused call, and per replica; and the
    device tokens one replica-second of model work serves (over all its cells). The two differ when the policies'
    devices keep different paces: a device that waits for every verdict (hlm) slows itself and loads the pool less."""
    out = []
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        ok = [r["devices"] for r in mine if r["within_budget"]]
        best = max(ok, default=0)
        replicas = max(r["replicas"] for r in mine) or 1
        out.append({"policy": policy, "label": mine[0]["label"], "budget_ms": budget_ms, "max_devices": best,
                    "max_devices_per_replica": best / replicas, "tested": [r["devices"] for r in mine],
                    "tokens_per_replica_s": sum(r["tokens"] for r in mine) / busy_s
                    if (busy_s := sum(r["busy_s"] for r in mine)) else None,
                    "bounded": best < max(r["devices"] for r in mine)})
    return out


def p95_figure(rows: Sequence[dict[str, Any]], budget_ms: float, title: str) -> Any:
    """Devices vs p95 verify latency, one line per policy, the budget as a dotted line."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["devices"])
        fig.add_trace(go.Scatter(x=[r["devices"] for r in mine], y=[r["p95_ms"] for r in mine], mode="lines+markers",
                                 name=mine[0]["label"], line={"color": POLICIES[policy].colour},
                                 customdata=[[r["p50_ms"], r["p99_ms"], r["calls_per_s"]] for r in mine],
                                 hovertemplate="%{x} devices: p95 %{y:.0f} ms (p50 %{customdata[0]:.0f}, p99 "
                                               "%{customdata[1]:.0f}); %{customdata[2]:.2f} calls/s"))
    fig.add_hline(y=budget_ms, line_dash="dot", line_color="#888888", annotation_text=f"budget {budget_ms:g} ms")
    fig.update_layout(title=title, xaxis_title="simulated devices", template="plotly_white",
                      yaxis_title="p95 verify latency (ms, queueing included)")
    return fig


@dataclass
class Result:
    rows: list[dict[str, Any]]
    capacity: list[dict[str, Any]]
    figures: dict[str, Any]


def fleet(decoder: HybridDecoder, spec: FleetSpec) -> Result:
    """Record (or load) the traces, replay every (policy, N) against the pool and write fleet.csv, fleet.json
    (rows, capacity, meta) and figures/fleet_p95.html (and .png where a Chrome is available)."""
    import pandas as pd

    from hlm.experiments.figures import save_figures

    spec.out_dir.mkdir(parents=True, exist_ok=True)
    traces = record_all(decoder, spec)
    rows = []
    cells = [(policy, n) for policy in traces for n in sorted(spec.devices)]
    with tqdm(cells, unit="cell", desc="replay", disable=not spec.progress, dynamic_ncols=True,
              file=sys.stderr) as bar:
        for policy, n in bar:
            bar.set_postfix_str(f"{traces[policy][0].label} x{n}", refresh=False)
            rows.append(asyncio.run(run_cell(spec, traces[policy], n)))
    caps = capacity(rows, spec.budget_ms)
    base = spec.base
    title = (f"p95 verify latency vs devices ({rows[0]['replicas'] if rows else '?'} replica(s); device "
             f"{base.device.name}, link {base.link_preset})")
    fig = p95_figure(rows, spec.budget_ms, title)
    figures = save_figures({"fleet_p95": fig}, spec.out_dir / "figures", spec.png)
    pd.DataFrame(rows).to_csv(spec.out_dir / "fleet.csv", index=False)
    meta = {**spec.meta, "models": spec.models, "url": spec.url, "prompts": len(spec.prompts),
            "devices": list(spec.devices), "duration_s": spec.duration_s, "budget_ms": spec.budget_ms,
            "sampling": asdict(base.sampling), "link_preset": base.link_preset, "link": asdict(base.link),
            "device_profile": asdict(base.device), "traces": {p: len(t) for p, t in traces.items()},
            "figures": figures}
    write_atomic(spec.out_dir / "fleet.json", {"meta": meta, "rows": rows, "capacity": caps})
    return Result(rows, caps, figures)


def format_rows(rows: Sequence[dict[str, Any]], caps: Sequence[dict[str, Any]]) -> str:
    """The cells and the capacity as a plain text table."""
    def num(v: float | None, digits: int = 0) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    head = (f"{'policy':<22} {'N':>4} {'calls/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'busy':>6} "
            f"{'tok/s':>7} {'cloud ms/tok':>12} err")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:<22} {r['devices']:>4} {num(r['calls_per_s'], 2):>8} {num(r['p50_ms']):>8} "
                     f"{num(r['p95_ms']):>8} {num(r['p99_ms']):>8} {num(r['busy_fraction_max'], 2):>6} "
                     f"{num(r['device_tokens_per_s'], 1):>7} {num(r['cloud_ms_per_token']):>12} {r['errors']}")
    for c in caps:
        more = "" if c["bounded"] else " (or more: the largest N tested was within budget)"
        lines.append(f"{c['label']}: {c['max_devices']} devices within p95 <= {c['budget_ms']:g} ms "
                     f"({c['max_devices_per_replica']:g} per replica){more}; one replica-second of model work "
                     f"serves {num(c['tokens_per_replica_s'], 1)} device tokens")
    return "\n".join(lines)
