"""The web dashboard's library side: runs, sessions and everything the page renders. `app.py` only lays out and
wires the Gradio components, so all of this is tested without a server (nothing here imports Gradio).

Why a worker thread: the decoder runs on its own thread and fills a queue; the page's generator drains it and
renders on the first token, then at most every `INTERVAL_S` seconds, so rendering never blocks decoding and the
page updates ~2.5 times a second whatever the token rate. One decode at a time (`Service.lock`): the models and
the verifier's KV cache are shared by every session.

Renderers return HTML strings, plotly figure dicts (plain dicts: building `go.Figure` objects costs ~5-25 ms
each, and three per update would tax the decoding thread through the GIL) and table rows.
"""

from __future__ import annotations

import argparse
import html
import itertools
import json
import math
import queue
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hlm.config import (
    ConfigError,
    LinkConfig,
    PolicyConfig,
    RunConfig,
    SamplingConfig,
    device_profile,
    link_preset,
)
from hlm.decoder import HybridDecoder
from hlm.errors import UserError
from hlm.estimators import WINDOW, ScoreScale
from hlm.events import SOURCES, PendingDraft, Summary, TokenEvent
from hlm.experiments.figures import COLOURS as POLICY_COLOURS
from hlm.experiments.quality import get_scorer
from hlm.link import upload_bits, upload_cost
from hlm.metrics import faithful_prefix, summarize
from hlm.models.pairs import Calibration, ModelError
from hlm.models.presets import PRESETS
from hlm.policies import uncertain
from hlm.session import open_decoder, resolve_u_th, with_u_th
from hlm.verifier import CloudUnavailable

INTERVAL_S = 0.4  # page refresh period while streaming (>= 2 per second, as the issue asks)
POINTS_PER_UPDATE = 8  # prefix summaries added per refresh: the charts' resolution, bounded so refreshes stay cheap
REFERENCE_CACHE = 32  # LLM-only outputs kept per process, keyed by (pair, prompt, sampling settings)
# At T > 0 a run is scored against this many LLM samples (seeds seed, seed + 1, ...), and the samples against each
# other give the noise band: HLM samples the LLM's distribution exactly, so its score lands inside that band.
REFERENCE_SAMPLES = 3
HISTORY_LIMIT = 200  # points kept in a session's trade-off scatter
REPLAYS = 64  # sessions whose last run of ours the what-if replay keeps
STOP_WAIT_S = 5.0  # how long Stop waits for the running decode to finish its current token
EXAMPLES = Path(__file__).resolve().parent / "assets" / "examples.json"
# The Compare action runs these after the LLM-only reference; `random` last, its coin matched to ours' upload rate
COMPARED = ("hlm", "uhlm", "ours", "random")
SHOW_ME = ("hlm", "ours", "random")  # the "Show me" comparison: what the one-sentence verdict needs
# Errors a viewer can cause or fix (`UserError`) or should hear about (the cloud is down); the app shows their message
# as a Gradio error. Anything else is a bug: the app hides it (show_error=False) and the server log keeps the traceback.
USER_ERRORS: tuple[type[Exception], ...] = (UserError, CloudUnavailable)

UNEXPECTED = ("Something went wrong on the server ({name}); the run was abandoned. The server log has the details; "
              "trying again or changing a setting may help.")


def error_notice(exc: Exception) -> str:
    """The message (HTML: Gradio's toast renders it so) a viewer sees for `exc`, led by a bold title: Gradio 6.31
    titles every error toast "Error" whatever `gr.Error(title=...)` says. A fixable error says what to fix, a bug
    says that it is one (its traceback stays in the server log)."""
    if isinstance(exc, USER_ERRORS):
        title, text = "Cannot run.", str(exc)
    else:
        title, text = "Unexpected error.", UNEXPECTED.format(name=type(exc).__name__)
    return f"<strong>{title}</strong> {html.escape(text)}"


SOURCE_LABELS = {
    "local": "kept on device",
    "cloud_accepted": "accepted by cloud",
    "cloud_resampled": "resampled by cloud",
    "cloud_sampled": "cloud only (LLM)",
    "unverified": "unverified (upload failed)",
}
PART_LABELS = {"device_compute": "SLM compute", "radio": "radio", "device_idle": "idle wait", "cloud": "cloud compute"}
PART_COLOURS = {"device_compute": "#3b82f6", "radio": "#f59e0b", "device_idle": "#94a3b8"}
_S, _P, _L = SamplingConfig(), PolicyConfig(), LinkConfig()
DEMO_MAX_NEW_TOKENS = 96  # shorter than the CLI's default so a Compare (4 runs) finishes in about a minute on CPU
# The page decodes greedily by default: HLM then equals the LLM token for token, so every difference on screen
# (faithful prefix, BERTScore) is the policy's, not sampling noise (README "Dashboard": why greedy).
DEMO_TEMPERATURE = 0.0


# ---------------------------------------------------------------------------------------------- settings


def _number(name: str, value: Any, whole: bool = False) -> float | int:
    """Gradio numbers arrive as floats (8.0) or None when a box is cleared; configs want ints and a message."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if whole:
        if value != int(value):
            raise ConfigError(f"{name} must be a whole number, got {value}")
        return int(value)
    return float(value)


@dataclass(frozen=True)
class Settings:
    """The knobs the page and the API expose, in display units (bandwidth in MHz); `run_config` validates."""

    k: int = _P.k
    gamma: float = _P.gamma
    policy: str = _P.name
    estimator: str = _P.estimator
    u_th: float | None = None  # None: the pair's calibrated risk-averse value, else PolicyConfig's default
    temperature: float = DEMO_TEMPERATURE
    max_new_tokens: int = DEMO_MAX_NEW_TOKENS
    seed: int = _S.seed
    # The demo's story is a phone on a cellular uplink: the page prices the SLM as a phone (README "Device
    # profiles"); `this-machine` shows this server's own measured time instead.
    device_profile: str = "phone"
    link_preset: str = "default"
    bandwidth_mhz: float | None = None  # None: the preset's; a number overrides it (summaries then say so)
    snr_db: float | None = None
    tx_power_w: float | None = None
    bits_per_prob: int = _L.bits_per_prob
    topk: int = 64  # 16-bit top-64: same acceptance as the full distribution at 1/722 of the bits (README)

    def run_config(self, calibration: Calibration | None) -> RunConfig:
        base = link_preset(self.link_preset)
        u_th = None if self.u_th is None else _number("u_th", self.u_th)
        return with_u_th(RunConfig(
            SamplingConfig(temperature=_number("temperature", self.temperature), top_p=_S.top_p,
                           max_new_tokens=_number("max_new_tokens", self.max_new_tokens, whole=True),
                           seed=_number("seed", self.seed, whole=True)),
            PolicyConfig(name=self.policy, k=_number("k", self.k, whole=True), gamma=_number("gamma", self.gamma),
                         estimator=self.estimator),
            replace(base, **{f: _number(name, v) * scale for f, name, v, scale in (
                        ("bandwidth_hz", "bandwidth_mhz", self.bandwidth_mhz, 1e6),
                        ("snr_db", "snr_db", self.snr_db, 1), ("tx_power_w", "tx_power_w", self.tx_power_w, 1))
                              if v is not None},
                    bits_per_prob=_number("bits_per_prob", self.bits_per_prob, whole=True),
                    topk=_number("topk", self.topk, whole=True)),
            device=device_profile(self.device_profile), link_preset=self.link_preset,
        ), u_th, calibration)


def calibration_of(preset: str) -> Calibration | None:
    """The pair's fitted thresholds, known without loading the models (presets carry them)."""
    p = PRESETS.get(preset)
    return p.calibration if p else None


def default_u_th(preset: str) -> float:
    return resolve_u_th(None, calibration_of(preset))[0]


def load_examples(path: Path = EXAMPLES) -> list[dict[str, str]]:
    """Example prompts for the page: a list of {"label", "prompt"}."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [{"label": str(r["label"]), "prompt": str(r["prompt"])} for r in rows]


# ---------------------------------------------------------------------------------------------- one run


class RunView:
    """One run as the page shows it, built incrementally: rendered token spans and summaries of growing
    prefixes (the charts' points; `hlm.metrics.summarize` on the partial stream, so the live figures are
    the same numbers the CLI prints at the end)."""

    def __init__(self, label: str, config: RunConfig, vocab_size: int, energy_methods: dict[str, str],
                 known_call_s: float | None = None) -> None:
        self.label, self.config, self.vocab_size, self.methods = label, config, vocab_size, energy_methods
        self.known_call_s = known_call_s  # `HybridDecoder.call_s` when the run began
        self.events: list[TokenEvent] = []
        self.spans: list[str] = []
        self.points: list[Summary] = []
        self.records: list[dict[str, Any]] = []
        self.f1: float | None = None
        # Greedy runs only: how many of the LLM's own greedy answer's tokens this run reproduced before it first
        # differed (HLM reproduces all of them), and that answer's length. BERTScore at T > 0 is mostly noise.
        self.faithful: tuple[int, int] | None = None
        # T > 0 only: the lowest and highest F1 of the LLM's samples against each other (`Service.judge`).
        self.band: tuple[float, float] | None = None
        self.phase = "waiting"  # waiting | decoding | reference | done | stopped
        self.note = ""  # what is happening now, for the status line
        self.pending: PendingDraft | None = None  # the draft the cloud is verifying now, shown until decided

    def update(self, events: list[TokenEvent]) -> None:
        if self.pending is not None and len(events) > self.pending.index:
            self.pending = None
        new = events[len(self.spans):]
        self.spans.extend(token_span(e, self.config.policy) for e in new)
        self.events = events
        done = self.points[-1].tokens if self.points else 0
        if len(events) > done:
            step = max(1, math.ceil((len(events) - done) / POINTS_PER_UPDATE))
            for n in [*range(done + step, len(events), step), len(events)]:
                self.points.append(summarize(events[:n], self.config.link, self.vocab_size, self.config.policy.name,
                                             self.methods, self.known_call_s, device_profile=self.config.device.name,
                                             link_preset=self.config.link_preset,
                                             u_th_source=self.config.u_th_source))

    def at_limit(self, stop_ids: frozenset[int]) -> bool:
        """Whether the run was cut by max_new_tokens rather than ending on a stop token (mid-sentence, likely)."""
        return (len(self.events) >= self.config.sampling.max_new_tokens and bool(self.events)
                and self.events[-1].token_id not in stop_ids)

    @property
    def summary(self) -> Summary | None:
        return self.points[-1] if self.points else None

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    def payload(self, tokens: bool = True) -> dict[str, Any]:
        """What the API streams: the run so far (cumulative, so the last message is the whole result)."""
        out = {"status": self.phase, "note": self.note, "policy": self.label, "text": self.text,
               "pending": asdict(self.pending) if self.pending else None,
               "summary": self.summary.to_dict() if self.summary else None, "bertscore_f1": self.f1,
               "faithful_prefix": self.faithful, "bertscore_band": self.band,
               "config": self.config.to_dict()}
        if tokens:
            self.records.extend(e.to_dict() for e in self.events[len(self.records):])
            out["tokens"] = self.records
        return out


@dataclass
class Job:
    """A session's running request, so Stop can reach it."""

    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


_END = object()


@dataclass(frozen=True)
class _Note:
    text: str


class Service:
    """The loaded model pairs (one decode at a time), the LLM-only reference cache, the quality scorer and the
    sessions' running jobs. Shared by every session of the app."""

    def __init__(self, load: Callable[[str], HybridDecoder], start: str, presets: Sequence[str],
                 cloud: str | None = None) -> None:
        self._load, self.start, self.presets, self.cloud = load, start, list(presets), cloud
        self.lock = threading.Lock()
        self._decoders: dict[str, HybridDecoder] = {}
        self._references: OrderedDict[tuple, tuple[LinkConfig, list[TokenEvent]]] = OrderedDict()
        self._jobs: dict[str, Job] = {}
        self._scorer_lock = threading.Lock()
        self.decoder(start)  # models load once, at start-up

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Service:
        """From the app's flags (`hlm.cli.add_model_args` plus --cloud/--emulate-link), through `hlm.session`."""
        def load(preset: str) -> HybridDecoder:
            return open_decoder(preset, args.device, args.dtype, args.quant, args.cloud,
                                LinkConfig() if args.emulate_link else None)

        return cls(load, args.models, loadable_presets(args.models, bool(args.cloud)), args.cloud)

    def decoder(self, preset: str) -> HybridDecoder:
        if preset not in self.presets:
            raise ModelError(f"model pair {preset!r} is not offered here; choose one of {', '.join(self.presets)}")
        if preset not in self._decoders:
            with self.lock:  # a load must not race a decode for memory
                if preset not in self._decoders:
                    self._decoders[preset] = self._load(preset)
        return self._decoders[preset]

    def warm_up(self) -> None:
        """Touch every code path once (kernels, allocator, scorer) so the first viewer's first token is fast."""
        decoder = self.decoder(self.start)
        for name in ("ours", "llm"):
            config = Settings(policy=name, max_new_tokens=2).run_config(decoder.pair.calibration)
            for _ in self.stream(decoder, "Hello", config, threading.Event()):
                pass
        self.score(["warm up"], ["warm up"])

    def score(self, candidates: list[str], references: list[str]) -> list[float]:
        with self._scorer_lock:
            return get_scorer().f1(candidates, references)

    def judge(self, run: RunView, references: Sequence[Sequence[TokenEvent]], is_reference: bool = False) -> None:
        """Score a finished run: BERTScore F1, the mean over `references` (the reference run itself: over the
        others; at greedy it is the answer, 1.0). Greedy runs also get the faithful prefix against the one answer;
        with several samples, the band their scores against each other span."""
        texts = ["".join(e.text for e in r) for r in references]
        others = texts[1:] if is_reference else texts
        run.f1 = statistics.fmean(self.score([run.text] * len(others), others)) if others else 1.0
        if run.config.sampling.temperature == 0:
            answer = [e.token_id for e in references[0]]
            run.faithful = faithful_prefix([e.token_id for e in run.events], answer), len(answer)
        if len(texts) > 1:
            pairs = list(itertools.combinations(texts, 2))
            spread = self.score([a for a, _ in pairs], [b for _, b in pairs])
            run.band = min(spread), max(spread)

    @property
    def quality_method(self) -> str:
        return get_scorer().method

    def stream(self, decoder: HybridDecoder, prompt: str, config: RunConfig, cancel: threading.Event,
               note: Callable[[str], None] | None = None,
               pending: Callable[[PendingDraft], None] | None = None) -> Iterator[list[TokenEvent]]:
        """Decode on a worker thread; yield the growing event list on the first token, then at most every
        INTERVAL_S, and once at the end. `note` hears what a long prefill is doing, `pending` each draft on its
        way to the cloud; a yield follows each. Closing the iterator early cancels the decode."""
        decoder.pair.encode_prompt(prompt, config.sampling.max_new_tokens)  # bad prompts fail here, at once
        inbox: queue.SimpleQueue = queue.SimpleQueue()

        def progress(who: str, done: int, total: int) -> None:
            inbox.put(_Note(f"reading the prompt: {done / total:.0%} of {total:,} tokens" if who == "device" else
                            f"the cloud is reading the prompt ({total:,} tokens)…"))

        def work() -> None:
            try:
                with self.lock:
                    for event in decoder.generate(prompt, config, cancel, progress=progress, drafts=True):
                        inbox.put(event)
            except Exception as exc:  # noqa: BLE001 - handed to the request, which re-raises it
                inbox.put(exc)
            inbox.put(_END)

        threading.Thread(target=work, name="hlm-decode", daemon=True).start()
        events: list[TokenEvent] = []
        shown, due, finished = 0, 0.0, False
        try:
            while True:
                waiting = len(events) > shown
                try:
                    item = inbox.get(timeout=max(0.0, due - time.monotonic()) if waiting else None)
                except queue.Empty:
                    item = None
                if item is _END:
                    finished = True
                    yield events
                    return
                if isinstance(item, Exception):
                    finished = True
                    raise item
                if isinstance(item, _Note | PendingDraft):
                    listener = note if isinstance(item, _Note) else pending
                    if listener is not None:
                        listener(item.text if isinstance(item, _Note) else item)
                        yield events
                    continue
                if item is not None:
                    events.append(item)
                if len(events) > shown and time.monotonic() >= due:
                    shown, due = len(events), time.monotonic() + INTERVAL_S
                    yield events
        finally:
            if not finished:
                cancel.set()

    def reference(self, preset: str, prompt: str, config: RunConfig, cancel: threading.Event,
                  same_link: bool = False) -> Iterator[list[TokenEvent]]:
        """The LLM-only run for this prompt and sampling settings, from the cache or generated (streamed).
        Quality needs only its text; `same_link` also wants its energy figures priced with `config.link`."""
        key = (preset, prompt, config.sampling)
        cached = self._references.get(key)
        if cached and (not same_link or cached[0] == config.link):
            self._references.move_to_end(key)
            yield cached[1]
            return
        llm = config.with_policy(name="llm")
        events: list[TokenEvent] = []
        for events in self.stream(self.decoder(preset), prompt, llm, cancel):
            yield events
        if not cancel.is_set():
            self.remember_reference(preset, prompt, llm, events)

    def references(self, preset: str, prompt: str, config: RunConfig, cancel: threading.Event
                   ) -> Iterator[tuple[int, list[TokenEvent]]]:
        """What a run is scored against: the LLM's answer at greedy, else REFERENCE_SAMPLES LLM samples (seeds
        seed, seed + 1, ...), each cached or generated. Yields (which sample, its events so far)."""
        n = 1 if config.sampling.temperature == 0 else REFERENCE_SAMPLES
        for i in range(n):
            sampling = replace(config.sampling, seed=config.sampling.seed + i)
            for events in self.reference(preset, prompt, replace(config, sampling=sampling), cancel):
                yield i, events
            if cancel.is_set():
                return

    def remember_reference(self, preset: str, prompt: str, config: RunConfig, events: list[TokenEvent]) -> None:
        key = (preset, prompt, config.sampling)
        self._references[key] = (config.link, list(events))
        self._references.move_to_end(key)
        while len(self._references) > REFERENCE_CACHE:
            self._references.popitem(last=False)

    def begin(self, session: str) -> Job:
        job = self._jobs[session] = Job()
        return job

    def end(self, session: str, job: Job) -> None:
        job.done.set()
        if self._jobs.get(session) is job:
            del self._jobs[session]

    def stop(self, session: str) -> None:
        """Ask the session's decode to stop after its current token and wait until its request has shown the
        final state (the page then cancels whatever is still queued)."""
        job = self._jobs.get(session)
        if job is not None:
            job.cancel.set()
            job.done.wait(STOP_WAIT_S)

    def run(self, preset: str, prompt: str, run: RunView, job: Job, quality: bool = True) -> Iterator[None]:
        """Decode into `run`, then (unless stopped) score it against the LLM-only reference. Yields after
        every change to `run`."""
        decoder = self.decoder(preset)
        run.phase, run.note = "decoding", "decoding…"

        def note(text: str) -> None:
            run.note = text

        def pending(draft: PendingDraft) -> None:
            run.pending = draft

        for events in self.stream(decoder, prompt, run.config, job.cancel, note, pending):
            run.update(events)
            if events:  # before the first token the note says what the prefill is doing
                run.note = f"decoding… {len(events)} tokens"
            yield
        if run.config.policy.name == "llm" and not job.cancel.is_set():
            self.remember_reference(preset, prompt, run.config, run.events)
        if quality and not job.cancel.is_set():
            run.phase = "reference"
            limit = run.config.sampling.max_new_tokens
            s = run.summary
            done = f"done: {s.tokens} tokens in {s.wall_s:.1f} s; " if s else ""
            references: list[list[TokenEvent]] = []
            for i, reference in self.references(preset, prompt, run.config, job.cancel):
                references[i:] = [reference]
                which = "reference" if run.config.sampling.temperature == 0 else \
                    f"sample {i + 1} of {REFERENCE_SAMPLES}"
                run.note = (f"{done}BERTScore follows: the LLM-only {which}, {len(reference)}/{limit} tokens "
                            "(after the run, not beside it: the cores are busy decoding)")
                yield
            if not job.cancel.is_set():
                run.note = "scoring…"
                yield
                self.judge(run, references)
        stopped = job.cancel.is_set()
        run.phase = "stopped" if stopped else "done"
        s = run.summary
        limit = (f"; stopped at the {len(run.events)}-token limit (raise Max new tokens for more)"
                 if run.at_limit(decoder.pair.stop_ids) else "")
        run.note = (f"stopped after {s.tokens if s else 0} tokens" if stopped else
                    f"done: {s.tokens} tokens decoded in {s.wall_s:.1f} s{limit}" if s else "done: no tokens")
        yield


def loadable_presets(start: str, cloud: bool) -> list[str]:
    """The start-up pair first, then the presets that can load offline here. A remote cloud serves one pair."""
    if cloud:
        return [start]
    return [start, *(name for name in PRESETS if name != start and _can_load(name))]


def _can_load(name: str) -> bool:
    if name == "tiny":
        return True
    if name == "embedded":
        from hlm.models.embedded import DRAFT, VERIFIER, is_ready

        return is_ready(DRAFT) and is_ready(VERIFIER)
    from huggingface_hub import try_to_load_from_cache

    preset = PRESETS[name]
    return all(isinstance(try_to_load_from_cache(ref, "config.json"), str) for ref in (preset.draft, preset.verifier))


# ---------------------------------------------------------------------------------------------- history


def run_label(config: RunConfig) -> str:
    p = config.policy
    if p.name == "ours":
        return f"ours k={p.k} γ={p.gamma:g}" + ("" if p.estimator == _P.estimator else f" {p.estimator}")
    if p.name == "uhlm":
        return f"uhlm u_th={p.u_th:g}"
    if p.name == "random":
        return f"random skip={p.skip_rate:.2f}"
    return p.name


def history_point(run: RunView, prompt: str, preset: str) -> dict[str, Any] | None:
    """One scatter point for a finished run; None where the trade-off is undefined (the LLM reference itself)."""
    s = run.summary
    if run.phase != "done" or s is None or s.energy_saving is None or run.f1 is None:
        return None
    p = run.config.policy
    return {"label": run_label(run.config), "policy": p.name, "estimator": p.estimator, "k": p.k, "gamma": p.gamma,
            "u_th": p.u_th, "energy_saving": s.energy_saving, "bertscore_f1": run.f1, "band": run.band,
            "upload_rate": s.upload_rate,
            "tokens": s.tokens, "pair": preset, "prompt": prompt[:60]}


def add_history(history: list[dict[str, Any]] | None, *points: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The session's points with these added, each numbered in run order (the scatter labels points by number:
    full labels of nearby runs overlapped)."""
    past = list(history or [])
    n = past[-1].get("n", len(past)) if past else 0
    new = [{**p, "n": n + i} for i, p in enumerate((p for p in points if p), start=1)]
    return [*past, *new][-HISTORY_LIMIT:]


# ---------------------------------------------------------------------------------------------- what-if replay


@dataclass(frozen=True)
class Replay:
    """A finished run re-decided at other knobs: the same drafts, each uploaded iff the policy's rule says so at
    the new values (ours: its score against the (k, gamma) bar; uhlm: u > u_th). Only the decisions are recomputed
    (no model call), so the text after a changed decision could differ in a real run. Per token: whether it would
    be uploaded, the running upload rate and the cumulative device energy, its link part priced like the HLM
    counterfactual (modelled: full payload plus the ids kept since the last upload; the first call's cloud time for
    the first upload, the median one-token call after)."""

    knobs: str  # the values replayed, as the page shows them ("k=9, γ=0", "u_th=0.3")
    uploads: tuple[bool, ...]
    rates: tuple[float, ...]
    energy_j: tuple[float, ...]
    link_j: float

    @property
    def upload_rate(self) -> float:
        return self.rates[-1] if self.rates else 0.0


def replayable(run: RunView) -> bool:
    """A finished run of uhlm (every draft carries u) or of ours whose every draft carries a score (the
    paper-literal estimators decide on attention rows, which are not a threshold on a stored score)."""
    stat = {"ours": "score", "uhlm": "u"}.get(run.config.policy.name)
    return (run.phase == "done" and stat is not None and bool(run.events) and run.summary is not None
            and all(getattr(e, stat) is not None for e in run.events))


def replay_rule(run: RunView, scale: ScoreScale | None, k: int, gamma: float, u_th: float
                ) -> tuple[str, Callable[[TokenEvent], bool]]:
    """The replayed policy's decision at the new knobs, as a label and a test of one stored draft."""
    if run.config.policy.name == "uhlm":
        return f"u_th={u_th:g}", lambda e: e.u is not None and uncertain(e.u, u_th)
    assert scale is not None  # ours
    bar = scale.threshold(k, gamma)
    return f"k={k}, γ={gamma:g}", lambda e: e.score is not None and e.score >= bar


def replay(run: RunView, knobs: str, upload: Callable[[TokenEvent], bool]) -> Replay:
    """Re-decide `run`'s drafts with `upload` (from `replay_rule`): a pure recomputation."""
    link, s = run.config.link, run.summary
    assert s is not None  # `replayable`
    first_call_s = next((e.verify_s for e in run.events if e.uploaded), s.hlm_call_s)
    prompt_len = run.events[0].position - run.events[0].index
    synced, uploads, rates, energy, link_j, compute_j, sent = 0, [], [], [], 0.0, 0.0, 0
    for e in run.events:
        up = upload(e)
        if up:
            context = prompt_len + e.index
            cost = upload_cost(link, upload_bits(link, run.vocab_size, context - synced),
                               s.hlm_call_s if synced else first_call_s)
            link_j += cost.radio_j + cost.idle_j
            synced, sent = context + 1, sent + 1
        compute_j += e.energy_j.get("device_compute", 0.0)
        uploads.append(up)
        rates.append(sent / (e.index + 1))
        energy.append(compute_j + link_j)
    return Replay(knobs, tuple(uploads), tuple(rates), tuple(energy), link_j)


def replay_note(run: RunView, r: Replay) -> str:
    s = run.summary
    assert s is not None
    return (f"what-if replay at {r.knobs} on this run's drafts: {sum(r.uploads)} of {len(r.uploads)} "
            f"uploaded ({_pct(r.upload_rate)}, ran at {_pct(s.upload_rate)}), link energy {r.link_j:.3g} J "
            f"(modelled; ran at {_link_j(s):.3g} J). The text after a changed decision could differ: Generate runs "
            "it for real.")


# ---------------------------------------------------------------------------------------------- HTML


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{round(x, 3) + 0.0:.1%}"  # + 0.0: no "-0.0%"


def token_title(e: TokenEvent, policy: PolicyConfig) -> str:
    """The hover text of one token: why it was kept or uploaded, and what the cloud said."""
    lines = [f"#{e.index}  {e.text!r}  {SOURCE_LABELS[e.source]}"]
    if e.u is not None:
        lines.append(f"uncertainty u = {e.u:.2f} ({'above' if e.u > policy.u_th else 'not above'} "
                     f"u_th = {policy.u_th:g})")
    if e.score is not None and e.score_threshold is not None:
        lines.append(f"{policy.estimator} score {e.score:.3f} vs bar {e.score_threshold:.3f} (k {policy.k}, "
                     f"γ {policy.gamma:g}): {'upload' if e.score >= e.score_threshold else 'keep'}")
    if e.importance is not None and e.importance_threshold is not None and e.importance_rank is not None:
        lines.append(f"importance {e.importance:.4f} vs threshold τ {e.importance_threshold:.4f}, "
                     f"rank {e.importance_rank + 1} (top-k {policy.k}): "
                     f"{'important' if e.important else 'not important'}")
    if e.p_draft is not None and e.q_draft is not None:
        lines.append(f"p(draft) {e.p_draft:.3f}, q(draft) {e.q_draft:.3f}, accept prob min(1, q/p) "
                     f"{e.accept_prob:.3f}" if e.accept_prob is not None else f"p {e.p_draft:.3f}, q {e.q_draft:.3f}")
    if e.source == "cloud_resampled" and e.draft_id is not None:
        lines.append(f"draft id {e.draft_id} rejected; the cloud sampled id {e.token_id}")
    if e.bits_up:
        synced = f", including {e.synced_ids} synced ids" if e.synced_ids else ""
        lines.append(f"uploaded {e.bits_up:,} bits{synced}")
    else:
        lines.append("nothing uploaded")
    device = {p: e.energy_j.get(p, 0.0) * 1e3 for p in PART_COLOURS}
    lines.append(f"device energy {sum(device.values()):.3g} mJ: " +
                 ", ".join(f"{PART_LABELS[p]} {j:.3g}" for p, j in device.items()))
    return "\n".join(lines)


def token_span(e: TokenEvent, policy: PolicyConfig, would_upload: bool = False) -> str:
    """One token, focusable (Enter, Space or a click opens its details: `assets/app.js`). Leading blanks stay
    outside the span, so the source's underline marks the word, not the space before it. `would_upload`: the
    what-if replay outlines the drafts it would upload."""
    title = html.escape(token_title(e, policy)).replace("\n", "&#10;")
    word = e.text.lstrip(" \t") or e.text
    lead = e.text[:len(e.text) - len(word)]
    mark = " would-upload" if would_upload else ""
    return (f'{lead}<span class="tok {e.source}{mark}" tabindex="0" role="button" data-i="{e.index}" '
            f'title="{title}">{html.escape(word)}</span>')


def tokens_html(run: RunView) -> str:
    """Only spans: the output grows by appending, which Gradio sends as a diff (the styling is the
    component's class). A draft the cloud is verifying shows last, marked pending."""
    p = run.pending
    tail = "" if p is None else (f'<span class="tok pending" title="draft #{p.index}: waiting for the cloud\'s '
                                 f'verdict">{html.escape(p.text)}</span>')
    return "".join(run.spans) + tail


def legend_html(sources: Sequence[str] = SOURCES) -> str:
    items = "".join(f'<span class="item"><span class="swatch tok {s}"></span>{SOURCE_LABELS[s]}</span>'
                    for s in sources)
    hint = '<span class="hint">tap, click or press Enter on a token for its details</span>'
    return f'<div class="hlm-legend">{items}{hint}</div>'


def _card(value: str, name: str, sub: str) -> str:
    return (f'<div class="card"><div class="value">{value}</div><div class="name">{name}</div>'
            f'<div class="sub">{sub}</div></div>')


def stats_html(run: RunView | None, note: str | None = None) -> str:
    """The headline figures and a status line (`note`, when given, replaces the run's own: the replay's)."""
    s = run.summary if run else None
    if s is None:
        cards = [_card("–", n, "") for n in ("upload rate", "energy saved", "tokens / s", "LLM calls", "BERTScore")]
    else:
        hlm_j = f"{s.device_energy_j:.3g} J vs {s.hlm_device_energy_j:.3g} J for HLM" if s.hlm_device_energy_j else \
            f"{s.device_energy_j:.3g} J on the device"
        hlm_j += f"; link {s.link_energy_j:.3g} J (radio + waiting: what the policy controls)"
        f1 = run.f1 if run else None
        cards = [
            _card(_pct(s.upload_rate), "upload rate", f"{s.uploads} of {s.tokens} tokens"),
            _card(_pct(s.energy_saving), "energy saved", hlm_j),
            _card(f"{s.tokens_per_s:.1f}", "tokens / s", f"{s.tokens_per_s_modelled_link:.1f} over the modelled link"),
            _card(str(s.llm_calls), "LLM calls", f"{s.accepted} accepted, {s.resampled} resampled"),
            _card("–" if f1 is None else f"{f1:.3f}", "BERTScore", quality_note(run)),
        ]
    phase = "replay" if note else run.phase if run else "waiting"
    note = html.escape(note or (f"{run.label}: {run.note}" if run else "Enter a prompt and press Generate."))
    return f'<div class="hlm-stats">{"".join(cards)}</div><div class="hlm-status {phase}">{note}</div>'


def quality_note(run: RunView | None) -> str:
    """What the BERTScore card's figure is, and what is inside the noise."""
    if run is not None and run.faithful is not None:
        return "F1 vs the LLM's answer; faithful prefix {} of {} tokens (greedy: identical to it)".format(
            *run.faithful)
    if run is not None and run.band is not None:
        return (f"mean F1 vs {REFERENCE_SAMPLES} LLM samples; they score {run.band[0]:.3f}–{run.band[1]:.3f} "
                "against each other: inside that band is noise")
    return "F1 vs the LLM-only output"


def _link_j(s: Summary) -> float:
    """Radio plus the idle wait for the cloud: the device energy the upload policy controls."""
    return s.device_energy_parts_j["radio"] + s.device_energy_parts_j["device_idle"]


def verdict(runs: Sequence[RunView]) -> str | None:
    """One sentence from a finished comparison's measured numbers (ours against HLM and the matched coin); None
    until all three are done and scored. Never a canned claim: every figure is read off this prompt's runs."""
    done = {r.config.policy.name: r for r in runs if r.phase == "done" and r.f1 is not None and r.summary}
    if not {"hlm", "ours", "random"} <= done.keys():
        return None
    ours, hlm, coin = done["ours"], done["hlm"], done["random"]
    o, h, c = ours.summary, hlm.summary, coin.summary
    assert o is not None and h is not None and c is not None  # `done` holds runs with a summary
    less = 1.0 - _link_j(o) / _link_j(h) if _link_j(h) > 0 else 0.0
    energy = (f"used {_pct(abs(less))} {'less' if less >= 0 else 'more'} link energy (radio and waiting for the "
              "cloud) than HLM")
    sent = f"On this prompt ours sent {_pct(o.upload_rate)} of its tokens to the cloud, {energy} and"
    if ours.faithful and hlm.faithful and coin.faithful:  # greedy: the share of the answer kept word for word
        def kept(r: RunView) -> str:
            return _pct(r.faithful[0] / r.faithful[1] if r.faithful and r.faithful[1] else 0.0)

        return (f"{sent} kept the LLM's answer token for token for {kept(ours)} of its length (BERTScore F1 "
                f"{ours.f1:.3f}; HLM {kept(hlm)}, {hlm.f1:.3f}); a coin sending as many ({_pct(c.upload_rate)}) "
                f"kept {kept(coin)} ({coin.f1:.3f}).")
    noise = f"; LLM samples score {ours.band[0]:.3f}–{ours.band[1]:.3f} against each other" if ours.band else ""
    return (f"{sent} scored BERTScore F1 {ours.f1:.3f} against the LLM's {'samples' if ours.band else 'answer'} "
            f"(HLM {hlm.f1:.3f}{noise}); a coin sending as many ({_pct(c.upload_rate)}) scored {coin.f1:.3f}.")


def compare_html(runs: Sequence[RunView]) -> str:
    """The Compare view: a summary table (rows appear as runs finish) over the runs' outputs side by side."""
    head = "".join(f"<th>{h}</th>" for h in COMPARE_HEADERS)
    ours = {run_label(r.config) for r in runs if r.config.policy.name == "ours"}  # its row stands out
    body = "".join(("<tr class=\"ours\">" if row[0] in ours else "<tr>") +
                   "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in compare_rows(runs))
    done = " done" if runs and all(r.phase in ("done", "stopped") for r in runs) else ""
    table = (f'<div class="hlm-compare-summary{done}"><table><thead><tr>{head}</tr></thead>'
             f'<tbody>{body}</tbody></table></div>' if body else "")
    cols = []
    for run in runs:
        s = run.summary
        facts = "waiting…" if s is None else (
            f"upload {_pct(s.upload_rate)} · saving {_pct(s.energy_saving)} · "
            f"F1 {'–' if run.f1 is None else f'{run.f1:.3f}'}")
        cols.append(f'<div class="col"><div class="head"><b>{html.escape(run.label)}</b>'
                    f'<span>{facts}</span></div><div class="hlm-col-tokens">{"".join(run.spans)}</div></div>')
    said = verdict(runs)
    lead = f'<p class="hlm-verdict">{html.escape(said)}</p>' if said else ""
    band = next((r.band for r in runs if r.band), None)
    if band:
        lead += (f'<p class="hlm-band">BERTScore F1 is the mean against {REFERENCE_SAMPLES} LLM samples; the '
                 f"samples score {band[0]:.3f}–{band[1]:.3f} against each other, so differences inside that band "
                 "are sampling noise (HLM samples the LLM's distribution exactly).</p>")
    return f'{lead}{table}<div class="hlm-compare">{"".join(cols)}</div>'


def hardware_html(decoder: HybridDecoder, config: RunConfig, cloud: str | None, quality_method: str) -> str:
    """Device, dtype, and how each energy figure is obtained (measured by a counter, or modelled)."""
    d = decoder.pair.describe()
    link, methods = config.link, decoder.energy_methods(config.link, config.device)

    def model(m: dict[str, Any], role: str) -> str:
        fast = d["quant"].get(role, "none")
        return (f"{html.escape(m['name'])}: {m['params'] / 1e6:,.0f} M parameters, {m['dtype']} on {m['device']}; "
                f"weights: {html.escape(fast)}")

    full = upload_bits(link, decoder.pair.vocab_size, 0)
    cost = upload_cost(link, full, link.cloud_verify_time_s)
    rows = [
        ("model pair", f"{html.escape(d['pair'])}, vocabulary {d['vocab_size']:,}, context {d['max_context']:,}"),
        ("device (drafts)", model(d["draft"], "draft")),
        ("cloud (verifies)", model(d["verifier"], "verifier") + (f", served by {html.escape(cloud)}" if cloud else
                                                     ", in this process (the radio link between them is modelled)")),
        ("hardware", f"{html.escape(d['device_name'])}, {d['torch_threads']} torch threads"),
        *((f"energy: {PART_LABELS[p]}", _method(m)) for p, m in methods.items()),
        ("link", f"uplink {link.uplink_rate_bps / 1e6:.1f} Mbit/s; one full upload is {full:,} bits = "
                 f"{cost.uplink_s * 1e3:.1f} ms and {cost.radio_j * 1e3:.2f} mJ of radio"),
        ("quality", html.escape(quality_method) + ", against the LLM-only output for the same prompt and sampling"),
    ]
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="hlm-hardware">{body}</table>'


def _method(label: str) -> str:
    kind = "measured" if label.startswith("measured") else "modelled"
    return f'<span class="badge {kind}">{kind}</span> {html.escape(label.split(": ", 1)[-1])}'


# ---------------------------------------------------------------------------------------------- tables

TOKEN_HEADERS = ["#", "token", "source", "u", "importance", "τ", "rank", "p(draft)", "q(draft)", "accept",
                 "bits up"]
COMPARE_HEADERS = ["policy", "tokens", "upload rate", "LLM calls", "device energy (J)", "saved vs HLM", "tokens/s",
                   "tokens/s, modelled link", "BERTScore F1"]


def _fmt(x: float | int | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def token_rows(events: Sequence[TokenEvent]) -> list[list[str]]:
    return [[str(e.index), repr(e.text), e.source, _fmt(e.u, ".2f"), _fmt(e.importance, ".4f"),
             _fmt(e.importance_threshold, ".4f"), _fmt(None if e.importance_rank is None else e.importance_rank + 1,
                                                        "d"),
             _fmt(e.p_draft, ".3f"), _fmt(e.q_draft, ".3f"), _fmt(e.accept_prob, ".3f"), _fmt(e.bits_up, ",")]
            for e in events]


def compare_rows(runs: Sequence[RunView]) -> list[list[str]]:
    rows = []
    for run in runs:
        s = run.summary
        if s is not None:
            rows.append([run.label, str(s.tokens), _pct(s.upload_rate), str(s.llm_calls), f"{s.device_energy_j:.3g}",
                         _pct(s.energy_saving), f"{s.tokens_per_s:.2f}", f"{s.tokens_per_s_modelled_link:.2f}",
                         _fmt(run.f1, ".3f")])
    return rows


# ---------------------------------------------------------------------------------------------- figures


def _layout(title: str, x: str, y: str, **extra: Any) -> dict[str, Any]:
    """Shared look: title top left, legend under the x axis (it fits narrow screens), transparent background
    (light and dark themes), no mode bar (less for the browser to redraw on every update)."""
    axis = {"gridcolor": "rgba(148,163,184,0.25)", "zeroline": False, "automargin": True}
    return {"title": {"text": title, "font": {"size": 14}, "x": 0.01, "xanchor": "left", "y": 0.97,
                      "yref": "container", "yanchor": "top"},
            "height": 300, "margin": {"l": 56, "r": 12, "t": 36, "b": 96},
            "paper_bgcolor": "rgba(0,0,0,0)", "plot_bgcolor": "rgba(0,0,0,0)",
            "font": {"size": 12, "color": "#64748b"},
            "legend": {"orientation": "h", "x": 0, "y": -0.36, "yanchor": "top", "xanchor": "left",
                       "bgcolor": "rgba(0,0,0,0)", "font": {"size": 11}},
            "xaxis": {**axis, "title": {"text": x}}, "yaxis": {**axis, "title": {"text": y}},
            "hovermode": "x unified", **extra}


def _figure(data: list[dict[str, Any]], layout: dict[str, Any]) -> dict[str, Any]:
    return {"data": data, "layout": layout, "config": {"displayModeBar": False}}


def _empty(layout: dict[str, Any], text: str) -> dict[str, Any]:
    layout["annotations"] = [{"text": text, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5,
                              "y": 0.5, "font": {"size": 13}}]
    layout["xaxis"]["showticklabels"] = layout["yaxis"]["showticklabels"] = False
    return _figure([], layout)


REPLAY_LINE = {"dash": "dot", "width": 2.5, "color": "#7c3aed"}


def energy_figure(points: Sequence[Summary], what_if: Replay | None = None) -> dict[str, Any]:
    """Cumulative device energy split into compute / radio / idle, with the HLM counterfactual dashed (and a
    what-if replay's total dotted)."""
    layout = _layout("Device energy, cumulative", "tokens", "joules")
    if not points:
        return _empty(layout, "energy appears here as tokens stream")
    x = [s.tokens for s in points]
    data: list[dict[str, Any]] = [
        {"type": "scatter", "x": x, "y": [s.device_energy_parts_j[part] for s in points], "name": PART_LABELS[part],
         "stackgroup": "device", "mode": "lines", "line": {"width": 0.5, "color": colour},
         "hovertemplate": "%{y:.3g} J"}
        for part, colour in PART_COLOURS.items()]
    if any(s.hlm_device_energy_j for s in points):
        data.append({"type": "scatter", "x": x, "y": [s.hlm_device_energy_j for s in points],
                     "name": "HLM", "mode": "lines",
                     "line": {"dash": "dash", "width": 2, "color": "#e11d48"}, "hovertemplate": "%{y:.3g} J"})
    if what_if is not None:
        data.append({"type": "scatter", "x": list(range(1, len(what_if.energy_j) + 1)), "y": list(what_if.energy_j),
                     "name": f"replay {what_if.knobs} (modelled)", "mode": "lines",
                     "line": REPLAY_LINE, "hovertemplate": "%{y:.3g} J"})
    return _figure(data, layout)


def upload_figure(points: Sequence[Summary], what_if: Replay | None = None) -> dict[str, Any]:
    layout = _layout("Upload rate, running", "tokens", "% of tokens uploaded")
    layout["yaxis"]["range"] = [0, 105]
    if not points:
        return _empty(layout, "the share of uploaded tokens appears here")
    x = [s.tokens for s in points]
    data = [{"type": "scatter", "x": x, "y": [s.upload_rate * 100 for s in points], "name": "this run",
             "mode": "lines", "line": {"width": 2, "color": "#16a34a"}, "fill": "tozeroy",
             "fillcolor": "rgba(22,163,74,0.12)", "customdata": [s.uploads for s in points],
             "hovertemplate": "%{y:.1f}% (%{customdata} uploads)"},
            {"type": "scatter", "x": [x[0], x[-1]], "y": [100, 100], "name": "HLM", "mode": "lines",
             "line": {"dash": "dash", "width": 2, "color": "#e11d48"}, "hoverinfo": "skip"}]
    if what_if is not None:
        data.append({"type": "scatter", "x": list(range(1, len(what_if.rates) + 1)),
                     "y": [r * 100 for r in what_if.rates], "name": f"replay {what_if.knobs}",
                     "mode": "lines", "line": REPLAY_LINE, "hovertemplate": "%{y:.1f}% (replay)"})
    return _figure(data, layout)


def history_figure(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """This session's runs: energy saving vs BERTScore F1, one point per run, the trade-off frontier."""
    layout = _layout("Your runs (numbered in order): energy saving vs quality", "BERTScore F1 vs the LLM-only output",
                     "energy saving vs HLM (%)", hovermode="closest", height=340)
    if not history:
        return _empty(layout, "each finished run adds a point here")
    f1 = [h["bertscore_f1"] for h in history]
    saving = [h["energy_saving"] * 100 for h in history]
    layout["xaxis"]["range"] = [min(0.5, *f1) - 0.08, 1.04]
    layout["yaxis"]["range"] = [min(0.0, *saving) - 8, max(10.0, *saving) + 12]
    groups: dict[str, list[dict[str, Any]]] = {}
    for h in history:
        groups.setdefault(f"ours {h['estimator']}" if h["policy"] == "ours" else h["policy"], []).append(h)
    data = [{"type": "scatter", "mode": "markers+text", "name": "random (coin)" if name == "random" else name,
             "x": [h["bertscore_f1"] for h in rows], "y": [h["energy_saving"] * 100 for h in rows],
             "text": [str(h.get("n", "")) for h in rows], "textposition": "middle right", "textfont": {"size": 10},
             "cliponaxis": False,
             "marker": {"size": 10, "color": POLICY_COLOURS.get(name, "#17becf"),
                        "symbol": "x" if name == "random" else "circle"},
             "customdata": [[h["label"], h["upload_rate"] * 100, h["prompt"]] for h in rows],
             "hovertemplate": "run %{text}: %{customdata[0]}<br>F1 %{x:.3f}, saving %{y:.1f}%<br>"
                              "upload rate %{customdata[1]:.1f}%<br>%{customdata[2]}<extra></extra>"}
            for name, rows in groups.items()]
    banded = [h for h in history if h.get("band")]
    if banded:  # T > 0: behind each point, the F1 range of the LLM's own samples on its prompt
        data.insert(0, {"type": "scatter", "mode": "lines", "name": "LLM vs LLM samples (noise)",
                        "x": [x for h in banded for x in (*h["band"], None)],
                        "y": [y for h in banded for y in (h["energy_saving"] * 100,) * 2 + (None,)],
                        "line": {"width": 9, "color": "rgba(148,163,184,0.45)"}, "hoverinfo": "skip"})
        layout["xaxis"]["range"][0] = min(layout["xaxis"]["range"][0], *(h["band"][0] - 0.08 for h in banded))
    return _figure(data, layout)


# ---------------------------------------------------------------------------------------------- page flows


@dataclass
class Frame:
    """One update of the page, field for field the app's outputs; None leaves a component as it is."""

    stats: str | None = None
    tokens: str | None = None
    energy: dict[str, Any] | None = None
    uploads: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    table: list[list[str]] | None = None
    history: list[dict[str, Any]] | None = None
    compare: str | None = None
    tab: str | None = None
    hardware: str | None = None
    prompt: str | None = None


def live_frames(run: RunView, updates: Iterator[Any]) -> Iterator[Frame]:
    """A frame per update of `run`: stats and tokens always; the charts only when their points changed, and not
    with the first token (a plotly redraw costs the browser far more than text, so the first token shows at once)."""
    drawn = 0
    for n, _ in enumerate(updates):
        frame = Frame(stats=stats_html(run), tokens=tokens_html(run))
        if len(run.points) != drawn and (n > 0 or run.phase != "decoding"):
            drawn = len(run.points)
            frame.energy, frame.uploads = energy_figure(run.points), upload_figure(run.points)
        yield frame


class Dashboard:
    """The page's actions on top of a `Service`: each is a generator of `Frame`s (or API payloads)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._last: OrderedDict[str, tuple[str, RunView]] = OrderedDict()  # session -> (pair, its last run of ours)

    def _new_run(self, preset: str, label: str, config: RunConfig) -> RunView:
        decoder = self.service.decoder(preset)
        return RunView(label, config, decoder.pair.vocab_size, decoder.energy_methods(config.link, config.device),
                       decoder.call_s)

    def _prepare(self, preset: str, prompt: str, settings: Settings) -> tuple[HybridDecoder, RunConfig]:
        """Validate everything a viewer typed before any model work (errors surface at once)."""
        decoder = self.service.decoder(preset)
        config = settings.run_config(decoder.pair.calibration)
        decoder.pair.encode_prompt(prompt, config.sampling.max_new_tokens)
        return decoder, config

    def hardware(self, preset: str, config: RunConfig | None = None) -> str:
        decoder = self.service.decoder(preset)
        return hardware_html(decoder, config or Settings().run_config(decoder.pair.calibration), self.service.cloud,
                             self.service.quality_method)

    def hardware_info(self, preset: str) -> dict[str, Any]:
        """The hardware panel as data (the /hardware endpoint), with the page's default settings."""
        decoder = self.service.decoder(preset)
        cal = decoder.pair.calibration
        config = Settings().run_config(cal)
        return {"pair": decoder.pair.describe(), "energy_methods": decoder.energy_methods(config.link, config.device),
                "cloud": self.service.cloud, "quality": self.service.quality_method,
                "calibration": asdict(cal) if cal else None}

    def generate(self, session: str, preset: str, prompt: str, settings: Settings,
                 history: list[dict[str, Any]] | None) -> Iterator[Frame]:
        """The Generate button: stream one run, then its quality and a history point."""
        _, config = self._prepare(preset, prompt, settings)
        run = self._new_run(preset, run_label(config), config)
        job = self.service.begin(session)
        self._last.pop(session, None)
        try:
            yield Frame(stats=stats_html(run), tokens="", table=[], tab="output",
                        hardware=self.hardware(preset, config))
            table_shown = False
            for frame in live_frames(run, self.service.run(preset, prompt, run, job)):
                if run.phase == "reference" and not table_shown:  # the result first; its BERTScore when ready
                    frame.table, table_shown = token_rows(run.events), True
                if replayable(run):  # before the page shows "done", so a slider moved at once replays
                    self._last[session] = (preset, run)
                    while len(self._last) > REPLAYS:
                        self._last.popitem(last=False)
                yield frame
            history = add_history(history, history_point(run, prompt, preset))
            yield Frame(table=token_rows(run.events), history=history, quality=history_figure(history))
        finally:
            self.service.end(session, job)

    def replay(self, session: str, k: Any, gamma: Any, u_th: Any = None) -> Frame:
        """A knob move after a run of ours (k, γ) or uhlm (u_th): outline the drafts the new values would upload
        and redraw the upload-rate and energy charts with the replay beside the run (no model call). An empty frame
        (nothing changes) when there is no such run or the values are not yet valid (a box being typed in)."""
        last = self._last.get(session)
        try:
            k, gamma = int(_number("k", k, whole=True)), _number("gamma", gamma)
            u_th = _number("u_th", u_th) if u_th is not None else None
        except ConfigError:
            return Frame()
        if last is None or not 1 <= k <= WINDOW or gamma < 0:
            return Frame()
        preset, run = last
        policy = run.config.policy
        if policy.name == "uhlm" and (u_th is None or not 0 <= u_th <= 1):
            return Frame()
        scale = self.service.decoder(preset).pair.selection.scale(policy.estimator) if policy.name == "ours" else None
        r = replay(run, *replay_rule(run, scale, k, gamma, policy.u_th if u_th is None else u_th))
        return Frame(stats=stats_html(run, replay_note(run, r)),
                     tokens="".join(token_span(e, policy, up) for e, up in zip(run.events, r.uploads, strict=True)),
                     energy=energy_figure(run.points, r), uploads=upload_figure(run.points, r))

    def _compare(self, preset: str, prompt: str, base: RunConfig, job: Job, policies: Sequence[str] = COMPARED
                 ) -> Iterator[tuple[list[RunView], RunView]]:
        """The LLM-only reference, then `policies` with the same settings, each scored against the reference (at
        T > 0 against REFERENCE_SAMPLES LLM samples, which also give the noise band: `Service.judge`); a
        `random` run (after ours) gets the coin matched to ours' realised upload rate on this prompt, so its expected
        uploads equal ours' count: the control that says whether choosing the drafts matters. Yields (all runs, the
        one running) after every change."""
        llm = base.with_policy(name="llm")
        runs = [self._new_run(preset, "llm (reference)", llm),
                *(self._new_run(preset, run_label(base.with_policy(name=n)), base.with_policy(name=n))
                  for n in policies)]
        reference = runs[0]
        reference.phase = "decoding"
        yield runs, reference
        for events in self.service.reference(preset, prompt, llm, job.cancel, same_link=True):
            reference.update(events)
            reference.note = f"decoding… {len(events)} tokens"
            yield runs, reference
        if job.cancel.is_set():
            reference.phase, reference.note = "stopped", "stopped"
            return
        samples: list[list[TokenEvent]] = []  # the reference first; at T > 0 more LLM samples for the band
        for i, events in self.service.references(preset, prompt, llm, job.cancel):
            samples[i:] = [events]
            if i:
                reference.note = f"LLM sample {i + 1} of {REFERENCE_SAMPLES} for the noise band: {len(events)} tokens"
                yield runs, reference
        if job.cancel.is_set():
            reference.phase, reference.note = "stopped", "stopped"
            return
        self.service.judge(reference, samples, is_reference=True)
        reference.phase, reference.note = "done", "done"
        for run in runs[1:]:
            if run.config.policy.name == "random":
                ours = next((r.summary for r in runs if r.config.policy.name == "ours" and r.summary), None)
                if ours is not None:
                    run.config = base.with_policy(name="random", skip_rate=1.0 - ours.upload_rate)
                    run.label = f"{run_label(run.config)} (matched to ours)"
            for _ in self.service.run(preset, prompt, run, job, quality=False):
                yield runs, run
            if run.phase != "done":
                return
            self.service.judge(run, samples)
            yield runs, run

    def compare(self, session: str, preset: str, prompt: str, settings: Settings,
                history: list[dict[str, Any]] | None, policies: Sequence[str] = COMPARED) -> Iterator[Frame]:
        """The Compare button (and "Show me", with `SHOW_ME`): the runs side by side, the headline figures and
        charts following the one running, and the verdict once every run is scored."""
        _, base = self._prepare(preset, prompt, settings)
        job = self.service.begin(session)
        self._last.pop(session, None)  # the charts will follow these runs: no replay of an older one over them
        try:
            steps = self._compare(preset, prompt, base, job, policies)
            runs, _ = next(steps)
            yield Frame(compare=compare_html(runs), tab="compare",
                        hardware=self.hardware(preset, base))
            for run, updates in itertools.groupby(steps, key=lambda step: step[1]):
                for frame in live_frames(run, updates):
                    frame.tokens, frame.compare = None, compare_html(runs)
                    yield frame
            history = add_history(history, *(history_point(r, prompt, preset) for r in runs[1:]))
            yield Frame(compare=compare_html(runs), history=history,
                        quality=history_figure(history))
        finally:
            self.service.end(session, job)

    def show_me(self, session: str, preset: str, prompt: str, settings: Settings,
                history: list[dict[str, Any]] | None) -> Iterator[Frame]:
        """The "Show me" button: ours against HLM and the matched coin on this prompt (the first example when the
        box is empty, put in the box so the viewer sees what ran), ending in `verdict`'s sentence."""
        if not prompt.strip():
            prompt = load_examples()[0]["prompt"]
            yield Frame(prompt=prompt)
        yield from self.compare(session, preset, prompt, settings, history, SHOW_ME)

    def api_generate(self, preset: str, prompt: str, settings: Settings, quality: bool) -> Iterator[dict[str, Any]]:
        _, config = self._prepare(preset, prompt, settings)
        run = self._new_run(preset, run_label(config), config)
        for _ in self.service.run(preset, prompt, run, Job(), quality=quality):
            yield run.payload()

    def api_compare(self, preset: str, prompt: str, settings: Settings) -> Iterator[dict[str, Any]]:
        _, base = self._prepare(preset, prompt, settings)
        for runs, _ in self._compare(preset, prompt, base, Job()):
            yield {"runs": [r.payload(tokens=False) for r in runs]}
