"""The radio link and energy model of METHOD.md, as pure functions of `LinkConfig`.

Everything here is *modelled*: rates from Shannon's formula, energies from power x time. Measured figures
come from `hlm.energy` meters and replace the modelled ones where a hardware counter exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from hlm.config import LinkConfig
from hlm.payload import payload_bits

ACK_BITS = 8  # accept/resample flag sent back with the token id


@dataclass(frozen=True)
class UploadCost:
    bits_up: int
    bits_down: int
    uplink_s: float
    wait_s: float  # device waits: cloud compute + downlink + round trip
    radio_j: float
    idle_j: float


def upload_bits(link: LinkConfig, vocab_size: int, n_sync_ids: int, with_distribution: bool = True) -> int:
    """Draft id + its distribution + ids of the tokens kept locally since the last upload."""
    dist = payload_bits(vocab_size, link.bits_per_prob, link.topk) if with_distribution else 0
    return dist + link.token_id_bits * (n_sync_ids + (1 if with_distribution else 0))


def upload_cost(link: LinkConfig, bits_up: int, cloud_s: float) -> UploadCost:
    bits_down = link.token_id_bits + ACK_BITS
    uplink_s = bits_up / link.uplink_rate_bps
    wait_s = cloud_s + bits_down / link.downlink_rate_bps + link.rtt_s
    radio_j, idle_j = link.tx_power_w * uplink_s, link.device_idle_power_w * wait_s
    return UploadCost(bits_up, bits_down, uplink_s, wait_s, radio_j, idle_j)
