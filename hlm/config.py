"""Every knob of the system, typed, with units in the field names.

Three groups: how tokens are sampled (`SamplingConfig`), when a draft is uploaded (`PolicyConfig`) and the
physical link/energy model (`LinkConfig`). Each validates itself so a bad value fails before any model work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from hlm.estimators import NAMES as ESTIMATORS
from hlm.estimators import WINDOW

POLICIES = ("ours", "uhlm", "hlm", "slm", "llm", "random")
QUANT_RECIPES = ("none", "int8", "int4")  # hlm.quant: weight-only fast paths
# Every entry point states and enforces it. About 25,000 tokens: prefilled in chunks, the embedded pair's peak
# memory stays far under 16 GB at this length (README "Speed and long prompts").
MAX_PROMPT_CHARS = 100_000

PolicyName = Literal["ours", "uhlm", "hlm", "slm", "llm", "random"]


class ConfigError(ValueError):
    """A setting is out of range; the message names the field and the allowed range."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class SamplingConfig:
    """How both models turn logits into a distribution. Draft p and verifier q use the same transform,
    so rejection sampling makes the output follow the verifier's *processed* distribution exactly."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        _check(0.0 <= self.temperature <= 5.0, f"temperature must be in [0, 5], got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _check(1 <= self.max_new_tokens <= 8192, f"max_new_tokens must be in [1, 8192], got {self.max_new_tokens}")
        _check(0 <= self.seed < 2**63, f"seed must be a non-negative 64-bit integer, got {self.seed}")


@dataclass(frozen=True)
class PolicyConfig:
    """When a drafted token is uploaded (see `hlm.policies` and, for `ours`, `hlm.estimators`).

    estimator: how `ours` scores a draft (`hlm.estimators.REGISTRY`).
    k (1..32): bounds how many tokens are sent: about k uploads per 32 drafts on the calibration prompts
    (paper-literal estimators: the draft must rank within the top-k of its attention row).
    gamma (>= 0): strictness: the bar rises by gamma standard deviations of the score (paper-literal: the row
    threshold tau = mean + gamma * std).
    u_th: uncertainty threshold in [0, 1] of `uhlm` and the paper-literal estimators: uncertain iff u > u_th.
    skip_rate: for the `random` control, the probability that a draft is skipped.
    n_samples / theta_max: the temperature-perturbation uncertainty estimate (K and theta_max in U-HLM).
    sink_tokens: the first positions of the context, excluded from importance (attention sinks).
    last_layers: importance averages heads over this many final layers (0 = all layers).
    """

    name: PolicyName = "ours"
    u_th: float = 0.08
    k: int = 9  # estimator, k and gamma: chosen by `python -m hlm study` on the tuning prompts (README "Selection")
    gamma: float = 0.0
    estimator: str = "probe-horizon"
    skip_rate: float = 0.5
    n_samples: int = 20
    theta_max: float = 2.0
    sink_tokens: int = 4
    last_layers: int = 4

    def __post_init__(self) -> None:
        _check(self.name in POLICIES, f"unknown policy {self.name!r}; choose one of {', '.join(POLICIES)}")
        _check(self.estimator in ESTIMATORS,
               f"unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        _check(0.0 <= self.u_th <= 1.0, f"u_th must be in [0, 1], got {self.u_th}")
        _check(isinstance(self.k, int) and 1 <= self.k <= WINDOW,
               f"k must be an integer in [1, {WINDOW}], got {self.k}")
        _check(math.isfinite(self.gamma) and self.gamma >= 0.0, f"gamma must be >= 0, got {self.gamma}")
        _check(0.0 <= self.skip_rate <= 1.0, f"skip_rate must be in [0, 1], got {self.skip_rate}")
        _check(1 <= self.n_samples <= 1024, f"n_samples must be in [1, 1024], got {self.n_samples}")
        _check(0.0 < self.theta_max <= 10.0, f"theta_max must be in (0, 10], got {self.theta_max}")
        _check(self.sink_tokens >= 0, f"sink_tokens must be >= 0, got {self.sink_tokens}")
        _check(self.last_layers >= 0, f"last_layers must be >= 0, got {self.last_layers}")


@dataclass(frozen=True)
class LinkConfig:
    """The wireless link and the power figures of the energy model (METHOD.md). All defaults are modelled
    assumptions, not measurements; every energy figure built from them is labelled `modelled`.

    Uplink rate R = bandwidth_hz * log2(1 + 10^(snr_db/10)); an upload of b bits takes b / R seconds and costs
    tx_power_w * b / R joules of radio energy. While the device waits for the cloud's answer (cloud compute +
    downlink + round trip) it draws device_idle_power_w. Device compute without a hardware counter is
    device_compute_power_w * measured compute time; cloud compute likewise with cloud_power_w.
    """

    bandwidth_hz: float = 10e6  # 10 MHz uplink channel
    snr_db: float = 10.0
    tx_power_w: float = 1.0  # electrical draw while transmitting (23 dBm out at ~20 % PA efficiency)
    device_compute_power_w: float = 3.0  # phone SoC running the SLM
    device_idle_power_w: float = 0.3  # radio in receive + SoC idle while waiting
    cloud_power_w: float = 300.0  # one datacentre GPU
    downlink_rate_bps: float = 50e6
    rtt_s: float = 0.02
    bits_per_prob: int = 16  # 32, 16 or 8 bits per probability in a full-distribution upload
    topk: int = 0  # 0 = full distribution; >0 = CU-HLM top-k compression (k entries + indices)
    token_id_bits: int = 32
    cloud_verify_time_s: float = 0.05  # assumed cloud compute per upload when none was measured

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            _check(isinstance(value, (int, float)) and math.isfinite(value), f"{f.name} must be a finite number")
        _check(self.bandwidth_hz > 0, f"bandwidth_hz must be > 0, got {self.bandwidth_hz}")
        _check(-30.0 <= self.snr_db <= 60.0, f"snr_db must be in [-30, 60], got {self.snr_db}")
        for name in ("tx_power_w", "device_compute_power_w", "device_idle_power_w", "cloud_power_w", "rtt_s",
                     "cloud_verify_time_s"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check(self.downlink_rate_bps > 0, f"downlink_rate_bps must be > 0, got {self.downlink_rate_bps}")
        _check(self.bits_per_prob in (8, 16, 32), f"bits_per_prob must be 8, 16 or 32, got {self.bits_per_prob}")
        _check(self.topk >= 0, f"topk must be >= 0 (0 = full distribution), got {self.topk}")
        _check(1 <= self.token_id_bits <= 64, f"token_id_bits must be in [1, 64], got {self.token_id_bits}")

    @property
    def uplink_rate_bps(self) -> float:
        return self.bandwidth_hz * math.log2(1.0 + 10.0 ** (self.snr_db / 10.0))


@dataclass(frozen=True)
class RunConfig:
    """One generation request: the three groups together, as the CLI, app and experiments pass them."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    link: LinkConfig = field(default_factory=LinkConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"sampling": asdict(self.sampling), "policy": asdict(self.policy), "link": asdict(self.link)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from plain dicts (JSON, app fields); unknown keys are an error, not silently dropped."""
        parts: dict[str, Any] = {}
        for key, klass in (("sampling", SamplingConfig), ("policy", PolicyConfig), ("link", LinkConfig)):
            given = dict(data.get(key) or {})
            known = {f.name for f in fields(klass)}
            unknown = set(given) - known
            _check(not unknown, f"unknown {key} field(s): {', '.join(sorted(unknown))}")
            parts[key] = klass(**given)
        extra = set(data) - {"sampling", "policy", "link"}
        _check(not extra, f"unknown config section(s): {', '.join(sorted(extra))}")
        return cls(**parts)

    def with_policy(self, **changes: Any) -> RunConfig:
        return replace(self, policy=replace(self.policy, **changes))
