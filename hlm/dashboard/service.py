"""What every session of the app shares: the loaded model pairs (one decode at a time: the models and the verifier's
KV cache are shared), the threaded streamer, the LLM-only references (kept in memory, greedy ones also on disk, the
page's examples built in the background), the finished runs a comparison shows again, the quality scorer and the
running requests.

Why the model thread: every load, decode and score runs on one long-lived thread (`hlm.worker`: a second thread
running torch kernels slows them all); a decode there fills a queue, and the page's generator drains it and renders
on the first token, then at most every `INTERVAL_S` seconds, so rendering never blocks decoding and the page
updates ~2.5 times a second whatever the token rate. The service hands out events; it writes no view state."""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from hlm import prefix
from hlm.config import LinkConfig, RunConfig, SamplingConfig
from hlm.dashboard.references import Store, answer_events
from hlm.dashboard.settings import REFERENCE_SAMPLES, Settings, load_examples
from hlm.decoder import HybridDecoder
from hlm.events import PendingDraft, TokenEvent
from hlm.experiments.quality import get_scorer
from hlm.memory import return_large_buffers
from hlm.models.embedded import cache_dir
from hlm.models.pairs import ModelError
from hlm.models.presets import PRESETS
from hlm.policies import with_role
from hlm.session import open_decoder
from hlm.worker import ModelThread

T = TypeVar("T")
LOG = logging.getLogger(__name__)

INTERVAL_S = 0.4  # page refresh period while streaming (>= 2 per second, as the issue asks)

REFERENCE_CACHE = 32  # LLM-only outputs kept per process, keyed by (pair, prompt, sampling settings)
REFERENCE_STORE = "references"  # the folder of stored greedy answers in the user cache (`references.Store`)
# finished runs kept per process for Compare and Show me to show again (`Service.finished`): the start-up build's
# (`Dashboard.prepare_examples`: 4 of each of the 6 examples) and as many of the viewers'
RUN_CACHE = 64

STOP_WAIT_S = 5.0  # how long Stop waits for the running decode to finish its current token

@dataclass
class Request:
    """A session's running request, so Stop can reach it."""

    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


_END = object()


@dataclass(frozen=True)
class Finished:
    """A finished run that a comparison shows again instead of decoding it: the same pair, prompt and settings
    decode the same tokens (greedy; sampled, with the same seed), so a second decode would only cost the viewer its
    time. Its time and energy are the ones measured when it ran."""

    events: tuple[TokenEvent, ...]
    call_s: float | None  # `HybridDecoder.call_s` when it began (`RunView.known_call_s`)
    ended: str  # the wall-clock time it ended (HH:MM:SS), which the page shows beside it


@dataclass(frozen=True)
class _Note:
    text: str


class Service:
    """The loaded model pairs (one decode at a time), the LLM-only references, the quality scorer and the sessions'
    running requests. Shared by every session of the app. `store` keeps greedy references across restarts."""

    def __init__(self, load: Callable[[str], HybridDecoder], start: str, presets: Sequence[str],
                 cloud: str | None = None, store: Store | None = None) -> None:
        self._load, self.start, self.presets, self.cloud, self.store = load, start, list(presets), cloud, store
        self.models = ModelThread()  # every load, decode and score runs there, one at a time (`hlm.worker`)
        self._decoders: dict[str, HybridDecoder] = {}
        # An entry's link is None when its events carry no costs (its ids read from the store)
        self._references: OrderedDict[tuple, tuple[LinkConfig | None, list[TokenEvent]]] = OrderedDict()
        self._runs: OrderedDict[tuple, Finished] = OrderedDict()  # (pair, prompt, RunConfig) -> its finished run
        self._kept = threading.Lock()  # sessions and the background build read and write `_references`, `_runs`
        self._requests: dict[str, Request] = {}
        # Requests and decodes under way: background work waits until there are none, and each new one stops it
        self._busy, self._idle, self._background = 0, threading.Condition(), threading.Event()
        # The prompts whose greedy reference `build_references` found or made (their first run scores at once), and
        # the background build while it runs: `/status` says whether a page's example is scored from the cache
        self.prepared: list[str] = []
        self._build: threading.Thread | None = None
        # The scorer loads before the models: its model registers with transformers, and a compiled draft step
        # (`--quant compiled`) guards on that registry, so a step compiled before it would compile again (and the
        # process keep both graphs).
        self.models.call(get_scorer)
        self.decoder(start)  # models load once, at start-up

    @classmethod
    def open(cls, models: str, device: str | None = None, dtype: str | None = None, quant: str = "auto",
             cloud: str | None = None, emulate_link: bool = False) -> Service:
        """The app's flags as plain values, through `hlm.session`; `emulate_link` (with `cloud`) delays uploads by
        the modelled time."""
        def load(preset: str) -> HybridDecoder:
            return open_decoder(preset, device, dtype, quant, cloud, LinkConfig() if emulate_link else None)

        return_large_buffers()  # the app serves for hours: freed large buffers leave the process (before any load)
        return cls(load, models, loadable_presets(models, bool(cloud)), cloud,
                   Store(cache_dir() / REFERENCE_STORE))

    def decoder(self, preset: str) -> HybridDecoder:
        if preset not in self.presets:
            raise ModelError(f"model pair {preset!r} is not offered here; choose one of {', '.join(self.presets)}")
        def load() -> None:  # on the model thread, so a load never races a decode for memory
            if preset not in self._decoders:
                self._decoders[preset] = self._load(preset)

        if preset not in self._decoders:
            self.models.call(load)
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
        return self.models.call(lambda: get_scorer().f1(candidates, references))

    @property
    def quality_method(self) -> str:
        return self.models.call(lambda: get_scorer().method)

    def stream(self, decoder: HybridDecoder, prompt: str, config: RunConfig, cancel: threading.Event,
               note: Callable[[str], None] | None = None,
               pending: Callable[[PendingDraft], None] | None = None) -> Iterator[list[TokenEvent]]:
        """Decode on the model thread; yield the growing event list on the first token, then at most every
        INTERVAL_S, and once at the end. `note` hears what a long prefill is doing, `pending` each draft on its
        way to the cloud; they are drawn on the same clock as the tokens (a frame per upload would flood the page
        with redraws on a fast cloud). Closing the iterator early cancels the decode."""
        decoder.pair.encode_prompt(prompt, config.sampling.max_new_tokens)  # bad prompts fail here, at once

        def work(put: Callable[[object], None]) -> None:
            def progress(who: str, done: int, total: int) -> None:
                if total <= prefix.CHUNK:  # read in one pass, in well under a second: a frame to say so costs more
                    return
                put(_Note(f"reading the prompt: {done / total:.0%} of {total:,} tokens" if who == "device" else
                          f"the cloud is reading the prompt ({total:,} tokens)…"))

            for event in decoder.generate(prompt, config, cancel, progress=progress, drafts=True):
                put(event)

        return self._drain(work, cancel, note, pending)

    def _drain(self, work: Callable[[Callable[[object], None]], None], cancel: threading.Event,
               note: Callable[[str], None] | None = None,
               pending: Callable[[PendingDraft], None] | None = None) -> Iterator[list[TokenEvent]]:
        """Run `work(put)` on the model thread, after what is queued there (background work stops at once: `_hold`),
        and stream what it puts as `stream` describes."""
        inbox: queue.SimpleQueue = queue.SimpleQueue()

        def run() -> None:
            try:
                work(inbox.put)
            except Exception as exc:  # noqa: BLE001 - handed to the request, which re-raises it
                inbox.put(exc)
            finally:
                self._hold(-1)
            inbox.put(_END)

        self._hold(1)
        self.models.submit(run)
        events: list[TokenEvent] = []
        unshown, due, finished = False, 0.0, False  # unshown: something arrived that the page has not drawn yet
        try:
            while True:
                try:
                    item = inbox.get(timeout=max(0.0, due - time.monotonic()) if unshown else None)
                except queue.Empty:
                    item = None
                if item is _END:
                    finished = True
                    yield events
                    return
                if isinstance(item, Exception):
                    finished = True
                    raise item
                first = False  # the first token is drawn at once, the rest on the clock
                if isinstance(item, _Note | PendingDraft):
                    listener = note if isinstance(item, _Note) else pending
                    if listener is not None:
                        listener(item.text if isinstance(item, _Note) else item)
                        unshown = True
                elif item is not None:
                    events.append(item)
                    unshown, first = True, len(events) == 1
                if unshown and (first or time.monotonic() >= due):
                    unshown, due = False, time.monotonic() + INTERVAL_S
                    yield events
        finally:
            if not finished:
                cancel.set()

    def reference(self, preset: str, prompt: str, config: RunConfig, cancel: threading.Event,
                  same_link: bool = False) -> Iterator[list[TokenEvent]]:
        """The LLM-only run for this prompt and sampling settings, from the cache (memory, then the store) or
        decoded as the `llm` policy's run (streamed), the answer HLM reproduces token for token. `same_link` wants a
        run with its figures priced with `config.link` (Compare shows it as a run): a stored answer, which has
        none, is then decoded again."""
        cached = self._cached(preset, prompt, config.sampling)
        if cached and (not same_link or cached[0] == config.link):
            yield cached[1]
            return
        llm = config.with_policy(name=with_role("reference"))
        answer: list[TokenEvent] = []
        for answer in self.stream(self.decoder(preset), prompt, llm, cancel):
            yield answer
        if not cancel.is_set():
            self._keep(preset, prompt, config.sampling, config.link, answer)

    def priced(self, preset: str, prompt: str, config: RunConfig) -> bool:
        """Whether `reference` without `same_link` gives a run priced with `config.link`: a cached one that is, or
        one it will decode."""
        cached = self._cached(preset, prompt, config.sampling)
        return cached is None or cached[0] == config.link

    def references(self, preset: str, prompt: str, config: RunConfig, cancel: threading.Event,
                   same_link: bool = False) -> Iterator[tuple[int, list[TokenEvent]]]:
        """What a run is scored against: the LLM's answer at greedy, else REFERENCE_SAMPLES LLM samples (seeds
        seed, seed + 1, ...), each cached or generated; `same_link`: the first as `reference` gives it with that
        flag (a run with its figures). Yields (which sample, its events so far)."""
        n = 1 if config.sampling.temperature == 0 else REFERENCE_SAMPLES
        for i in range(n):
            sampling = replace(config.sampling, seed=config.sampling.seed + i)
            for events in self.reference(preset, prompt, replace(config, sampling=sampling), cancel,
                                         same_link and i == 0):
                yield i, events
            if cancel.is_set():
                return

    def has_answer(self, preset: str, prompt: str, sampling: SamplingConfig) -> bool:
        """Whether `reference` gives this answer without decoding (in memory, or greedy in the store)."""
        return self._cached(preset, prompt, sampling) is not None

    def remember_answer(self, preset: str, prompt: str, sampling: SamplingConfig, ids: list[int]) -> None:
        """The LLM's greedy answer, known without its own run (HLM's tokens: `Dashboard._answer_from_hlm`): kept and
        stored as a stored answer is, without figures."""
        pair = self.decoder(preset).pair
        events = answer_events(pair, len(pair.encode_prompt(prompt, sampling.max_new_tokens)), sampling, ids)
        self._keep(preset, prompt, sampling, None, events)

    def remember_reference(self, preset: str, prompt: str, config: RunConfig, events: list[TokenEvent]) -> None:
        """A finished plain `llm` run (Generate with the LLM alone): the reference, with its figures."""
        self._keep(preset, prompt, config.sampling, config.link, events)

    def keep_run(self, preset: str, prompt: str, config: RunConfig, events: list[TokenEvent],
                 call_s: float | None) -> None:
        """A run that decoded to its end (not stopped), for `finished`."""
        key = (preset, prompt, config)
        with self._kept:
            self._runs[key] = Finished(tuple(events), call_s, time.strftime("%H:%M:%S"))
            self._runs.move_to_end(key)
            while len(self._runs) > RUN_CACHE:
                self._runs.popitem(last=False)

    def finished(self, preset: str, prompt: str, config: RunConfig) -> Finished | None:
        """The kept run of this pair, prompt and settings (any session's), if there is one."""
        with self._kept:
            return self._runs.get((preset, prompt, config))

    def _cached(self, preset: str, prompt: str, sampling: SamplingConfig
                ) -> tuple[LinkConfig | None, list[TokenEvent]] | None:
        """The reference in memory, else (greedy) the store's answer, kept in memory from then on."""
        key = _key(preset, prompt, sampling)
        with self._kept:
            if key in self._references:
                self._references.move_to_end(key)
                return self._references[key]
        if self.store is None or sampling.temperature != 0:
            return None
        pair = self.decoder(preset).pair
        ids = self.store.load(Store.key(pair, preset, prompt, sampling), pair.vocab_size)
        if ids is None:
            return None
        events = answer_events(pair, len(pair.encode_prompt(prompt, sampling.max_new_tokens)), sampling, ids)
        self._keep(preset, prompt, sampling, None, events, store=False)
        return None, events

    def _keep(self, preset: str, prompt: str, sampling: SamplingConfig, link: LinkConfig | None,
              events: list[TokenEvent], store: bool = True) -> None:
        """Keep a reference in memory (`link`: None when its events carry no costs) and, greedy, in the store."""
        key = _key(preset, prompt, sampling)
        with self._kept:
            self._references[key] = (link, list(events))
            self._references.move_to_end(key)
            while len(self._references) > REFERENCE_CACHE:
                self._references.popitem(last=False)
        if store and self.store is not None and sampling.temperature == 0 and events:
            pair = self.decoder(preset).pair
            self.store.save(Store.key(pair, preset, prompt, sampling), [e.token_id for e in events])

    def precompute(self, prompts: Sequence[str] | None = None, config: RunConfig | None = None,
                   measured: bool = False, then: Callable[[], None] | None = None) -> threading.Thread:
        """`build_references`, then `then` (the app: the examples' compared runs, `Dashboard.prepare_examples`), on a
        background thread: the page is served meanwhile, and a viewer's run comes first (`when_idle`)."""
        def build() -> None:
            try:
                self.build_references(prompts, config, measured)
                if then is not None:
                    then()
            except Exception:  # noqa: BLE001 - a failed build only costs the decode later: the log says why
                LOG.exception("the start-up build of the examples failed")

        thread = self._build = threading.Thread(target=build, name="hlm-references", daemon=True)
        thread.start()
        return thread

    def build_references(self, prompts: Sequence[str] | None = None, config: RunConfig | None = None,
                         measured: bool = False) -> list[str]:
        """Decode the LLM-alone references of `prompts` (default: the page's examples) with `config`'s settings
        (default: the page's) on the start-up pair, for those not cached yet; returns the prompts decoded. Each is
        a plain `llm` run with its time and energy at `config.link`, which Compare then shows without decoding it
        again; only its ids outlive the process (the store). `measured` (the app's start-up build) also decodes a
        stored answer again, for those figures; without it (`python -m hlm references`) a stored answer is enough.
        Each waits until no request runs; one that begins stops it, and it starts again once the service is idle."""
        decoder = self.decoder(self.start)
        config = config or Settings().run_config(decoder.pair.calibration)
        sampling, llm = config.sampling, config.with_policy(name=with_role("reference"))

        def wanted(prompt: str) -> bool:
            cached = self._cached(self.start, prompt, sampling)
            return cached is None or (measured and cached[0] != config.link)

        built = []
        for prompt in prompts or [e["prompt"] for e in load_examples()]:
            while wanted(prompt):
                answer = self.when_idle(functools.partial(self._build_one, prompt, llm, config))
                if answer is not None:
                    self._keep(self.start, prompt, sampling, config.link, answer)
                    built.append(prompt)
            if prompt not in self.prepared and self._cached(self.start, prompt, sampling) is not None:
                self.prepared.append(prompt)
        return built

    def when_idle(self, work: Callable[[threading.Event], T]) -> T | None:
        """Background work: `work(cancel)` on the model thread once no request runs. A request that begins sets
        `cancel` (the work stops at its next token, and the viewer's run gets the models): then None, and the caller
        asks again, if it still wants it."""
        with self._idle:
            self._idle.wait_for(lambda: not self._busy)
            cancel = self._background = threading.Event()
        result = self.models.call(functools.partial(work, cancel))
        return None if cancel.is_set() else result

    def _build_one(self, prompt: str, llm: RunConfig, page: RunConfig, cancel: threading.Event) -> list[TokenEvent]:
        """One prompt's reference for `build_references`, on the model thread."""
        decoder = self.decoder(self.start)
        events = list(decoder.generate(prompt, llm, cancel))  # the verifier has read the prompt (`hlm.prefix.read`)
        if not cancel.is_set():  # and so does the device, on the drafter a viewer's first run (`page`) drafts on
            decoder.read_prompt(prompt, page)
        return events

    def _hold(self, n: int) -> None:
        """A request or decode begins (+1: background work stops) or ends (-1)."""
        with self._idle:
            self._busy += n
            if n > 0:
                self._background.set()
            self._idle.notify_all()

    def status(self) -> dict[str, Any]:
        """What the process holds, each with its bound: an operator (or the soak script) watches these stay flat.
        Also the example prompts whose reference is ready and whether the start-up build (`precompute`: the
        references, then the app's compared runs) is still going (`page_timing.py` waits for it, so its first run
        measures the page as a visitor finds it)."""
        return {"running_requests": len(self._requests),
                "reference_cache": {"size": len(self._references), "bound": REFERENCE_CACHE},
                **({"reference_store": {"size": len(self.store.files()), "bound": self.store.limit}} if self.store
                   else {}),
                "loaded_pairs": {"size": len(self._decoders), "bound": len(self.presets)},
                "example_references_ready": list(self.prepared),
                "examples_building": self._build is not None and self._build.is_alive()}

    def begin(self, session: str) -> Request:
        request = self._requests[session] = Request()
        self._hold(1)
        return request

    def end(self, session: str, request: Request) -> None:
        request.done.set()
        if self._requests.get(session) is request:
            del self._requests[session]
        self._hold(-1)

    def stop(self, session: str) -> None:
        """Ask the session's decode to stop after its current token and wait until its request has shown the
        final state (the page then cancels whatever is still queued)."""
        request = self._requests.get(session)
        if request is not None:
            request.cancel.set()
            request.done.wait(STOP_WAIT_S)

def _key(preset: str, prompt: str, sampling: SamplingConfig) -> tuple:
    """A reference's cache key: seed and top_p do not change a greedy answer."""
    return preset, prompt, replace(sampling, seed=0, top_p=1.0) if sampling.temperature == 0 else sampling


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

