"""The plain records the decoder yields. The CLI, the app, the HTTP client and the experiments all consume
these and nothing else, so every figure a view shows is traceable to one token's record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    from hlm.decoder import Draft
    from hlm.link import UploadCost
    from hlm.verifier import Verdict

Source = Literal["local", "cloud_accepted", "cloud_resampled", "cloud_sampled", "unverified"]
SOURCES: tuple[str, ...] = ("local", "cloud_accepted", "cloud_resampled", "cloud_sampled", "unverified")
ENERGY_PARTS = ("device_compute", "radio", "device_idle", "cloud")


class Spend(NamedTuple):
    """What producing one token cost: device compute time, joules per part of ENERGY_PARTS, and per part whether
    it was `measured` or `modelled`."""

    draft_s: float
    energy_j: dict[str, float]
    energy_method: dict[str, str]


@dataclass(frozen=True)
class PendingDraft:
    """A draft on its way to the cloud, announced before the verdict (`generate(drafts=True)`), so a view can show
    it at once, marked pending; the `TokenEvent` with the same index decides it (kept, or replaced)."""

    index: int
    token_id: int
    text: str


@dataclass
class TokenEvent:
    """One emitted token.

    source: `local` kept without upload; `cloud_accepted` / `cloud_resampled` the verifier's verdict on an
    uploaded draft; `cloud_sampled` the verifier generated it alone (policy `llm`); `unverified` the upload
    failed (cloud unreachable) and the draft was kept.
    importance / importance_threshold / importance_rank: for the paper-literal estimators, the draft's attention
    weight, the adaptive threshold tau it was compared with, and its rank in the row (0 = most attended);
    ubar: the Rao-Blackwellised uncertainty; score / score_threshold: the `ours` estimator's score and the bar
    it was held against (upload iff score >= bar); None where not computed.
    p_draft / q_draft: draft and verifier probability of the drafted token, when verified.
    draft_s: device compute time charged to this token: measured, or the device profile's per-token figure.
    energy_j: joules per part of ENERGY_PARTS; energy_method: `measured` or `modelled` per part.
    """

    index: int
    position: int
    token_id: int
    text: str
    source: Source
    uploaded: bool
    draft_id: int | None = None
    u: float | None = None
    importance: float | None = None
    importance_threshold: float | None = None
    importance_rank: int | None = None
    important: bool | None = None
    ubar: float | None = None
    score: float | None = None
    score_threshold: float | None = None
    p_draft: float | None = None
    q_draft: float | None = None
    synced_ids: int = 0
    bits_up: int = 0
    bits_down: int = 0
    wire_bytes_up: int | None = None
    wire_bytes_down: int | None = None
    draft_s: float = 0.0
    verify_s: float = 0.0
    uplink_s: float = 0.0
    wait_s: float = 0.0
    wall_s: float = 0.0  # since the run began, work served as computed before counted at what it cost then
    served_s: float = 0.0  # of verify_s, the verifier's work served as computed before (`hlm.verifier.Track`)
    energy_j: dict[str, float] = field(default_factory=dict)
    energy_method: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, *, index: int, position: int, text: str, source: Source, draft: Draft | None, verdict: Verdict | None,
           cost: UploadCost, synced_ids: int, spend: Spend, wall_s: float) -> TokenEvent:
        """One decided position from its parts: the draft (None when the cloud sampled alone), the verdict (None
        when kept locally or the cloud was unreachable: it names the token otherwise), what the upload cost and
        what the device spent."""
        parts: dict[str, Any] = {}
        if draft is not None:
            parts.update(token_id=draft.token, draft_id=draft.token, u=draft.u, score=draft.score,
                         score_threshold=draft.threshold)
            if draft.stats is not None:
                parts.update(ubar=draft.stats.ubar)
            if draft.importance is not None:
                imp = draft.importance
                parts.update(importance=imp.score, importance_threshold=imp.threshold, importance_rank=imp.rank,
                             important=imp.important)
        if verdict is not None:
            parts.update(token_id=verdict.token, p_draft=verdict.p_draft, q_draft=verdict.q_draft,
                         verify_s=verdict.compute_s, served_s=verdict.served_s, wire_bytes_up=verdict.wire_bytes_up,
                         wire_bytes_down=verdict.wire_bytes_down)
        return cls(index=index, position=position, text=text, source=source,
                   uploaded=draft is not None and cost.bits_up > 0, synced_ids=synced_ids, bits_up=cost.bits_up,
                   bits_down=cost.bits_down, uplink_s=cost.uplink_s, wait_s=cost.wait_s, wall_s=wall_s,
                   **spend._asdict(), **parts)

    @property
    def accept_prob(self) -> float | None:
        if self.p_draft is None or self.q_draft is None or self.p_draft <= 0:
            return None
        return min(1.0, self.q_draft / self.p_draft)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["accept_prob"] = self.accept_prob
        return out

