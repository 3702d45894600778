"""What a viewer sets: `Settings` (the page's and the API's knobs, in display units) and the defaults that depend
on the pair (its calibrated u_th), validated into a `RunConfig` with a message a viewer can act on."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hlm.config import ConfigError, LinkConfig, PolicyConfig, RunConfig, SamplingConfig, device_profile, link_preset
from hlm.models.pairs import Calibration
from hlm.models.presets import PRESETS
from hlm.session import resolve_u_th, with_u_th

_S, _P, _L = SamplingConfig(), PolicyConfig(), LinkConfig()
DEMO_MAX_NEW_TOKENS = 96  # shorter than the CLI's default so a Compare (4 runs) finishes in about a minute on CPU
# The page decodes greedily by default: HLM then equals the LLM token for token, so every difference on screen
# (faithful prefix, BERTScore) is the policy's, not sampling noise (README "Dashboard": why greedy).
DEMO_TEMPERATURE = 0.0

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples.json"

def _number(name: str, value: Any, whole: bool = False) -> float | int:
    """Gradio numbers arrive as floats (8.0) or None when a box is cleared; configs want ints and a message."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if whole:
        if value != int(value):
            raise ConfigError(f"{name} must be a whole number, got {value}")
        return int(value)
    return float(value)


@dataclass(frozen=True)
class Settings:
    """The knobs the page and the API expose, in display units (bandwidth in MHz); `run_config` validates."""

    k: int = _P.k
    gamma: float = _P.gamma
    policy: str = _P.name
    estimator: str = _P.estimator
    u_th: float | None = None  # None: the pair's calibrated risk-averse value, else PolicyConfig's default
    temperature: float = DEMO_TEMPERATURE
    max_new_tokens: int = DEMO_MAX_NEW_TOKENS
    seed: int = _S.seed
    # The demo's story is a phone on a cellular uplink: the page prices the SLM as a phone (README "Device
    # profiles"); `this-machine` shows this server's own measured time instead.
    device_profile: str = "phone"
    link_preset: str = "default"
    bandwidth_mhz: float | None = None  # None: the preset's; a number overrides it (summaries then say so)
    snr_db: float | None = None
    tx_power_w: float | None = None
    bits_per_prob: int = _L.bits_per_prob
    topk: int = 64  # 16-bit top-64: same acceptance as the full distribution at 1/722 of the bits (README)

    def run_config(self, calibration: Calibration | None) -> RunConfig:
        base = link_preset(self.link_preset)
        u_th = None if self.u_th is None else _number("u_th", self.u_th)
        return with_u_th(RunConfig(
            SamplingConfig(temperature=_number("temperature", self.temperature), top_p=_S.top_p,
                           max_new_tokens=_number("max_new_tokens", self.max_new_tokens, whole=True),
                           seed=_number("seed", self.seed, whole=True)),
            PolicyConfig(name=self.policy, k=_number("k", self.k, whole=True), gamma=_number("gamma", self.gamma),
                         estimator=self.estimator),
            replace(base, **{f: _number(name, v) * scale for f, name, v, scale in (
                        ("bandwidth_hz", "bandwidth_mhz", self.bandwidth_mhz, 1e6),
                        ("snr_db", "snr_db", self.snr_db, 1), ("tx_power_w", "tx_power_w", self.tx_power_w, 1))
                              if v is not None},
                    bits_per_prob=_number("bits_per_prob", self.bits_per_prob, whole=True),
                    topk=_number("topk", self.topk, whole=True)),
            device=device_profile(self.device_profile), link_preset=self.link_preset,
        ), u_th, calibration)


def calibration_of(preset: str) -> Calibration | None:
    """The pair's fitted thresholds, known without loading the models (presets carry them)."""
    p = PRESETS.get(preset)
    return p.calibration if p else None


def default_u_th(preset: str) -> float:
    return resolve_u_th(None, calibration_of(preset))[0]


def load_examples(path: Path = EXAMPLES) -> list[dict[str, str]]:
    """Example prompts for the page: a list of {"label", "prompt"}."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [{"label": str(r["label"]), "prompt": str(r["prompt"])} for r in rows]

