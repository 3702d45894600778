"""The cloud side: the large model behind a small interface that a network transport can implement.

Contract (after transformers' candidate generators: small and explicit):
- `open(sampling, prompt)` starts a session with its own empty KV cache and a random generator seeded from
  `sampling.seed`, so a session is reproducible wherever it runs. Given the prompt's ids, the verifier may start
  reading them at once, while the device drafts (`early`); the first `verify` then waits only for the rest.
- `verify(context, draft, payload)` is called with the *whole* committed context (token ids), which extends
  what the verifier holds (`held`: the ids it has read and its own last verdict token); it processes only the
  ids it has not read yet (tokens kept locally since the last upload are synchronised in the same forward
  pass), computes q at the next position and, given a draft and its encoded distribution p,
  accepts with min(1, q/p) or resamples from norm(max(0, q - p)). With `draft=None` it samples from q
  (the `llm` policy). The verifier never caches a draft, so a resample needs no rollback on this side.
- Failures to reach the verifier raise `CloudUnavailable`; the decoder then keeps the draft as `unverified`.

In process the verifier also remembers the passes its last sessions on a prompt ran (`remember`, `Track`). The page
runs one prompt through several policies (Compare: the LLM alone, U-HLM, HLM, ours, the coin), and at greedy each of
HLM's passes, and many of the others', is one the LLM alone ran from the same rows over the same ids. Every row
computes as a one-row pass does (`hlm.rows`), so such a pass gives the same q bit for bit; it is served as computed
then and charged what it cost then (`Verdict.served_s`), as a prompt read before is (`hlm.prefix.read`).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol
from weakref import WeakKeyDictionary

import torch
from transformers import DynamicCache, PreTrainedModel

from hlm import prefix, rows
from hlm.config import SamplingConfig
from hlm.energy import EnergyMeter, Window, measure, open_meter
from hlm.payload import decode
from hlm.sampling import distribution, pick, rejection_step

VERIFIER_SEED_SALT = 0x5EED  # keeps the verifier's stream independent of the drafter's


class CloudUnavailable(RuntimeError):
    """The verifier could not be reached or did not answer in time."""


@dataclass
class Verdict:
    token: int
    accepted: bool | None  # None when there was no draft (cloud-only sampling)
    p_draft: float | None
    q_draft: float | None
    compute_s: float
    energy_j: float | None = None  # measured cloud energy, when the cloud has a counter
    energy_method: str | None = None
    wire_bytes_up: int | None = None  # bytes actually sent/received by a network transport
    wire_bytes_down: int | None = None
    served_s: float = 0.0  # of compute_s, work not done now: a pass (or a prompt read) served as computed before


# The sessions of one prompt whose passes are kept (a Compare's five runs; a new prompt drops the others), their
# caches' tokens in all (as many as `hlm.prefix` keeps prompt reads: ~115 MB for the 1.5B; a longer session is not
# kept), and the sampled passes' logits rows in all (~0.3 MB each for Qwen's vocabulary; a greedy pass keeps its token).
TRACKS = 6
TRACK_TOKENS = prefix.READ_TOKENS
LOGITS_ROWS = 128


@dataclass
class Pass:
    """One verify's pass as a session ran it, kept by the position it ended at: the rows read before it (`start`),
    the verifier's choice there (the argmax, all greedy needs; the logits row for sampling) and what it cost."""

    start: int
    argmax: int  # read at greedy only where `logits` is None (a greedy pass's, so its one-hot's argmax)
    size: int  # the distribution's length
    logits: torch.Tensor | None
    cost: Window


@dataclass
class Track:
    """A closed session: the ids it held, its KV cache over the first `cached` of them (never written again) and
    the passes it ran."""

    prompt: list[int]
    ids: list[int]
    cache: DynamicCache
    cached: int
    passes: dict[int, Pass] = field(default_factory=dict)


_TRACKS: WeakKeyDictionary[PreTrainedModel, list[Track]] = WeakKeyDictionary()
_TRACKS_LOCK = threading.Lock()


def _keep(model: PreTrainedModel, track: Track) -> None:
    """Keep `track` as the newest of its prompt's (other prompts' go), within TRACKS, TRACK_TOKENS and LOGITS_ROWS."""
    with _TRACKS_LOCK:
        tracks = [t for t in _TRACKS.get(model, []) if t.prompt == track.prompt] + [track]
        while tracks and (len(tracks) > TRACKS or sum(t.cached for t in tracks) > TRACK_TOKENS
                          or sum(p.logits is not None for t in tracks for p in t.passes.values()) > LOGITS_ROWS):
            tracks.pop(0)
        _TRACKS[model] = tracks


def _tracks(model: PreTrainedModel) -> list[Track]:
    """The model's kept tracks, newest first."""
    with _TRACKS_LOCK:
        return list(reversed(_TRACKS.get(model, [])))


class Verifier(Protocol):
    vocab_size: int
    held: list[int]  # the ids this verifier holds: all it has read, then its own last verdict token

    def open(self, sampling: SamplingConfig, prompt: Sequence[int] = ()) -> None: ...

    def verify(self, context: list[int], draft: int | None, payload: bytes | None) -> Verdict: ...

    def close(self) -> None: ...


class LocalVerifier:
    """The verifier model in this process, with its own KV cache."""

    def __init__(self, model: PreTrainedModel, valid: torch.Tensor, meter: EnergyMeter | None = None,
                 head: tuple[int, ...] = (), early: bool = False, remember: bool = False) -> None:
        self.model = model
        self.remember = remember  # serve the passes kept sessions ran (`Track`): in process, not a server's clients
        self.early = early  # prefill the prompt on a thread of its own from `open` (off in process: `HybridDecoder`)
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()
        self._read: tuple[float, float | None] = (0.0, None)  # the early prefill's s and J, for the first verify
        self.head = head  # the chat template's fixed head, prefilled once per model (`hlm.prefix`)
        self.device = model.device
        self.valid = valid.to(self.device)
        self.vocab_size = int(valid.shape[0])
        self.meter = meter if meter is not None else open_meter(self.device)
        self.cache: DynamicCache | None = None
        self.held: list[int] = []
        self.prompt: list[int] = []  # from `open`: read as every run reads it, before the kept drafts after it
        self._cached = 0  # how many of `held` have been read (a verdict token waits for the next pass)
        self._kv = 0  # how many of them the KV cache holds: fewer while passes are served from a `Track`
        self._passes: dict[int, Pass] = {}
        self._served = 0.0  # seconds charged to the next verify for work not done now

    def open(self, sampling: SamplingConfig, prompt: Sequence[int] = ()) -> None:
        self.sampling, self.prompt = sampling, list(prompt)
        self.generator = torch.Generator(self.device).manual_seed(sampling.seed ^ VERIFIER_SEED_SALT)
        self._empty()
        self._passes, self._served = {}, 0.0
        if self.early and prompt:
            self._stop = threading.Event()
            self._reader = threading.Thread(target=self._prefill, args=(list(prompt),), name="hlm-verifier-prefill",
                                            daemon=True)
            self._reader.start()

    def _prefill(self, prompt: list[int]) -> None:
        """The early prefill. Any failure leaves the session empty, and the first verify reads the prompt."""
        try:
            with prefix.stopping(self._stop):
                self._read_now(prompt)
        except Exception:  # noqa: BLE001 - Cancelled, or an error the first verify will meet again
            self._empty()

    def _empty(self) -> None:
        """A session with nothing read: the state `open` starts from and a failed early prefill returns to."""
        self.cache, self.held, self._cached, self._kv, self._read = DynamicCache(), [], 0, 0, (0.0, None)

    def _read_now(self, context: list[int]) -> None:
        with measure(self.device, self.meter) as window:
            self._sync(context)
        self._charge(window)

    def _charge(self, window: Window, served: bool = False) -> None:
        """Work done outside a verify's own window, charged to the next verify; `served`: work not done now at all
        (a pass or prompt read served as computed before), which the verdict's `served_s` counts too."""
        s, j = self._read
        self._read = (s + window.seconds, None if window.joules is None else (j or 0.0) + window.joules)
        if served:
            self._served += window.seconds

    def prefill(self, context: list[int]) -> None:
        """Read `context` now, before its first draft (the HTTP service's early start); its compute time is
        charged to the next verify."""
        self._ready(context, "prefill")
        self._read_now(context)

    def _ready(self, context: list[int], call: str) -> None:
        """Wait for an early prefill, then check that `context` extends what this session holds."""
        if self.cache is None:
            raise RuntimeError(f"{call}() before open()")
        self._join()
        if context[: len(self.held)] != self.held:
            raise ValueError("context does not extend what the verifier holds")

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join()
            self._reader = None

    @torch.inference_mode()
    def _sync(self, context: list[int]) -> None:
        """Read the ids of `context` the KV cache lacks (the last verdict token among them): the prompt as every run
        reads it, then the rest in passes of at most `rows.EXACT_ROWS`, where each row is computed as a one-token
        pass computes it (`hlm.rows`), so that greedy HLM gives the LLM alone's tokens."""
        if not self._cached:  # the prompt: in chunks, or as this process read it before (`hlm.prefix.read`)
            n = len(self.prompt) if self.prompt and context[:len(self.prompt)] == self.prompt else len(context)
            read = prefix.read(self.model, context[:n], self.head, self.meter)
            self.cache, self.last_logits, self._cached, self._kv = read.cache, read.logits, n, n
            if read.remembered:  # charged what reading it cost, so no run's figures depend on what ran before it
                self._charge(read.cost, served=True)
        if self._kv < self._cached:  # passes were served: the cache catches up from the track that ran them
            self._catch_up(context)
        for i in range(self._kv, len(context), rows.EXACT_ROWS):
            ids = torch.tensor([context[i:i + rows.EXACT_ROWS]], device=self.device)
            out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
            self.last_logits = out.logits[0, -1]
        self.held.extend(context[len(self.held):])
        self._cached = self._kv = len(context)

    def _catch_up(self, context: list[int]) -> None:
        """Bring the cache to the `_cached` rows read: a copy of a kept track's cache over the same ids, cut to
        length (a row's keys and values do not depend on the pass that computed them: `hlm.rows`). Where no track
        holds them any more, `_sync` reads them, in this verify's time."""
        n = self._cached
        track = next((t for t in _tracks(self.model) if t.cached >= n and t.ids[:n] == context[:n]), None)
        if track is not None:
            self.cache = copy.deepcopy(track.cache)
            if track.cached > n:
                self.cache.crop(-(track.cached - n))  # transformers 5.24: minus the count to drop (`hlm.drafter`)
            self._kv = n

    def _kept_pass(self, context: list[int]) -> Pass | None:
        """The pass this verify would run, as a kept session ran it: from as many rows read over the same ids, with
        what this sampling needs (and energy where this verifier has a meter)."""
        if not (self.remember and self._cached):  # a prompt read has its own memory (`hlm.prefix.read`)
            return None
        end, greedy = len(context), self.sampling.temperature == 0
        for track in _tracks(self.model):
            p = track.passes.get(end)
            if (p is not None and p.start == self._cached and (greedy or p.logits is not None)
                    and (p.cost.joules is not None or self.meter is None) and track.ids[:end] == context):
                return p
        return None

    def _q(self, context: list[int]) -> tuple[torch.Tensor, int | None]:
        """q at the next position, served from a kept pass or computed; for a computed pass to keep (with
        `remember`, after the prompt), also the rows read before it."""
        kept = self._kept_pass(context)
        if kept is not None:
            self.held.extend(context[len(self.held):])
            self._cached = len(context)
            self._charge(kept.cost, served=True)
            if kept.logits is not None:  # at greedy too: the argmax of its sampled q could break a near-tie otherwise
                return distribution(kept.logits, self.sampling, self.valid), None
            q = torch.zeros(kept.size, device=self.device)  # `distribution`'s one-hot at temperature 0
            q[kept.argmax] = 1.0
            return q, None
        start = self._cached
        self._sync(context)
        return distribution(self.last_logits, self.sampling, self.valid), start if self.remember and start else None

    def verify(self, context: list[int], draft: int | None, payload: bytes | None) -> Verdict:
        self._ready(context, "verify")
        with measure(self.device, self.meter) as window:
            q, ran_from = self._q(context)
            if draft is None:
                token, accepted, p_d, q_d = pick(q, self.sampling, self.generator), None, None, None
            else:
                p = decode(payload or b"", self.vocab_size).to(self.device)
                token, accepted = rejection_step(draft, p, q, self.generator)
                p_d, q_d = float(p[draft]), float(q[draft])
        if ran_from is not None:  # kept with this window's cost alone, not what earlier work charged to this verify
            logits = None if self.sampling.temperature == 0 else self.last_logits.clone()
            self._passes[len(context)] = Pass(ran_from, int(q.argmax()), int(q.shape[-1]), logits, window)
        method = self.meter.method if self.meter and window.joules is not None else None
        self.held.append(token)  # the caller commits it: the next pass reads it with the ids that follow
        (read_s, read_j), self._read = self._read, (0.0, None)  # the early prefill is this verify's work too
        served, self._served = self._served, 0.0
        joules = None if window.joules is None else window.joules + (read_j or 0.0)
        return Verdict(token, accepted, p_d, q_d, window.seconds + read_s, joules, method, served_s=served)

    def close(self) -> None:
        self._stop.set()
        self._join()
        if self.remember and self._passes and self.cache is not None:
            _keep(self.model, Track(self.prompt, self.held, self.cache, self._kv, self._passes))
        self.cache, self.held, self._cached, self._kv, self._passes = None, [], 0, 0, {}
