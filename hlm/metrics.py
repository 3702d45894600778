"""Run totals from event records (a pure function: the app calls it on partial streams for live figures)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hlm.config import LinkConfig, RunConfig, link_label
from hlm.events import ENERGY_PARTS, TokenEvent
from hlm.link import upload_bits, upload_cost
from hlm.policies import REGISTRY as POLICIES

DEVICE_PARTS = ENERGY_PARTS[:3]
VERIFIED = ("cloud_accepted", "cloud_resampled")
CALLS = (*VERIFIED, "cloud_sampled")


@dataclass
class Summary:
    """Totals over a run's events. The HLM counterfactual prices the same tokens as if every one had been
    uploaded alone (full payload, one cloud call each), so `energy_saving` needs no second run. It keeps this
    run's device compute (which includes the uncertainty/importance overhead HLM would not pay)."""

    policy: str
    tokens: int
    uploads: int
    upload_rate: float
    llm_calls: int
    accepted: int
    resampled: int
    unverified: int
    acceptance_rate: float | None
    uplink_bits: int
    downlink_bits: int
    wire_bytes_up: int | None
    wire_bytes_down: int | None
    device_energy_j: float
    device_energy_parts_j: dict[str, float]
    link_energy_j: float  # radio + idle: the part of device energy the upload policy controls
    cloud_energy_j: float
    hlm_device_energy_j: float | None
    energy_saving: float | None
    hlm_call_s: float  # cloud time per call priced into the counterfactual, and where it came from
    hlm_call_basis: str
    device_compute_s: float
    cloud_compute_s: float
    wall_s: float
    tokens_per_s: float
    tokens_per_s_modelled_link: float
    energy_methods: dict[str, str]
    device_profile: str  # `hlm.config.DEVICE_PROFILES` name: where device compute time and energy come from
    link_preset: str  # `hlm.config.LINK_PRESETS` name, plus the fields overridden (`hlm.config.link_label`)
    u_th_source: str  # `hlm.config.UThSource`: whether u_th was given, the pair's calibrated value or the default

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_one_token_call(e: TokenEvent) -> bool:
    """A cloud call that processed only the token before this one (and the draft): what every HLM call costs."""
    return e.source in CALLS and e.synced_ids <= 1


def hlm_call_time(calls: Sequence[TokenEvent], link: LinkConfig, known_call_s: float | None = None
                  ) -> tuple[float, str]:
    """Cloud time of one HLM call (the draft plus the one token before it), for the counterfactual.

    Not this run's mean per call: a call after skipped tokens also syncs them, which would make HLM look dearer
    and inflate the saving. Prefer this run's calls that processed just that much; else `known_call_s`, the
    same figure measured on earlier runs by this verifier; else the cheapest call after the prompt's (an upper
    bound: extra ids cost little in a memory-bound forward); else the configured figure.
    """
    one = [e.verify_s for e in calls if is_one_token_call(e)]
    if one:
        return statistics.median(one), f"measured: median of {len(one)} one-token cloud calls"
    if known_call_s is not None:
        return known_call_s, "measured: median one-token cloud call of earlier runs on this verifier"
    later = [e.verify_s for e in calls[1:]]
    if later:
        return min(later), f"measured: cheapest of {len(later)} cloud calls after the prompt (an upper bound)"
    return link.cloud_verify_time_s, "modelled: LinkConfig.cloud_verify_time_s"


def summarize(events: Sequence[TokenEvent], config: RunConfig, vocab_size: int, energy_methods: dict[str, str],
              known_call_s: float | None = None) -> Summary:
    """Totals of a run of `config` (its policy, device profile, link preset and u_th source are named for the
    record); `vocab_size` and `known_call_s` price the HLM counterfactual (`hlm_call_time`)."""
    link, n = config.link, len(events)
    calls = [e for e in events if e.source in CALLS]
    verified = [e for e in events if e.source in VERIFIED]
    uploads = sum(e.uploaded for e in events)
    accepted = sum(e.source == "cloud_accepted" for e in events)
    parts = {p: sum(e.energy_j.get(p, 0.0) for e in events) for p in DEVICE_PARTS}
    device_j = sum(parts.values())
    compute_s = sum(e.draft_s for e in events)
    per_call_s, basis = hlm_call_time(calls, link, known_call_s)
    hlm_j = hlm_device_energy(events, calls, parts["device_compute"], config, vocab_size, per_call_s)
    link_s = compute_s + sum(e.uplink_s + e.wait_s for e in events)
    wall_s = events[-1].wall_s if events else 0.0
    wires_up = [e.wire_bytes_up for e in events if e.wire_bytes_up is not None]
    wires_down = [e.wire_bytes_down for e in events if e.wire_bytes_down is not None]
    return Summary(
        policy=config.policy.name,
        tokens=n,
        uploads=uploads,
        upload_rate=uploads / n if n else 0.0,
        llm_calls=len(calls),
        accepted=accepted,
        resampled=sum(e.source == "cloud_resampled" for e in events),
        unverified=sum(e.source == "unverified" for e in events),
        acceptance_rate=accepted / len(verified) if verified else None,
        uplink_bits=sum(e.bits_up for e in events),
        downlink_bits=sum(e.bits_down for e in events),
        wire_bytes_up=sum(wires_up) if wires_up else None,
        wire_bytes_down=sum(wires_down) if wires_down else None,
        device_energy_j=device_j,
        device_energy_parts_j=parts,
        link_energy_j=parts["radio"] + parts["device_idle"],
        cloud_energy_j=sum(e.energy_j.get("cloud", 0.0) for e in events),
        hlm_device_energy_j=hlm_j,
        energy_saving=1.0 - device_j / hlm_j if hlm_j else None,
        hlm_call_s=per_call_s,
        hlm_call_basis=basis,
        device_compute_s=compute_s,
        cloud_compute_s=sum(e.verify_s for e in calls),
        wall_s=wall_s,
        tokens_per_s=n / wall_s if wall_s > 0 else 0.0,
        tokens_per_s_modelled_link=n / link_s if link_s > 0 else 0.0,
        energy_methods=dict(energy_methods),
        device_profile=config.device.name,
        link_preset=link_label(config.link_preset, link),
        u_th_source=config.u_th_source,
    )


def hlm_device_energy(events: Sequence[TokenEvent], calls: Sequence[TokenEvent], compute_j: float,
                      config: RunConfig, vocab_size: int, call_s: float) -> float | None:
    """The HLM counterfactual: the same tokens, each uploaded alone with a full payload and one cloud call of
    `call_s`, on this run's device compute; None for a policy that drafts nothing (there is no draft to upload)."""
    if not POLICIES[config.policy.name].drafts or not events or compute_j <= 0:
        return None
    link = config.link
    bits = upload_bits(link, vocab_size, 1)
    first = upload_cost(link, bits, calls[0].verify_s if calls else call_s)  # it also prefills the prompt
    cost = upload_cost(link, bits, call_s)
    return compute_j + first.radio_j + first.idle_j + (len(events) - 1) * (cost.radio_j + cost.idle_j)


def faithful_prefix(ids: Sequence[int], reference: Sequence[int]) -> int:
    """How many tokens of `reference` `ids` reproduce before the first difference (greedy quality: exact)."""
    return next((i for i, (a, b) in enumerate(zip(ids, reference, strict=False)) if a != b),
                min(len(ids), len(reference)))
