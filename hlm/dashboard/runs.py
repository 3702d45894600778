"""One run as the page keeps it (`RunView`: events, prefix summaries, scores, phase; no HTML is produced here), the
session's history of finished runs, and the what-if replay that re-decides a finished run's drafts at other knobs."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from hlm.config import RunConfig
from hlm.estimators import ScoreScale
from hlm.events import PendingDraft, TokenEvent
from hlm.link import upload_bits, upload_cost
from hlm.metrics import Summary, faithful_prefix, summarize
from hlm.policies import REGISTRY, Role, role_of, should_upload

POINTS_PER_UPDATE = 8  # prefix summaries added per refresh: the charts' resolution, bounded so refreshes stay cheap

HISTORY_LIMIT = 200  # points kept in a session's trade-off scatter

class RunView:
    """One run as the page shows it, built incrementally: its events and summaries of growing
    prefixes (the charts' points; `hlm.metrics.summarize` on the partial stream, so the live figures are
    the same numbers the CLI prints at the end)."""

    def __init__(self, label: str, config: RunConfig, vocab_size: int, energy_methods: dict[str, str],
                 known_call_s: float | None = None) -> None:
        self.label, self.config, self.vocab_size, self.methods = label, config, vocab_size, energy_methods
        self.known_call_s = known_call_s  # `HybridDecoder.call_s` when the run began
        self.events: list[TokenEvent] = []
        self.spans: list[str] = []  # the tokens as HTML, appended by `render.token_spans` (rendered once each)
        self.points: list[Summary] = []
        self.records: list[dict[str, Any]] = []
        self.f1: float | None = None
        # Greedy runs only: how many of the LLM's own greedy answer's tokens this run reproduced before it first
        # differed (HLM reproduces all of them), and that answer's length. BERTScore at T > 0 is mostly noise.
        self.faithful: tuple[int, int] | None = None
        # T > 0 only: the lowest and highest F1 of the LLM's samples against each other (`judge`).
        self.band: tuple[float, float] | None = None
        self.phase = "waiting"  # waiting | decoding | reference | done | stopped
        self.note = ""  # what is happening now, for the status line
        self.pending: PendingDraft | None = None  # the draft the cloud is verifying now, shown until decided
        # False for an answer whose events carry no time or energy (the LLM's, from the stored ids): its tokens
        # show, its figures do not (no summary, so no zeros that read as measured)
        self.priced = True
        self.answer_from = "from the cache on disk"  # where an answer without figures came from, in words
        # The wall-clock time of the earlier run with the same pair, prompt and settings that a comparison shows
        # instead of decoding the same tokens again (`Dashboard._shown_again`); None: decoded for this view
        self.shown_again: str | None = None

    def update(self, events: list[TokenEvent]) -> None:
        if self.pending is not None and len(events) > self.pending.index:
            self.pending = None
        self.events = events
        done = self.points[-1].tokens if self.points else 0
        if self.priced and len(events) > done:
            step = max(1, math.ceil((len(events) - done) / POINTS_PER_UPDATE))
            for n in [*range(done + step, len(events), step), len(events)]:
                self.points.append(summarize(events[:n], self.config, self.vocab_size, self.methods,
                                             self.known_call_s))

    def at_limit(self, stop_ids: frozenset[int]) -> bool:
        """Whether the run was cut by max_new_tokens rather than ending on a stop token (mid-sentence, likely)."""
        return (len(self.events) >= self.config.sampling.max_new_tokens and bool(self.events)
                and self.events[-1].token_id not in stop_ids)

    @property
    def role(self) -> Role:
        """The run's policy's role in a comparison (`hlm.policies`): the page reads roles, never names."""
        return role_of(self.config.policy.name)

    @property
    def summary(self) -> Summary | None:
        return self.points[-1] if self.points else None

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def served(self) -> str:
        """What of the run's time was work made before and served again at its cost (`hlm.verifier.Track`, a prompt
        read before): said wherever its time is, since its clock counts that work (`TokenEvent.wall_s`)."""
        s = sum(e.served_s for e in self.events)
        return f"{s:.1f} s of it cloud work made before, served again and charged what it cost" if s >= 0.05 else ""

    def payload(self, tokens: bool = True) -> dict[str, Any]:
        """What the API streams: the run so far (cumulative, so the last message is the whole result)."""
        out = {"status": self.phase, "note": self.note, "policy": self.label, "text": self.text,
               "pending": asdict(self.pending) if self.pending else None,
               "summary": self.summary.to_dict() if self.summary else None, "bertscore_f1": self.f1,
               "faithful_prefix": self.faithful, "bertscore_band": self.band,
               "config": self.config.to_dict(), "shown_again": self.shown_again}
        if tokens:
            self.records.extend(e.to_dict() for e in self.events[len(self.records):])
            out["tokens"] = self.records
        return out


def run_label(config: RunConfig) -> str:
    """The registry's label for the run's policy (`Policy.label`), the one name a run has on the page."""
    return REGISTRY[config.policy.name].label(config.policy)


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


def replayed_on(config: RunConfig) -> str | None:
    """The stored statistic a run's what-if replay re-decides on: "score" for a policy that asks its estimator, "u"
    for one that decides on uncertainty alone; None for the rest (a coin, every draft, none: no knob to move)."""
    policy = REGISTRY[config.policy.name]
    if policy.uses_estimator:
        return "score"
    return "u" if policy.uses_uncertainty else None


def replayable(run: RunView) -> bool:
    """A finished run of an uncertainty policy (every draft carries u) or of an estimator policy whose every draft
    carries a score (the paper-literal estimators decide on attention rows, which are not a threshold on a stored
    score)."""
    stat = replayed_on(run.config)
    return (run.phase == "done" and stat is not None and bool(run.events) and run.summary is not None
            and all(getattr(e, stat) is not None for e in run.events))


def replay_rule(run: RunView, scale: ScoreScale | None, k: int, gamma: float, u_th: float
                ) -> tuple[str, Callable[[TokenEvent], bool]]:
    """The replayed policy's decision at the new knobs, as a label and a test of one stored draft: an estimator
    policy holds each draft's stored score against the (k, gamma) bar; an uncertainty policy asks the registry's
    rule with the new u_th."""
    policy = run.config.policy
    if replayed_on(run.config) == "u":
        at = replace(policy, u_th=u_th)
        return f"u_th={u_th:g}", lambda e: should_upload(at, e.u, 1.0)
    assert scale is not None  # an estimator policy
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




Score = Callable[[list[str], list[str]], list[float]]  # BERTScore F1 of candidates against references, pairwise


def noise_band(references: Sequence[Sequence[TokenEvent]], score: Score) -> tuple[float, float] | None:
    """The lowest and highest F1 of the LLM's samples against each other; None with a single reference."""
    texts = ["".join(e.text for e in r) for r in references]
    if len(texts) < 2:
        return None
    pairs = list(itertools.combinations(texts, 2))
    spread = score([a for a, _ in pairs], [b for _, b in pairs])
    return min(spread), max(spread)


def judge(run: RunView, references: Sequence[Sequence[TokenEvent]], score: Score,
          band: tuple[float, float] | None, is_reference: bool = False) -> None:
    """Score a finished run: BERTScore F1, the mean over `references` (the reference run itself: over the
    others; at greedy it is the answer, 1.0). Greedy runs also get the faithful prefix against the one answer;
    `band` is `noise_band(references)`, computed once for all the runs scored against them."""
    texts = ["".join(e.text for e in r) for r in references]
    others = texts[1:] if is_reference else texts
    run.f1 = statistics.fmean(score([run.text] * len(others), others)) if others else 1.0
    if run.config.sampling.temperature == 0:
        answer = [e.token_id for e in references[0]]
        run.faithful = faithful_prefix([e.token_id for e in run.events], answer), len(answer)
    run.band = band
