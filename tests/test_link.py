"""`hlm.link`: upload size and the radio's time and energy."""

import pytest

from hlm.config import LinkConfig
from hlm.link import upload_bits, upload_cost
from hlm.payload import payload_bits


def test_link_model_follows_shannon_and_power_times_time():
    link = LinkConfig(bandwidth_hz=1e6, snr_db=0.0, tx_power_w=2.0, device_idle_power_w=0.5, rtt_s=0.01,
                      bits_per_prob=16, topk=0)
    assert link.uplink_rate_bps == pytest.approx(1e6)  # log2(1 + 1) = 1
    bits = upload_bits(link, 1000, n_sync_ids=3)
    assert bits == payload_bits(1000, 16, 0) + 32 * 4
    cost = upload_cost(link, bits, cloud_s=0.1)
    assert cost.uplink_s == pytest.approx(bits / 1e6)
    assert cost.radio_j == pytest.approx(2.0 * bits / 1e6)
    assert cost.idle_j == pytest.approx(0.5 * (0.1 + cost.bits_down / link.downlink_rate_bps + 0.01))
