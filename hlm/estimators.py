"""Which drafts are worth uploading: the scores (estimators) and the one rule that maps them onto k and gamma.

An upload is worth its cost when the cloud would change the draft: with probability beta = max(0, 1 - q(d)/p(d))
under rejection sampling, or when the greedy choices differ. Every estimator turns the device's own statistics of
one draft (`DraftStats`, from the drafting pass: no extra forward pass) into a score, higher = upload sooner.

Score estimators share one decision rule, so k and gamma mean the same for all of them:
- k bounds how many tokens are sent: about k of every WINDOW = 32 drafts. The threshold is the score's
  (1 - k/32) quantile on the pair's calibration prompts (`SelectionCalibration`), so each step of k adds about
  1/32 of uploads on typical prompts, with no dead zone;
- gamma is strictness: the threshold rises by gamma standard deviations of the score (gamma = 0: k alone).
Upload iff score >= Q(1 - k/32) + gamma * std. Harder prompts get more uploads than k/32, easier ones fewer.

The paper-literal reconstruction (`paper-lookahead`, `paper-self`; `hlm.importance`) keeps its own reading of the
knobs: uncertain (u > u_th) AND important (attention weight >= mean + gamma * std of its row, rank < k).
`python -m hlm study` measures them all against a coin and an oracle; docs/selection.md has the evidence.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

if TYPE_CHECKING:
    from hlm.config import PolicyConfig
    from hlm.importance import Importance

WINDOW = 32  # k counts uploads per this many drafts
RAUQ_ALPHA = 0.2  # RAUQ's weight of the token's own probability in its recurrent confidence
MIN_P = 1e-6  # `DraftStats.log_p_before` counts each draft's probability from here up: one sampled long shot
# would otherwise end the horizon at once
LOG_FLOOR = 1e-7  # the log-scale features' floor: about float32's resolution of 1 - p near p = 1


@dataclass(frozen=True)
class DraftStats:
    """What the device knows about one draft d when it decides (all from the pass that produced its logits z).

    u: U-HLM uncertainty, the share of K random-temperature re-draws that differ from d;
    ubar: its Rao-Blackwellised mean E[u | z] = mean_i (1 - softmax(z / theta_i)[d]) (same signal, no coin noise);
    p_draft, p_top, margin, entropy: softmax(z) at temperature 1: d's probability, the largest, top-1 minus
    top-2, and the entropy in nats;
    semantic: expected output-embedding distance (1 - cosine) from d to the other top-16 candidates, weighted by
    their probability: how much the meaning would change if the cloud picked another token;
    prev_attention: attention that the query producing z puts on its previous token, averaged over the pair's
    selected heads (RAUQ: such heads lose focus where outputs go wrong); None when z came from the prompt's prefill
    (which computes no attention weights) or the estimator reads no heads;
    p_prev: the SLM's probability (temperature 1) of the previous token, None for the first;
    index: the draft's position in the answer (0 = the first new token);
    log_p_before: the sum of log p_draft over the answer's drafts decided before this one (0 for the first): the
    SLM's own log-probability that its drafts so far were right, whether or not the cloud saw them;
    hidden: the drafter's final hidden state at the query that produced z (what its lm-head read), a float vector;
    present only for the estimators that read it (`Estimator.hidden`), None otherwise.
    """

    u: float
    ubar: float
    p_draft: float
    p_top: float
    margin: float
    entropy: float
    semantic: float
    prev_attention: float | None = None
    p_prev: float | None = None
    index: int = 0
    log_p_before: float = 0.0
    hidden: Any = None


@dataclass(frozen=True)
class Horizon:
    """A draft that the cloud would change costs everything after it, but only while the answer is still the LLM's.
    That chance falls along the answer, fast where the SLM doubts its drafts and slowly where it copies with
    confidence (a signature, a docstring). So the `*-horizon` estimators weigh a score by
    floor + (1 - floor) exp(doubt * log_p_before - index / tokens): the SLM's probability of its drafts so far to the
    power `doubt`, and a decay with the position (none where tokens = 0); the floor keeps later uploads going. Chosen
    per pair on the tuning prompts (`python -m hlm study --fit`); these defaults are the first, hand-set ones."""

    tokens: float = 32.0
    floor: float = 0.2
    doubt: float = 0.0

    def __call__(self, stats: DraftStats) -> float:
        return float(self.weight(stats.index, stats.log_p_before))

    def weight(self, index: Any, log_p_before: Any) -> Any:
        """The weight of numbers, or of numpy arrays element-wise (the study weighs whole answers at once)."""
        decay = self.doubt * log_p_before - (index / self.tokens if self.tokens else 0.0)
        return self.floor + (1.0 - self.floor) * np.exp(decay)


@dataclass(frozen=True)
class ScoreScale:
    """A score's distribution on the calibration prompts: quantiles at j / WINDOW (j = 0..WINDOW) and the std."""

    quantiles: tuple[float, ...]
    std: float

    def threshold(self, k: int, gamma: float) -> float:
        j = WINDOW - min(max(k, 0), WINDOW)
        return self.quantiles[j] + gamma * self.std


# Without calibration a score in [0, 1] is taken as uniform there: k / 32 of drafts on average is then a guess.
UNIFORM = ScoreScale(tuple(j / WINDOW for j in range(WINDOW + 1)), 1 / math.sqrt(12))


@dataclass(frozen=True)
class Probe:
    """Logistic model of "the cloud would change this draft" over standardised `DraftStats` features."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float

    def __call__(self, stats: DraftStats) -> float:
        z = self.bias
        for name, mu, sd, w in zip(self.features, self.mean, self.scale, self.weights, strict=True):
            x = feature(stats, name)
            z += w * ((mu if x is None else x) - mu) / sd
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


@dataclass(frozen=True, eq=False)
class Judge:
    """A small learned model of "the cloud would change this draft" on the drafter's own hidden state and the scalar
    features: standardised inputs (scalars, then the hidden vector), ReLU layers, a sigmoid out (sklearn's MLP layout;
    a logistic judge is one layer). Its weights ship per pair in the calibration's JSON: no pickle."""

    features: tuple[str, ...]  # the scalar `DraftStats` features, before the hidden vector
    mean: np.ndarray  # (inputs,) imputes a missing scalar and centres every input
    scale: np.ndarray  # (inputs,)
    weights: tuple[np.ndarray, ...]  # (inputs, width), ..., (width, 1)
    biases: tuple[np.ndarray, ...]
    note: str = ""

    def __call__(self, stats: DraftStats) -> float:
        n = len(self.features)
        x = np.empty(self.mean.shape[0], dtype=np.float32)
        x[:n] = [self.mean[j] if (v := feature(stats, f)) is None else v for j, f in enumerate(self.features)]
        x[n:] = np.asarray(stats.hidden, dtype=np.float32).reshape(-1)
        x = (x - self.mean) / self.scale
        for j, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = x @ w + b
            if j < len(self.weights) - 1:
                x = np.maximum(x, 0.0)
        return float(1.0 / (1.0 + np.exp(-np.clip(x[0], -60.0, 60.0))))

    def to_json(self) -> dict[str, Any]:
        """Plain numbers for the calibration's JSON: no binary file, no pickle."""
        return {"features": list(self.features), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "weights": [w.tolist() for w in self.weights], "biases": [b.tolist() for b in self.biases],
                "note": self.note}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Judge:
        def arr(v: Any) -> np.ndarray:
            return np.asarray(v, dtype=np.float32)

        return cls(tuple(data["features"]), arr(data["mean"]), arr(data["scale"]),
                   tuple(map(arr, data["weights"])), tuple(map(arr, data["biases"])), data.get("note", ""))


@dataclass(frozen=True)
class SelectionCalibration:
    """Per model pair, fitted by `python -m hlm study --fit` on the tuning prompts only and shipped with the preset:
    the RAUQ heads, the probe and each score's scale."""

    heads: tuple[tuple[int, int], ...] = ()  # (layer, head) whose previous-token attention feeds prev_attention
    probe: Probe | None = None
    scales: dict[str, ScoreScale] = field(default_factory=dict)
    note: str = ""
    tuned_on: tuple[str, ...] = ()  # `prompt_key` of every prompt it was fitted on: reports must use others
    horizon: Horizon = Horizon()
    judge: Judge | None = None

    def leaked(self, prompts: list[str]) -> list[str]:
        """The prompts among these that the calibration was fitted on."""
        tuned = set(self.tuned_on)
        return [p for p in prompts if prompt_key(p) in tuned]

    def scale(self, estimator: str) -> ScoreScale:
        return self.scales.get(estimator, UNIFORM)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(replace(self, judge=None)), "judge": self.judge.to_json() if self.judge else None}

    @cached_property
    def digest(self) -> str:
        """Names this calibration's content: cached runs of a policy that asks an estimator are keyed by it."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> SelectionCalibration:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        probe = data.get("probe")
        judge = Judge.from_json(data["judge"]) if data.get("judge") else None
        return cls(heads=tuple(tuple(h) for h in data.get("heads", ())),  # type: ignore[misc]
                   probe=Probe(**{k: tuple(v) if isinstance(v, list) else v for k, v in probe.items()})
                   if probe else None,
                   scales={k: ScoreScale(tuple(v["quantiles"]), v["std"]) for k, v in data.get("scales", {}).items()},
                   note=data.get("note", ""), tuned_on=tuple(data.get("tuned_on", ())),
                   horizon=Horizon(**data.get("horizon", {})), judge=judge)


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def feature(stats: DraftStats, name: str) -> float | None:
    """A named feature of the probe: a `DraftStats` field, or one derived from them. The log-scale ones keep telling
    confident drafts apart (p = 0.999 from p = 0.99999), where 1 - p, the margin and the entropy all sit at their
    ends: without them most drafts of a long code answer score alike, and one step of k uploads them all at once."""
    if name == "one_minus_p":
        return 1.0 - stats.p_draft
    if name == "log_one_minus_p":
        return math.log(max(1.0 - stats.p_draft, LOG_FLOOR))
    if name == "log_entropy":
        return math.log(max(stats.entropy, LOG_FLOOR))
    if name == "rauq":
        return rauq(stats)
    return getattr(stats, name)


def rauq(stats: DraftStats) -> float:
    """RAUQ's confidence c_n = alpha p(d_n) + (1 - alpha) a_n c_{n-1}, unrolled one step (c_{n-1} ~ p of the previous
    token) so that the score stays a function of this draft's statistics; returns the risk 1 - c_n."""
    a = 1.0 if stats.prev_attention is None else stats.prev_attention
    prev = 1.0 if stats.p_prev is None else stats.p_prev
    return 1.0 - (RAUQ_ALPHA * stats.p_draft + (1.0 - RAUQ_ALPHA) * a * prev)


class Estimator:
    """One way of choosing drafts. `passes`: SLM passes after drafting d before it can be decided (the attention
    row of the pass over d, or over the next draft); `attention`: which attention weights its passes must return
    (only those layers are computed eagerly, `hlm.drafter`): none, the previous-token weight of the pair's selected
    heads (`prev_attention`), or the importance rows of the last layers (`hlm.importance`)."""

    name: ClassVar[str]
    description: ClassVar[str]
    knobs: ClassVar[str] = "k: about k uploads per 32 drafts; gamma: raises the bar by gamma std of the score"
    passes: ClassVar[int] = 0
    attention: ClassVar[Literal["", "heads", "rows"]] = ""
    hidden: ClassVar[bool] = False  # the drafting pass must return the final hidden state (`DraftStats.hidden`)
    uses_u_th: ClassVar[bool] = False

    def score(self, stats: DraftStats, cal: SelectionCalibration) -> float:
        raise NotImplementedError

    def decide(self, stats: DraftStats, importance: Importance | None, policy: PolicyConfig,
               cal: SelectionCalibration, score: float | None = None) -> bool:
        """Upload iff the draft's score reaches the bar; `score`, where given, is that score already computed (the
        decoder scores each draft once, for its event)."""
        if score is None:
            score = self.score(stats, cal)
        return score >= cal.scale(self.name).threshold(policy.k, policy.gamma)


class UBar(Estimator):
    name = "ubar"
    description = "uncertainty alone, denoised: the expected share of random-temperature re-draws that differ"

    def score(self, stats: DraftStats, cal: SelectionCalibration) -> float:
        return stats.ubar


class Semantic(Estimator):
    name = "semantic"
    description = "uncertainty x how far, in meaning, the likely alternatives are from the draft"

    def score(self, stats: DraftStats, cal: SelectionCalibration) -> float:
        return stats.ubar * stats.semantic


class Rauq(Estimator):
    name = "rauq"
    description = "attention-drop risk (RAUQ): low confidence where the selected heads lose the previous token"
    attention = "heads"

    def score(self, stats: DraftStats, cal: SelectionCalibration) -> float:
        return rauq(stats)


class ProbeEstimator(Estimator):
    name = "probe"
    description = "a logistic probe of 'the cloud would change this draft', fitted per pair on uncertainty, " \
                  "confidence, meaning and attention features"
    attention = "heads"

    def score(self, stats: DraftStats, cal: SelectionCalibration) -> float:
        return cal.probe(stats) if cal.probe else stats.ubar  # an unfitted pair falls back to ubar


class HorizonWeighted(Estimator):
    """Mixed in before a base estimator: its score weighted by the pair's horizon (`Horizon`), the chance that the
    answer is still the LLM's."""

    def score(self, stats: DraftStats, cal: SelectionCalibration) -> float:
        return super().score(stats, cal) * cal.horizon(stats)


class ProbeHorizon(HorizonWeighted, ProbeEstimator):
    name = "probe-horizon"
    description = "the probe's chance that the cloud would change the draft, weighted by the chance that the " \
                  "answer is still the LLM's (less after drafts the SLM doubted)"


class JudgeEstimator(Estimator):
    name = "judge"
    description = "a small learned judge of 'the cloud would change this draft' on the drafter's hidden state and " \
                  "confidence, fitted per pair"
    hidden = True

    def score(self, stats: DraftStats, cal: SelectionCalibration) -> float:
        return cal.judge(stats) if cal.judge else stats.ubar  # an unfitted pair falls back to ubar


class JudgeHorizon(HorizonWeighted, JudgeEstimator):
    name = "judge-horizon"
    description = "the judge's chance that the cloud would change the draft, weighted by the chance that the " \
                  "answer is still the LLM's (less after drafts the SLM doubted)"


class UBarHorizon(HorizonWeighted, UBar):
    name = "ubar-horizon"
    description = "uncertainty alone (ubar), weighted by the chance that the answer is still the LLM's"


class PaperRow(Estimator):
    """The paper-literal reconstruction (`hlm.importance`): uncertain and important in one attention row."""

    knobs = "k: rank bound in the attention row; gamma: row threshold mean + gamma*std; and u > u_th"
    attention = "rows"
    uses_u_th = True

    def score(self, stats: DraftStats, cal: SelectionCalibration) -> float:
        return stats.u

    def decide(self, stats: DraftStats, importance: Importance | None, policy: PolicyConfig,
               cal: SelectionCalibration, score: float | None = None) -> bool:
        return stats.u > policy.u_th and bool(importance and importance.important)


class PaperLookahead(PaperRow):
    name = "paper-lookahead"
    description = "paper-literal: the weight the next query puts on the draft (decided one draft later), AND u > u_th"
    passes = 2


class PaperSelf(PaperRow):
    name = "paper-self"
    description = "paper-literal: the weight the draft's own query puts on it, AND u > u_th"
    passes = 1


REGISTRY: dict[str, Estimator] = {e.name: e for e in (ProbeHorizon(), ProbeEstimator(), JudgeHorizon(),
                                                      JudgeEstimator(), UBarHorizon(), UBar(), Semantic(), Rauq(),
                                                      PaperLookahead(), PaperSelf())}
NAMES: tuple[str, ...] = tuple(REGISTRY)
