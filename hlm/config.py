"""Every knob of the system, typed, with units in the field names.

Three groups: how tokens are sampled (`SamplingConfig`), when a draft is uploaded (`PolicyConfig`) and the
physical link/energy model (`LinkConfig`), plus which device drafts (`DeviceProfile`). Each validates itself so a
bad value fails before any model work. Named, documented choices of the last two live in `DEVICE_PROFILES` and
`LINK_PRESETS` (`catalogue()` lists them for a view).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Generic, Literal, TypeVar

from hlm.errors import UserError
from hlm.estimators import NAMES as ESTIMATORS
from hlm.estimators import WINDOW
from hlm.policies import REGISTRY as POLICY_REGISTRY

QUANT_RECIPES = ("none", "int8", "int4", "q4k", "gguf", "ggml")  # hlm.quant: weight-only fast paths
COMPILED = "compiled"  # --quant: as auto, and the draft's decode step compiled (hlm.compiled)
# hlm.experiments.bench, in run order
BENCH_SECTIONS = ("limit", "rows", "plain", "heldout", "overhead", "context", "policies")
# Every entry point states and enforces it. About 25,000 tokens: prefilled in chunks, the embedded pair's peak
# memory stays far under 16 GB at this length (docs/speed.md, "Long prompts").
MAX_PROMPT_CHARS = 100_000

# What each run knob means, said once: the CLI's --help and the page's knob table (its widgets' and API's docs) read
# it; each front end adds only its own defaults and units.
KNOB_HELP = {
    "k": f"ours: about k uploads per {WINDOW} drafts, 1..{WINDOW} (paper-* estimators: attention-row rank bound)",
    "gamma": "ours: strictness, raises the bar by gamma std of the score, >= 0 (paper-*: row mean + gamma*std)",
    "u_th": "uncertainty threshold in [0, 1] for uhlm and paper-*; omitted: the pair's calibrated risk-averse value",
    "estimator": "how ours scores a draft",
    "policy": "who decides which drafts are uploaded",
    "temperature": "sampling temperature of both models; 0 = greedy, where HLM equals the LLM token for token",
    "max_new_tokens": "tokens to generate at most",
    "seed": "random seed of drafting, uncertainty and verification",
    "device_profile": "how the SLM's time and energy per token are priced",
    "link_preset": "the uplink: a named LinkConfig (docs/energy.md, \"Device profiles and link presets\")",
    "bits_per_prob": "8, 16 or 32 bits per uploaded probability",
    "topk": "0 uploads the full distribution, > 0 its top-k entries",
}

# Where a run's u_th came from (`hlm.session.resolve_u_th`): set by the caller, the pair's calibration, or the default
UThSource = Literal["given", "calibrated", "default"]


class ConfigError(UserError):
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

    name: str = "ours"  # `hlm.policies.REGISTRY`
    u_th: float = 0.08
    k: int = 8  # estimator, k and gamma: chosen by `python -m hlm study` on the tuning prompts (docs/selection.md)
    gamma: float = 0.0
    estimator: str = "probe-horizon"
    skip_rate: float = 0.5
    n_samples: int = 20
    theta_max: float = 2.0
    sink_tokens: int = 4
    last_layers: int = 4

    def __post_init__(self) -> None:
        _check(self.name in POLICY_REGISTRY,  # the registry as it is now: a policy registered later is valid too
               f"unknown policy {self.name!r}; choose one of {', '.join(POLICY_REGISTRY)}")
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
class DeviceProfile:
    """Where the SLM's per-token cost comes from. With both figures None the device is this machine: time is
    measured, energy is read from a hardware counter (RAPL/NVML) where readable, else modelled as
    `LinkConfig.device_compute_power_w` x measured time. With both set, every drafted token costs exactly these
    (modelled from a published measurement named in `source`), whatever this server's CPU takes."""

    name: str = "this-machine"
    slm_time_per_token_s: float | None = None
    slm_energy_per_token_j: float | None = None
    source: str = ""  # short citation, shown in every energy label built from this profile

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "device profile name must not be empty")
        figures = (self.slm_time_per_token_s, self.slm_energy_per_token_j)
        _check((figures[0] is None) == (figures[1] is None),
               "slm_time_per_token_s and slm_energy_per_token_j are given together or not at all")
        for f, value in zip(("slm_time_per_token_s", "slm_energy_per_token_j"), figures, strict=True):
            _check(value is None or (isinstance(value, (int, float)) and math.isfinite(value) and value > 0),
                   f"{f} must be a finite number > 0 (or omitted: measured on this machine), got {value}")
        _check(self.slm_time_per_token_s is None or bool(self.source.strip()),
               "a device profile with its own figures must cite its source")

    @property
    def modelled(self) -> bool:
        """True when per-token figures come from the profile, not from this machine."""
        return self.slm_energy_per_token_j is not None


T = TypeVar("T", DeviceProfile, LinkConfig)


@dataclass(frozen=True)
class Choice(Generic[T]):
    """A named, documented configuration a user picks by name (CLI, sweep, page)."""

    label: str  # short, for a menu
    description: str  # where every number comes from
    config: T


# Qwen2-0.5B-Instruct Q4_K_M, llama.cpp on the CPU (8 threads) of a Samsung Galaxy S25 Ultra, 100 generated tokens,
# energy from Android's BatteryManager (net of idle), median of 30 runs: decode 50.45 tok/s, 0.44 J per generated
# token. Ehsani, Giamattei, Malavolta, Pietrantuono, "Sustainability Is Not Linear: Quantifying Performance, Energy,
# and Privacy Trade-offs in On-Device Intelligence", arXiv 2603.26603 (2026); figures from the authors' published
# results, github.com/eziyoo/LLMs-on-Devices data/aggregated/final_results.csv, row Qwen2-0.5B-Q4_K_M.
PHONE_SOURCE = "Ehsani et al. 2026, arXiv 2603.26603: Qwen2-0.5B Q4_K_M on a Galaxy S25 Ultra"

DEVICE_PROFILES: dict[str, Choice[DeviceProfile]] = {
    "this-machine": Choice(
        "This machine (measured time)",
        "The SLM's time per token is measured on this server. Energy is read from RAPL (CPU) or NVML (GPU) where "
        "the counter is readable; otherwise modelled as device_compute_power_w x measured time, and labelled so. "
        "A server CPU is neither a phone nor efficient: compute then dominates the device's energy.",
        DeviceProfile()),
    "phone": Choice(
        "Phone-class device (Galaxy S25 Ultra, 0.5B Q4)",
        "Modelled from a published on-device measurement: Qwen2-0.5B-Instruct (0.49B parameters, Q4_K_M GGUF) in "
        "llama.cpp on the 8 CPU cores of a Samsung Galaxy S25 Ultra decodes 50.45 tokens/s (19.8 ms a token) and "
        "spends 0.44 J per generated token (battery current x voltage from Android's BatteryManager, net of the "
        "idle baseline, median of 30 runs of 100 tokens). Source: E. Ehsani, L. Giamattei, I. Malavolta, "
        "R. Pietrantuono, 'Sustainability Is Not Linear: Quantifying Performance, Energy, and Privacy Trade-offs "
        "in On-Device Intelligence', arXiv 2603.26603 (2026), published data final_results.csv (github.com/"
        "eziyoo/LLMs-on-Devices), row Qwen2-0.5B-Q4_K_M. Not scaled: this project's draft model is a 0.5B Q4_K_M "
        "Qwen2.5 of the same architecture family. The 0.44 J covers the whole measured window (model load, a "
        "103-token prompt, 100 tokens) divided by 100 tokens, so it over-states a decoded token's energy "
        "(it implies 22 W at 19.8 ms/token; the run's average power was 8.35 W): compute is priced high, "
        "savings on the link are understated, not inflated. Prompt prefill is not charged separately.",
        DeviceProfile("phone", 1 / 50.45, 0.44, PHONE_SOURCE)),
}

LINK_PRESETS: dict[str, Choice[LinkConfig]] = {
    "default": Choice(
        "Today's default (34.6 Mbit/s)",
        "10 MHz at 10 dB SNR: R = W log2(1 + SNR) = 34.6 Mbit/s. Modelled assumptions for a phone on a decent "
        "cellular uplink (docs/energy.md); a 16-bit 151,936-token upload takes 70 ms.",
        LinkConfig()),
    "paper-like": Choice(
        "Paper's implied regime (~0.1 Mbit/s)",
        "180 kHz (one LTE resource block / an NB-IoT carrier) at -3 dB SNR: 0.105 Mbit/s. The rate the paper's "
        "throughput implies (Park, Oh, Kim, arXiv 2508.12590: 0.37 tok/s at 38.6 % uploads, so ~7 s per upload of "
        "a 32,000-token distribution, ~0.07-0.15 Mbit/s; our inference, research/ENERGY.md). With this project's "
        "151,936-token vocabulary a 16-bit upload takes ~23 s, so the link dominates the device's energy.",
        LinkConfig(bandwidth_hz=180e3, snr_db=-3.0)),
    "cell-edge": Choice(
        "Cell-edge uplink (1.5 Mbit/s)",
        "10 MHz at -9.6 dB SNR: 0.15 bit/s/Hz, 1.5 Mbit/s. 0.15 bit/s/Hz is the IMT-2020 minimum requirement for "
        "5th-percentile ('cell-edge') user spectral efficiency on the uplink, Dense Urban eMBB (Report ITU-R "
        "M.2410-0, 2017); the SNR is chosen so that Shannon's formula gives it.",
        LinkConfig(snr_db=-9.6)),
    "good-5g": Choice(
        "Good 5G uplink (333 Mbit/s)",
        "50 MHz at 20 dB SNR: 333 Mbit/s. An assumption for a phone near a 5G NR cell (half of FR1's largest "
        "100 MHz channel, a strong signal), not a measurement: the link is then almost free and only compute "
        "matters.",
        LinkConfig(bandwidth_hz=50e6, snr_db=20.0)),
}


def _lookup(registry: dict[str, Choice[T]], kind: str, name: str) -> T:
    _check(name in registry, f"unknown {kind} {name!r}; choose one of {', '.join(registry)}")
    return registry[name].config


def device_profile(name: str) -> DeviceProfile:
    """The registered profile of that name (ConfigError naming the choices otherwise)."""
    return _lookup(DEVICE_PROFILES, "device profile", name)


def link_preset(name: str) -> LinkConfig:
    """The registered link of that name (ConfigError naming the choices otherwise)."""
    return _lookup(LINK_PRESETS, "link preset", name)


def link_label(preset: str, link: LinkConfig) -> str:
    """The preset's name, plus the fields this link changes from it, so a summary never claims a preset it left."""
    base = link_preset(preset)
    changed = [f.name for f in fields(LinkConfig) if getattr(link, f.name) != getattr(base, f.name)]
    return f"{preset} + {', '.join(changed)}" if changed else preset


def catalogue() -> dict[str, list[dict[str, Any]]]:
    """Every device profile and link preset as plain dicts (name, label, description, numbers) for a view."""
    return {
        "device_profiles": [{"name": n, "label": c.label, "description": c.description, **asdict(c.config)}
                            for n, c in DEVICE_PROFILES.items()],
        "link_presets": [{"name": n, "label": c.label, "description": c.description,
                          "uplink_rate_bps": c.config.uplink_rate_bps, **asdict(c.config)}
                         for n, c in LINK_PRESETS.items()],
    }


@dataclass(frozen=True)
class RunConfig:
    """One generation request: the groups together, as the CLI, app and experiments pass them. `link_preset`
    names the preset `link` started from (explicit fields may override it; summaries say which, `link_label`).
    `u_th_source` records where `policy.u_th` came from: provenance, not a setting, so it is left out of equality and
    of `to_dict` (the experiments' cache keys), and summaries carry it."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    device: DeviceProfile = field(default_factory=DeviceProfile)
    link_preset: str = "default"
    u_th_source: UThSource = field(default="given", compare=False)

    def __post_init__(self) -> None:
        link_preset(self.link_preset)  # validates the name

    def to_dict(self) -> dict[str, Any]:
        return {"sampling": asdict(self.sampling), "policy": asdict(self.policy), "link": asdict(self.link),
                "device": asdict(self.device), "link_preset": self.link_preset}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from plain dicts (JSON, app fields); unknown keys are an error, not silently dropped."""
        sections = (("sampling", SamplingConfig), ("policy", PolicyConfig), ("link", LinkConfig),
                    ("device", DeviceProfile))
        parts: dict[str, Any] = {}
        for key, klass in sections:
            given = dict(data.get(key) or {})
            known = {f.name for f in fields(klass)}
            unknown = set(given) - known
            _check(not unknown, f"unknown {key} field(s): {', '.join(sorted(unknown))}")
            parts[key] = klass(**given)
        extra = set(data) - {key for key, _ in sections} - {"link_preset"}
        _check(not extra, f"unknown config section(s): {', '.join(sorted(extra))}")
        return cls(**parts, link_preset=data.get("link_preset", "default"))

    def with_policy(self, **changes: Any) -> RunConfig:
        return replace(self, policy=replace(self.policy, **changes))
