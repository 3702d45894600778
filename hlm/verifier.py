"""The cloud side: the large model behind a small interface that a network transport can implement.

Contract (mirrors transformers' candidate generators: small and explicit):
- `open(sampling)` starts a session with its own empty KV cache and a random generator seeded from
  `sampling.seed`, so a session is reproducible wherever it runs. The prompt arrives with the first call.
- `verify(context, draft, payload)` is called with the *whole* committed context (token ids); the verifier
  processes only the ids it has not seen yet (tokens kept locally since the last upload are synchronised in
  the same forward pass), computes q at the next position and, given a draft and its encoded distribution p,
  accepts with min(1, q/p) or resamples from norm(max(0, q - p)). With `draft=None` it samples from q
  (the `llm` policy). The verifier never caches a draft, so a resample needs no rollback on this side.
- Failures to reach the verifier raise `CloudUnavailable`; the decoder then keeps the draft as `unverified`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from hlm import prefix
from hlm.config import SamplingConfig
from hlm.energy import EnergyMeter, measure, open_meter
from hlm.payload import decode
from hlm.sampling import distribution, rejection_step, sample

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

    def open(self, sampling: SamplingConfig) -> None: ...

    def verify(self, context: list[int], draft: int | None, payload: bytes | None) -> Verdict: ...

    def close(self) -> None: ...


class LocalVerifier:
    """The verifier model in this process, with its own KV cache."""

    def __init__(self, model: PreTrainedModel, valid: torch.Tensor, meter: EnergyMeter | None = None,
                 head: tuple[int, ...] = ()) -> None:
        self.model = model
        self.head = head  # the chat template's fixed head, prefilled once per model (`hlm.prefix`)
        self.device = model.device
        self.valid = valid.to(self.device)
        self.vocab_size = int(valid.shape[0])
        self.meter = meter if meter is not None else open_meter(self.device)
        self.cache: DynamicCache | None = None
        self.known: list[int] = []

    def open(self, sampling: SamplingConfig) -> None:
        self.sampling = sampling
        self.generator = torch.Generator(self.device).manual_seed(sampling.seed ^ VERIFIER_SEED_SALT)
        self.cache, self.known = DynamicCache(), []

    @torch.inference_mode()
    def _sync(self, context: list[int]) -> None:
        if not self.known:
            self.cache, held = prefix.start(self.model, context, self.head)
            self.known = list(context[:held])
        new = context[len(self.known):]
        if not new:
            return
        ids = torch.tensor([new], device=self.device)
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.last_logits = out.logits[0, -1]
        self.known.extend(new)

    def verify(self, context: list[int], draft: int | None, payload: bytes | None) -> Verdict:
        if self.cache is None:
            raise RuntimeError("verify() before open()")
        if context[: len(self.known)] != self.known:
            raise ValueError("context does not extend what the verifier has seen")
        with measure(self.device, self.meter) as window:
            self._sync(context)
            q = distribution(self.last_logits, self.sampling, self.valid)
            if draft is None:
                token, accepted, p_d, q_d = sample(q, self.generator), None, None, None
            else:
                p = decode(payload or b"", self.vocab_size).to(self.device)
                token, accepted = rejection_step(draft, p, q, self.generator)
                p_d, q_d = float(p[draft]), float(q[draft])
        method = self.meter.method if self.meter and window.joules is not None else None
        return Verdict(token, accepted, p_d, q_d, window.seconds, window.joules, method)

    def close(self) -> None:
        self.cache, self.known = None, []
