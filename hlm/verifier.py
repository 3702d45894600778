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
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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


class Verifier(Protocol):
    vocab_size: int
    held: list[int]  # the ids this verifier holds: all it has read, then its own last verdict token

    def open(self, sampling: SamplingConfig, prompt: Sequence[int] = ()) -> None: ...

    def verify(self, context: list[int], draft: int | None, payload: bytes | None) -> Verdict: ...

    def close(self) -> None: ...


class LocalVerifier:
    """The verifier model in this process, with its own KV cache."""

    def __init__(self, model: PreTrainedModel, valid: torch.Tensor, meter: EnergyMeter | None = None,
                 head: tuple[int, ...] = (), early: bool = False) -> None:
        self.model = model
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
        self._cached = 0  # how many of `held` the KV cache has read (a verdict token waits for the next pass)

    def open(self, sampling: SamplingConfig, prompt: Sequence[int] = ()) -> None:
        self.sampling, self.prompt = sampling, list(prompt)
        self.generator = torch.Generator(self.device).manual_seed(sampling.seed ^ VERIFIER_SEED_SALT)
        self.cache, self.held, self._cached, self._read = DynamicCache(), [], 0, (0.0, None)
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
            self.cache, self.held, self._cached, self._read = DynamicCache(), [], 0, (0.0, None)

    def _read_now(self, context: list[int]) -> None:
        with measure(self.device, self.meter) as window:
            self._sync(context)
        self._charge(window)

    def _charge(self, window: Window) -> None:
        """Work done outside a verify's own window, charged to the next verify."""
        s, j = self._read
        self._read = (s + window.seconds, None if window.joules is None else (j or 0.0) + window.joules)

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
            self.cache, self.last_logits, self._cached = read.cache, read.logits, n
            if read.remembered:  # charged what reading it cost, so no run's figures depend on what ran before it
                self._charge(read.cost)
        for i in range(self._cached, len(context), rows.EXACT_ROWS):
            ids = torch.tensor([context[i:i + rows.EXACT_ROWS]], device=self.device)
            out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
            self.last_logits = out.logits[0, -1]
        self.held.extend(context[len(self.held):])
        self._cached = len(context)

    def verify(self, context: list[int], draft: int | None, payload: bytes | None) -> Verdict:
        self._ready(context, "verify")
        with measure(self.device, self.meter) as window:
            self._sync(context)
            q = distribution(self.last_logits, self.sampling, self.valid)
            if draft is None:
                token, accepted, p_d, q_d = pick(q, self.sampling, self.generator), None, None, None
            else:
                p = decode(payload or b"", self.vocab_size).to(self.device)
                token, accepted = rejection_step(draft, p, q, self.generator)
                p_d, q_d = float(p[draft]), float(q[draft])
        method = self.meter.method if self.meter and window.joules is not None else None
        self.held.append(token)  # the caller commits it: the next pass reads it with the ids that follow
        (read_s, read_j), self._read = self._read, (0.0, None)  # the early prefill is this verify's work too
        joules = None if window.joules is None else window.joules + (read_j or 0.0)
        return Verdict(token, accepted, p_d, q_d, window.seconds + read_s, joules, method)

    def close(self) -> None:
        self._stop.set()
        self._join()
        self.cache, self.held, self._cached = None, [], 0
