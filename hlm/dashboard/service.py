"""What every session of the app shares: the loaded model pairs (one decode at a time: the models and the verifier's
KV cache are shared), the threaded streamer, the LLM-only reference cache, the quality scorer and the running requests.

Why a worker thread: the decoder runs on its own thread and fills a queue; the page's generator drains it and
renders on the first token, then at most every `INTERVAL_S` seconds, so rendering never blocks decoding and the
page updates ~2.5 times a second whatever the token rate. The service hands out events; it writes no view state."""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hlm.config import LinkConfig, RunConfig
from hlm.dashboard.settings import REFERENCE_SAMPLES, Settings
from hlm.decoder import HybridDecoder
from hlm.events import PendingDraft, TokenEvent
from hlm.experiments.quality import get_scorer
from hlm.models.pairs import ModelError
from hlm.models.presets import PRESETS
from hlm.policies import with_role
from hlm.session import open_decoder

INTERVAL_S = 0.4  # page refresh period while streaming (>= 2 per second, as the issue asks)

REFERENCE_CACHE = 32  # LLM-only outputs kept per process, keyed by (pair, prompt, sampling settings)

STOP_WAIT_S = 5.0  # how long Stop waits for the running decode to finish its current token

@dataclass
class Request:
    """A session's running request, so Stop can reach it."""

    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


_END = object()


@dataclass(frozen=True)
class _Note:
    text: str


class Service:
    """The loaded model pairs (one decode at a time), the LLM-only reference cache, the quality scorer and the
    sessions' running requests. Shared by every session of the app."""

    def __init__(self, load: Callable[[str], HybridDecoder], start: str, presets: Sequence[str],
                 cloud: str | None = None) -> None:
        self._load, self.start, self.presets, self.cloud = load, start, list(presets), cloud
        self.lock = threading.Lock()
        self._decoders: dict[str, HybridDecoder] = {}
        self._references: OrderedDict[tuple, tuple[LinkConfig, list[TokenEvent]]] = OrderedDict()
        self._requests: dict[str, Request] = {}
        self._scorer_lock = threading.Lock()
        self.decoder(start)  # models load once, at start-up

    @classmethod
    def open(cls, models: str, device: str | None = None, dtype: str | None = None, quant: str = "auto",
             cloud: str | None = None, emulate_link: bool = False) -> Service:
        """The app's flags as plain values, through `hlm.session`; `emulate_link` (with `cloud`) delays uploads by
        the modelled time."""
        def load(preset: str) -> HybridDecoder:
            return open_decoder(preset, device, dtype, quant, cloud, LinkConfig() if emulate_link else None)

        return cls(load, models, loadable_presets(models, bool(cloud)), cloud)

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
        for role in ("subject", "reference"):  # the drafting path with every statistic, and the LLM alone
            config = Settings(policy=with_role(role), max_new_tokens=2).run_config(decoder.pair.calibration)
            for _ in self.stream(decoder, "Hello", config, threading.Event()):
                pass
        self.score(["warm up"], ["warm up"])

    def score(self, candidates: list[str], references: list[str]) -> list[float]:
        with self._scorer_lock:
            return get_scorer().f1(candidates, references)

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
        llm = config.with_policy(name=with_role("reference"))
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

    def status(self) -> dict[str, Any]:
        """What the process holds, each with its bound: an operator (or the soak script) watches these stay flat."""
        return {"running_requests": len(self._requests),
                "reference_cache": {"size": len(self._references), "bound": REFERENCE_CACHE},
                "loaded_pairs": {"size": len(self._decoders), "bound": len(self.presets)}}

    def begin(self, session: str) -> Request:
        request = self._requests[session] = Request()
        return request

    def end(self, session: str, request: Request) -> None:
        request.done.set()
        if self._requests.get(session) is request:
            del self._requests[session]

    def stop(self, session: str) -> None:
        """Ask the session's decode to stop after its current token and wait until its request has shown the
        final state (the page then cancels whatever is still queued)."""
        request = self._requests.get(session)
        if request is not None:
            request.cancel.set()
            request.done.wait(STOP_WAIT_S)

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

