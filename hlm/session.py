"""The one door from a front end (CLI, dashboard, experiments) to the core: plain values in, a decoder or a
`RunConfig` out, so no front end builds another's argument objects and each rule is written once here.

The u_th rule: `u_th=None` means the pair's calibrated risk-averse value (`Calibration.risk_averse`), or
`PolicyConfig`'s default for a pair without one; the run's summary says which (`Summary.u_th_source`).
Imports stay light (the CLI builds its parser before any model work); torch loads with the first decoder.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

from hlm.cloud import TOKEN_ENV
from hlm.config import (
    LinkConfig,
    PolicyConfig,
    RunConfig,
    SamplingConfig,
    UThSource,
    device_profile,
    link_preset,
)

if TYPE_CHECKING:
    from hlm.decoder import HybridDecoder
    from hlm.models.pairs import Calibration



def resolve_u_th(u_th: float | None, calibration: Calibration | None) -> tuple[float, UThSource]:
    """The u_th a run uses and where it came from: given, else the pair's calibrated value, else the default."""
    if u_th is not None:
        return u_th, "given"
    if calibration is not None:
        return calibration.risk_averse, "calibrated"
    return PolicyConfig.u_th, "default"


def with_u_th(config: RunConfig, u_th: float | None, calibration: Calibration | None) -> RunConfig:
    """`config` with its u_th resolved by `resolve_u_th` (validated by `PolicyConfig`) and its source recorded."""
    value, source = resolve_u_th(u_th, calibration)
    return replace(config.with_policy(u_th=value), u_th_source=source)


def run_config(*, policy: str = PolicyConfig.name, k: int = PolicyConfig.k, gamma: float = PolicyConfig.gamma,
               u_th: float | None = None, estimator: str = PolicyConfig.estimator,
               skip_rate: float = PolicyConfig.skip_rate, temperature: float = SamplingConfig.temperature,
               top_p: float = SamplingConfig.top_p, max_new_tokens: int = SamplingConfig.max_new_tokens,
               seed: int = SamplingConfig.seed, stop_at_eos: bool = True, device: str = "this-machine",
               link: str = RunConfig.link_preset, link_overrides: dict[str, Any] | None = None,
               calibration: Calibration | None = None) -> RunConfig:
    """One validated run from plain values: `link` names a preset whose fields `link_overrides` replace (None values
    keep the preset's); `device` names a device profile. Without the pair's `calibration` yet, call it again once
    the pair is loaded: bad values fail here first, before any model work."""
    overrides = {f.name: v for f in fields(LinkConfig) if (v := (link_overrides or {}).get(f.name)) is not None}
    config = RunConfig(
        SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                       stop_at_eos=stop_at_eos),
        PolicyConfig(name=policy, k=k, gamma=gamma, estimator=estimator, skip_rate=skip_rate),
        replace(link_preset(link), **overrides),
        device_profile(device),
        link,
    )
    return with_u_th(config, u_th, calibration)


def open_decoder(models: str, device: str | None = None, dtype: str | None = None, quant: str = "auto",
                 cloud: str | None = None, emulate_link: LinkConfig | None = None,
                 token: str | None = None) -> HybridDecoder:
    """A decoder on the pair `models` (a preset or DRAFT,VERIFIER; loaded once per process); with `cloud` (the URL
    of `serve-cloud`) the verifier is remote, its uploads delayed by `emulate_link`'s modelled time if given, and
    `token` (default: $HLM_CLOUD_TOKEN) its bearer token."""
    from hlm.decoder import HybridDecoder
    from hlm.models.presets import load_pair

    pair = load_pair(models, device=device, dtype=dtype, quant=quant)
    verifier = None
    if cloud:
        from hlm.cloud.client import HttpVerifier

        verifier = HttpVerifier(cloud, vocab_size=pair.vocab_size, token=token or os.environ.get(TOKEN_ENV),
                                emulate_link=emulate_link)
    return HybridDecoder(pair, verifier)
