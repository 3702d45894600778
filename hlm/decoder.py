"""The hybrid decoding loop (METHOD.md), yielding one `TokenEvent` per emitted token; its steps are numbered as
in docs/loop.md.

Per step: the SLM drafts d ~ p from its KV cache; u and the draft's other statistics come from the same logits
and attention weights (`hlm.features`); `ours` scores them with its estimator (`hlm.estimators`; the
paper-literal ones wait for the SLM's pass over d, or over the next draft, for their attention row). The policy
then decides: keep d locally, or upload (d, p) with the ids kept locally since the last upload; the verifier
accepts with min(1, q/p) or resamples from norm(max(0, q - p)). On a resample the SLM's cache rolls back to the
corrected prefix (the verifier never caches drafts). `HybridDecoder._hybrid` is that loop, step by step; a
`Generation` holds one generation's device side (drafter, random streams, pending drafts).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import re
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hlm import prefix
from hlm.config import DeviceProfile, LinkConfig, RunConfig, SamplingConfig
from hlm.drafter import Attentions, Drafter
from hlm.energy import EnergyMeter, Window, measure, open_meter
from hlm.estimators import MIN_P, DraftStats
from hlm.estimators import REGISTRY as ESTIMATORS
from hlm.events import PendingDraft, Source, Spend, TokenEvent
from hlm.features import draft_stats, prev_attention
from hlm.importance import Importance, attention_row, row_layers, score
from hlm.link import UploadCost, upload_bits, upload_cost
from hlm.metrics import is_one_token_call, summarize
from hlm.models.pairs import ModelPair
from hlm.payload import as_sent
from hlm.policies import REGISTRY as POLICIES
from hlm.policies import decide
from hlm.sampling import distribution, pick
from hlm.uncertainty import Uncertainty, uncertainty
from hlm.verifier import CloudUnavailable, LocalVerifier, Verdict, Verifier

if TYPE_CHECKING:
    from hlm.llamacpp import LlamaCppDrafter

NO_UPLOAD = UploadCost(0, 0, 0.0, 0.0, 0.0, 0.0)
Progress = Callable[[str, int, int], None]  # (who: "device" or "cloud", prompt tokens read, prompt tokens)
DrafterFactory = Callable[[PreTrainedModel, tuple[int, ...]], Drafter]  # (SLM, chat template head): a fresh drafter


@dataclass
class Draft:
    token: int
    p: torch.Tensor
    u: float | None
    position: int
    logits: torch.Tensor  # the SLM's logits that drafted it
    stats: DraftStats | None = None  # for `ours`: what its estimator scores
    passes: int = 0  # SLM passes over this draft and later ones; the paper rows exist after estimator.passes
    importance: Importance | None = None
    score: float | None = None  # the estimator's score and the threshold it was held against
    threshold: float | None = None
    payload: bytes | None = None  # the upload built before drafting: token was sampled from its decoded form


def ends(sampling: SamplingConfig, index: int, token: int, stop_ids: Collection[int]) -> bool:
    """Whether the run's `index`-th token is its last: the token limit, or a stop id where the run stops at EOS."""
    return index == sampling.max_new_tokens - 1 or (sampling.stop_at_eos and token in stop_ids)


class TextStream:
    """Incremental detokenisation (the prefix/read-offset scheme of TGI): each token's text is what it adds,
    holding back incomplete UTF-8 sequences, so the texts of all events concatenate to the decoded output."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, token: int, last: bool = False) -> str:
        """Text this token adds; `last` flushes whatever is held back (an incomplete sequence stays as U+FFFD)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if last or (len(after) > len(before) and not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class HybridDecoder:
    def __init__(self, pair: ModelPair, verifier: Verifier | None = None,
                 drafter_factory: DrafterFactory | None = None) -> None:
        self.pair = pair
        # One drafter (KV cache) per generation: the pair's (`ModelPair.new_drafter`); tests inject checking ones.
        self.drafter_factory = drafter_factory
        if verifier is None:
            # In process the cloud shares the device's cores, so it reads the prompt when first asked: reading it
            # early on a thread of its own delays the first draft and gains nothing in tok/s (docs/speed.md, measured).
            # Over HTTP it reads early.
            # It remembers its last passes on a prompt, so a page's Compare serves again the passes one run made
            # before another (`hlm.verifier.Track`).
            verifier = LocalVerifier(pair.verifier, pair.valid, head=pair.template_head, remember=True)
        self.verifier = verifier
        self.device = pair.draft.device
        self.meter = open_meter(self.device)
        self.one_token_calls: deque[float] = deque(maxlen=64)  # recent cloud times of one-new-token verifies

    @property
    def call_s(self) -> float | None:
        """Median cloud time of a one-token verify seen by this decoder: prices the HLM counterfactual of runs
        that made no such call themselves (`hlm.metrics.hlm_call_time`)."""
        return statistics.median(self.one_token_calls) if self.one_token_calls else None

    def energy_methods(self, link: LinkConfig, device: DeviceProfile | None = None) -> dict[str, str]:
        """How each energy part is obtained, for the summary and the hardware panel (default: this machine)."""
        cloud = getattr(self.verifier, "meter", None)
        if device is not None and device.modelled:
            compute = (f"modelled: {device.name} ({device.source}): {device.slm_energy_per_token_j:g} J and "
                       f"{device.slm_time_per_token_s * 1e3:.1f} ms per drafted token")
        else:
            compute = self.meter.method if self.meter else \
                f"modelled: {link.device_compute_power_w} W x measured SLM compute time on {self.device.type}"
        return {
            "device_compute": compute,
            "radio": f"modelled: {link.tx_power_w} W x upload bits / (W log2(1+SNR)) "
                     f"= {link.uplink_rate_bps / 1e6:.1f} Mbit/s",
            "device_idle": f"modelled: {link.device_idle_power_w} W x (measured cloud compute + downlink + RTT)",
            "cloud": cloud.method if cloud else f"modelled: {link.cloud_power_w} W x measured verifier compute time",
        }

    def read_prompt(self, prompt: str, config: RunConfig) -> None:
        """The device reads `prompt` now, on the drafter a run of `config` takes (both kinds keep the read:
        `hlm.prefix.read`, `hlm.llamacpp.LlamaDraft`), so that a later run of it drafts at once: what a server does
        while it is idle."""
        ids = self.pair.encode_prompt(prompt, config.sampling.max_new_tokens)
        self._drafter(read_layers(self.pair, config), len(ids)).prefill(ids)

    def run(self, prompt: str, config: RunConfig, stop: str | None = None,
            **kwargs: Any) -> tuple[str, list[TokenEvent], dict]:
        """Generate to the end, or with `stop` (a regular expression) to the token with which the text first matches
        it (a benchmark's answer ends at its closed code block: what follows costs tokens and changes no verdict);
        (text, events, summary dict) as the CLI's --json prints them."""
        events, text = [], ""
        with contextlib.closing(self.generate(prompt, config, **kwargs)) as stream:
            for e in stream:
                events.append(e)
                text += e.text
                if stop is not None and re.search(stop, text):
                    break
        summary = summarize(events, config, self.pair.vocab_size, self.energy_methods(config.link, config.device),
                            self.call_s)
        return text, events, summary.to_dict()

    @overload
    def generate(self, prompt: str, config: RunConfig, cancel: threading.Event | None = None,
                 diagnostics: bool = False, progress: Progress | None = None,
                 drafts: Literal[False] = False) -> Iterator[TokenEvent]: ...

    @overload
    def generate(self, prompt: str, config: RunConfig, cancel: threading.Event | None = None,
                 diagnostics: bool = False, progress: Progress | None = None,
                 drafts: bool = True) -> Iterator[TokenEvent | PendingDraft]: ...

    def generate(self, prompt: str, config: RunConfig, cancel: threading.Event | None = None,
                 diagnostics: bool = False, progress: Progress | None = None,
                 drafts: bool = False) -> Iterator[TokenEvent | PendingDraft]:
        """Yield events as tokens are decided. `cancel` stops within one model layer (a long prefill included);
        `diagnostics` computes u for every draft whatever the policy (calibration needs u under `hlm`);
        `progress(who, done, total)` reports the prompt's prefill: the device's chunks, then the cloud's start;
        `drafts` also yields a `PendingDraft` before each upload, so a view shows it before the cloud answers."""
        s, pol = config.sampling, config.policy
        prompt_ids = self.pair.encode_prompt(prompt, s.max_new_tokens)  # validates before any model work
        self.verifier.open(s, prompt_ids)  # the cloud may start reading the prompt now (`hlm.verifier`)
        try:
            events = self._hybrid(prompt_ids, config, cancel, diagnostics, progress) if POLICIES[pol.name].drafts \
                else self._cloud_only(prompt_ids, config, cancel, progress)
            while True:
                with prefix.stopping(cancel):  # only while the decoder runs, not while the consumer does
                    try:
                        e = next(events)
                    except (StopIteration, prefix.Cancelled):
                        return
                if isinstance(e, PendingDraft):
                    if drafts:
                        yield e
                    continue
                if is_one_token_call(e):
                    self.one_token_calls.append(e.verify_s)
                yield e
        finally:
            self.verifier.close()

    def _drafter(self, layers: Collection[int], capacity: int) -> Drafter | LlamaCppDrafter:
        if self.drafter_factory is not None:
            return self.drafter_factory(self.pair.draft, self.pair.template_head)
        return self.pair.new_drafter(layers, capacity)

    def _hybrid(self, prompt_ids: list[int], config: RunConfig, cancel: threading.Event | None,
                diagnostics: bool, progress: Progress | None) -> Iterator[TokenEvent | PendingDraft]:
        """The loop (docs/loop.md): draft, decide, verify, advance; a `PendingDraft` before each upload and a
        `TokenEvent` per position. `Generation` holds the device side; the verifier's side is `held`."""
        s, link = config.sampling, config.link
        t0 = time.perf_counter()
        gen = Generation(self.pair, config, self._drafter, prompt_ids, diagnostics)
        text, held = TextStream(self.pair.tokenizer), 0  # held: how many context ids the verifier holds
        # A modelled device (a phone profile) is charged its published figures per drafted token (`_spend`): reading
        # this machine's energy counter around every step would be work thrown away.
        meter = None if config.device.modelled else self.meter
        spent = Window(0.0, 0.0 if meter else None)  # device compute since the last emitted token
        with measure(self.device, meter) as w:
            gen.prefill(progress and functools.partial(progress, "device"), meter)
        _add(spent, w)
        if gen.drafter.remembered is not None:  # a prompt read before is charged what it cost then (`hlm.prefix.read`)
            _add(spent, gen.drafter.remembered)
            t0 -= gen.drafter.remembered.seconds  # and so is the clock: wall_s counts work served at its cost
        for index in range(s.max_new_tokens):
            if cancel is not None and cancel.is_set():
                return
            # 1.-3. Draft, with its uncertainty and selection score, until the oldest draft can be decided.
            while not gen.ready:
                with measure(self.device, meter) as w:
                    gen.draft()
                _add(spent, w)

            # 4. Policy: upload or keep.
            d = gen.pending.pop(0)
            verdict, source, bits_up, n_sync = None, "local", 0, 0
            if decide(config.policy, d, gen.coin(), self.pair.selection):
                # 5. Verify: the ids kept since the last upload travel with the draft.
                n_sync = len(gen.context) - held
                bits_up = upload_bits(link, self.pair.vocab_size, n_sync)
                if progress and not held:
                    progress("cloud", 0, len(gen.context))
                yield PendingDraft(index, d.token, self.pair.tokenizer.decode([d.token], skip_special_tokens=True))
                verdict, source = self._verify(gen.context, d)
                if verdict is not None:
                    held = len(gen.context) + 1  # the verifier holds its own verdict token
                    t0 -= verdict.served_s
            token = verdict.token if verdict else d.token
            gen.context.append(token)

            # 6. Advance the SLM over the emitted token; on a resample drop d and the drafts made after it.
            with measure(self.device, meter) as w:
                gen.advance(d, token, resampled=source == "cloud_resampled")
            last = ends(s, index, token, self.pair.stop_ids)
            cost = _cost(link, bits_up, verdict)
            yield TokenEvent.of(index=index, position=len(gen.context) - 1, text=text.push(token, last),
                                source=source, draft=d, verdict=verdict, cost=cost, synced_ids=n_sync,
                                spend=self._spend(spent, True, verdict, cost, config),
                                wall_s=time.perf_counter() - t0)
            spent = w
            if last:
                return

    def _verify(self, context: list[int], d: Draft) -> tuple[Verdict | None, Source]:
        """The verifier's verdict on `d` after `context`; None, and `d` kept unverified, when the cloud is out of
        reach."""
        try:
            verdict = self.verifier.verify(context, d.token, d.payload)
        except CloudUnavailable:
            return None, "unverified"
        return verdict, "cloud_accepted" if verdict.accepted else "cloud_resampled"

    def _cloud_only(self, prompt_ids: list[int], config: RunConfig, cancel: threading.Event | None,
                    progress: Progress | None) -> Iterator[TokenEvent]:
        """The `llm` reference: the verifier generates alone; the device only sends the prompt and waits."""
        s, link = config.sampling, config.link
        t0 = time.perf_counter()
        text = TextStream(self.pair.tokenizer)
        context, held = list(prompt_ids), 0  # held: how many context ids the verifier holds
        for index in range(s.max_new_tokens):
            if cancel is not None and cancel.is_set():
                return
            n_sync = len(context) - held
            if progress and not held:
                progress("cloud", 0, len(context))
            verdict = self.verifier.verify(context, None, None)
            held, t0 = len(context) + 1, t0 - verdict.served_s
            context.append(verdict.token)
            bits_up = upload_bits(link, self.pair.vocab_size, n_sync, with_distribution=False)
            last = ends(s, index, verdict.token, self.pair.stop_ids)
            cost = _cost(link, bits_up, verdict)
            yield TokenEvent.of(index=index, position=len(context) - 1, text=text.push(verdict.token, last),
                                source="cloud_sampled", draft=None, verdict=verdict, cost=cost, synced_ids=n_sync,
                                spend=self._spend(Window(0.0, None), False, verdict, cost, config),
                                wall_s=time.perf_counter() - t0)
            if last:
                return

    def _spend(self, spent: Window, drafted: bool, verdict: Verdict | None, cost: UploadCost,
               config: RunConfig) -> Spend:
        """Device compute time and the joules of each energy part, measured where a meter could, else modelled."""
        device, link = config.device, config.link
        if drafted and device.modelled:  # a drafted token costs what the profile's device spends on one
            compute_s, compute_j, measured = device.slm_time_per_token_s, device.slm_energy_per_token_j, False
        else:
            measured = spent.joules is not None
            compute_s = spent.seconds
            compute_j = spent.joules if measured else link.device_compute_power_w * spent.seconds
        cloud_measured = verdict is not None and verdict.energy_j is not None
        cloud_j = verdict.energy_j if cloud_measured else link.cloud_power_w * (verdict.compute_s if verdict else 0.0)
        return Spend(compute_s,
                     {"device_compute": compute_j, "radio": cost.radio_j, "device_idle": cost.idle_j,
                      "cloud": cloud_j},
                     {"device_compute": "measured" if measured else "modelled", "radio": "modelled",
                      "device_idle": "modelled", "cloud": "measured" if cloud_measured else "modelled"})


def read_layers(pair: ModelPair, config: RunConfig) -> frozenset[int]:
    """The layers whose attention weights a run's estimator reads: its passes compute weights on these alone."""
    pol = config.policy
    attention = ESTIMATORS[pol.estimator].attention if POLICIES[pol.name].uses_estimator else ""
    if attention == "heads":
        return pair.head_layers
    if attention == "rows":
        return frozenset(row_layers(pair.draft.config.num_hidden_layers, pol.last_layers))
    return frozenset()


class Generation:
    """One generation's device side: the SLM's drafter (its KV cache), the random streams, the context emitted so
    far, the drafts awaiting a decision, and what the next draft reads (the logits and attention weights of the
    SLM's last pass)."""

    def __init__(self, pair: ModelPair, config: RunConfig,
                 drafter: Callable[[Collection[int], int], Drafter | LlamaCppDrafter],
                 prompt_ids: list[int], diagnostics: bool) -> None:
        s, pol = config.sampling, config.policy
        self.config, self.device = config, pair.draft.device
        self.policy = POLICIES[pol.name]
        est = self.estimator = ESTIMATORS[pol.estimator] if self.policy.uses_estimator else None
        self.passes = est.passes if est else 0
        self.wants_hidden = bool(est and est.hidden)
        self.needs_u = diagnostics or self.policy.uses_uncertainty  # calibration needs u whatever the policy
        self.selection, self.valid, self.embeddings = pair.selection, pair.valid, pair.embeddings
        self.heads = pair.heads
        self.layers = read_layers(pair, config)
        # (the layers it reads, the most tokens its cache will hold: the prompt, the answer, the drafts read ahead)
        self.drafter = drafter(self.layers, len(prompt_ids) + s.max_new_tokens + self.passes + 1)
        self.draft_gen, self.u_gen = (torch.Generator(self.device).manual_seed(s.seed + i) for i in range(2))
        self.coin_gen = torch.Generator(self.device).manual_seed(coin_seed(s.seed, prompt_ids))
        self.context, self.prompt_len = list(prompt_ids), len(prompt_ids)
        self.pending: list[Draft] = []
        self.logits = torch.empty(0)  # the SLM's logits for the next draft (`prefill` sets them)
        self.attn: Attentions | None = None  # attention weights (`layers`) of the pass that produced `logits`
        self.hidden: torch.Tensor | None = None  # the final hidden state of that pass, where the estimator reads it
        self.p_prev: float | None = None  # the SLM's probability of the newest token in its context
        self.log_p_drafts = 0.0  # the sum of log p_draft over the drafts decided so far (`DraftStats.log_p_before`)

    def prefill(self, progress: prefix.Progress | None, meter: EnergyMeter | None) -> None:
        """The SLM reads the prompt (in chunks, `hlm.prefix`): the first draft's logits."""
        self.logits, self.attn, self.hidden = self.drafter.prefill(self.context, progress, self.wants_hidden, meter)

    @property
    def ready(self) -> bool:
        """Whether the oldest pending draft can be decided: at once, unless a paper row waits for later passes."""
        return bool(self.pending) and self.pending[0].passes >= self.passes

    def draft(self) -> None:
        """Draft one token from the SLM's last pass, with the statistics its policy reads (no extra forward pass)."""
        s, pol, link = self.config.sampling, self.config.policy, self.config.link
        # 1. Draft from what the cloud will read (exact in every payload format); slm sends nothing.
        p = distribution(self.logits, s, self.valid)
        payload, sent = as_sent(p, link.bits_per_prob, link.topk) if self.policy.uploads else (None, p)
        token = pick(sent, s, self.draft_gen)
        # 2. Uncertainty from the same logits: no extra forward pass.
        unc = uncertainty(self.logits, token, pol.n_samples, pol.theta_max, self.u_gen, self.valid) \
            if self.needs_u else None
        d = Draft(token, p, unc.u if unc else None, len(self.context) + len(self.pending), self.logits,
                  payload=payload)
        # 3. Selection score from the same logits and attention; a paper row waits for later passes.
        if self.estimator is not None:
            self._score(d, unc)
        self.pending.append(d)
        if self.passes:
            self._look_ahead(d)

    def _score(self, d: Draft, unc: Uncertainty | None) -> None:
        """The draft's statistics for its estimator, and its score and bar where they exist already."""
        est, pol = self.estimator, self.config.policy
        prev = prev_attention(self.attn, self.heads) if self.attn and est.attention == "heads" else None
        d.stats = draft_stats(self.logits, d.token, unc, self.valid, self.embeddings, prev, self.p_prev,
                              d.position - self.prompt_len, self.hidden, self.log_p_drafts)
        if not est.passes:
            d.score = est.score(d.stats, self.selection)
            d.threshold = self.selection.scale(est.name).threshold(pol.k, pol.gamma)

    def _look_ahead(self, d: Draft) -> None:
        """A paper row: the SLM reads `d` at once (drafting ahead), and each pending draft whose attention row this
        pass completes gets its importance."""
        pol = self.config.policy
        self.p_prev = d.stats.p_draft
        self.logits, self.attn, self.hidden = self.drafter.forward([d.token], self.layers, self.wants_hidden)
        row = attention_row(self.attn, pol.last_layers)
        for q in self.pending:
            q.passes += 1
            if q.passes == self.passes:
                q.importance = score(row, q.position, pol.k, pol.gamma, pol.sink_tokens)

    def coin(self) -> float:
        """The `random` control's coin ~ U(0, 1), drawn only for a policy that flips one."""
        return float(torch.rand((), generator=self.coin_gen, device=self.device)) if self.policy.uses_coin else 1.0

    def advance(self, d: Draft, token: int, resampled: bool) -> None:
        """The SLM reads the emitted `token` (already read while drafting ahead, unless resampled); a resample
        drops `d` and the drafts made after it from its cache."""
        if d.stats is not None:
            self.log_p_drafts += math.log(max(d.stats.p_draft, MIN_P))
        if resampled and self.passes:
            self.drafter.rollback(len(self.pending) + 1)
            self.pending.clear()
        if resampled or not self.passes:
            if d.stats is not None:
                self.p_prev = d.stats.p_draft if token == d.token else _probability(d.logits, token, self.valid)
            self.logits, self.attn, self.hidden = self.drafter.forward([token], self.layers, self.wants_hidden)


def _cost(link: LinkConfig, bits_up: int, verdict: Verdict | None) -> UploadCost:
    """What an upload cost the device (radio, waiting); an upload with no answer spent the radio only."""
    if not bits_up and verdict is None:
        return NO_UPLOAD
    cost = upload_cost(link, bits_up, verdict.compute_s if verdict else 0.0)
    if verdict is None:  # the upload went out but no answer came: radio spent, nothing to wait for
        return UploadCost(cost.bits_up, 0, cost.uplink_s, 0.0, cost.radio_j, 0.0)
    return cost


def coin_seed(seed: int, prompt_ids: list[int]) -> int:
    """The `random` control's coin stream, per seed *and prompt*: with the seed alone every prompt would reuse the
    same uniforms, and a coin matched to an upload rate over many prompts would miss it by the luck of one
    sequence (docs/selection.md)."""
    return int.from_bytes(hashlib.sha256(repr((seed, prompt_ids)).encode()).digest()[:7], "little")


def _probability(logits: torch.Tensor, token: int, valid: torch.Tensor) -> float:
    """The SLM's probability (temperature 1) of `token` under `logits`: a statistic of the next draft."""
    return float(torch.softmax(logits.float().masked_fill(~valid, float("-inf")), -1)[token])


def _add(total: Window, w: Window) -> None:
    total.seconds += w.seconds
    if total.joules is not None:
        total.joules += w.joules or 0.0
