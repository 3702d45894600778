"""`hlm.metrics`: the run summary and its HLM counterfactual."""

import pytest

from hlm.config import LinkConfig, PolicyConfig, RunConfig
from hlm.link import upload_bits, upload_cost


def event(i, source, synced=1, verify_s=0.0, bits=0, compute_j=1.0, idle_j=0.0, radio_j=0.0):
    from hlm.events import TokenEvent

    return TokenEvent(index=i, position=10 + i, token_id=5, text="x", source=source, uploaded=source != "local",
                      synced_ids=synced, verify_s=verify_s, bits_up=bits,
                      energy_j={"device_compute": compute_j, "radio": radio_j, "device_idle": idle_j, "cloud": 0.0})


def test_hlm_counterfactual_prices_one_token_calls_not_the_runs_mean():
    from hlm.metrics import hlm_call_time, summarize

    link = LinkConfig()
    # The first call carries the prompt; later calls sync 1 or 6 ids (after skipped tokens: dearer).
    calls = [event(0, "cloud_accepted", synced=40, verify_s=2.0), event(1, "cloud_accepted", verify_s=0.5),
             event(2, "cloud_resampled", synced=6, verify_s=0.9), event(3, "cloud_accepted", verify_s=0.7),
             event(4, "cloud_accepted", verify_s=0.6)]
    assert hlm_call_time(calls, link) == (0.6, "measured: median of 3 one-token cloud calls")
    assert hlm_call_time(calls[:3:2], link, known_call_s=0.4)[0] == 0.4  # earlier runs' figure beats a guess
    assert hlm_call_time(calls[:3:2], link)[0] == 0.9  # the cheapest call after the prompt's
    assert hlm_call_time([], link)[0] == link.cloud_verify_time_s

    # An HLM run whose calls all take the same time is its own counterfactual: saving 0.
    bits = upload_bits(link, 1000, 1)
    cost = upload_cost(link, bits, 0.5)
    run = [event(i, "cloud_accepted", verify_s=0.5, bits=bits, radio_j=cost.radio_j, idle_j=cost.idle_j)
           for i in range(8)]
    s = summarize(run, RunConfig(policy=PolicyConfig(name="hlm"), link=link), 1000, {})
    assert s.energy_saving == pytest.approx(0.0, abs=1e-12) and s.hlm_call_s == 0.5
    # Keeping every token local saves exactly the radio and idle energy HLM would spend.
    slm = RunConfig(policy=PolicyConfig(name="slm"), link=link)
    local = summarize([event(i, "local") for i in range(8)], slm, 1000, {}, known_call_s=0.5)
    assert local.hlm_device_energy_j == pytest.approx(8 * (1.0 + cost.radio_j + cost.idle_j))
