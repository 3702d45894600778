"""Run totals from event records (a pure function: the app calls it on partial streams for live figures)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from hlm.config import LinkConfig, link_label
from hlm.events import ENERGY_PARTS, Summary, TokenEvent
from hlm.link import upload_bits, upload_cost

DEVICE_PARTS = ENERGY_PARTS[:3]
VERIFIED = ("cloud_accepted", "cloud_resampled")
CALLS = (*VERIFIED, "cloud_sampled")


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


def summarize(events: Sequence[TokenEvent], link: LinkConfig, vocab_size: int, policy: str,
              energy_methods: dict[str, str], known_call_s: float | None = None, *,
              device_profile: str = "this-machine", link_preset: str = "default", u_th_source: str = "given"
              ) -> Summary:
    """Totals of a run; `device_profile`, `link_preset` and `u_th_source` name the run's choices (`RunConfig`) for
    the record."""
    n = len(events)
    calls = [e for e in events if e.source in CALLS]
    verified = [e for e in events if e.source in VERIFIED]
    uploads = sum(e.uploaded for e in events)
    accepted = sum(e.source == "cloud_accepted" for e in events)
    parts = {p: sum(e.energy_j.get(p, 0.0) for e in events) for p in DEVICE_PARTS}
    device_j = sum(parts.values())
    cloud_s = sum(e.verify_s for e in calls)
    compute_s = sum(e.draft_s for e in events)

    # HLM counterfactual: the same tokens, each uploaded alone with a full payload and one cloud call.
    hlm_j = None
    per_call_s, basis = hlm_call_time(calls, link, known_call_s)
    if policy != "llm" and n and parts["device_compute"] > 0:
        bits = upload_bits(link, vocab_size, 1)
        first = upload_cost(link, bits, calls[0].verify_s if calls else per_call_s)  # it also prefills the prompt
        cost = upload_cost(link, bits, per_call_s)
        hlm_j = parts["device_compute"] + first.radio_j + first.idle_j + (n - 1) * (cost.radio_j + cost.idle_j)

    link_s = compute_s + sum(e.uplink_s + e.wait_s for e in events)
    wall_s = events[-1].wall_s if events else 0.0
    wires_up = [e.wire_bytes_up for e in events if e.wire_bytes_up is not None]
    wires_down = [e.wire_bytes_down for e in events if e.wire_bytes_down is not None]
    return Summary(
        policy=policy,
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
        cloud_compute_s=cloud_s,
        wall_s=wall_s,
        tokens_per_s=n / wall_s if wall_s > 0 else 0.0,
        tokens_per_s_modelled_link=n / link_s if link_s > 0 else 0.0,
        energy_methods=dict(energy_methods),
        device_profile=device_profile,
        link_preset=link_label(link_preset, link),
        u_th_source=u_th_source,
    )


def faithful_prefix(ids: Sequence[int], reference: Sequence[int]) -> int:
    """How many tokens of `reference` `ids` reproduce before the first difference (greedy quality: exact)."""
    return next((i for i, (a, b) in enumerate(zip(ids, reference, strict=False)) if a != b),
                min(len(ids), len(reference)))
