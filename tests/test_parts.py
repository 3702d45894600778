"""The pure pieces: payload encoding, config validation, uncertainty, importance, policies, link model."""

import math

import numpy as np
import pytest
import torch

from hlm.config import ConfigError, LinkConfig, PolicyConfig, RunConfig, SamplingConfig
from hlm.importance import score
from hlm.link import upload_bits, upload_cost
from hlm.payload import PayloadError, as_sent, decode, encode, payload_bits
from hlm.policies import should_upload
from hlm.uncertainty import uncertainty


def probs(v=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(v, generator=g) * 3, -1)


@pytest.mark.parametrize("bits,tol", [(32, 1e-6), (16, 1e-3), (8, 0.06)])
def test_full_payload_roundtrip(bits, tol):
    p = probs()
    data = encode(p, bits)
    assert len(data) * 8 == payload_bits(1000, bits, 0)
    q = decode(data, 1000)
    assert abs(float(q.sum()) - 1) < 1e-5
    assert float((q - p).abs().max() / p.max()) < tol


@pytest.mark.parametrize("bits", [32, 16, 8])
def test_topk_payload_is_the_truncated_renormalised_distribution(bits):
    """The device sends the top k renormalised and rounded so that no residual mass is left to spread: a draft
    from the decoded form is always one of the k, never a token the SLM gives no mass (e.g. a filler id)."""
    p = probs()
    q = decode(encode(p, bits, topk=16), 1000)
    top = p.topk(16).indices
    tol = {32: 1e-6, 16: 2e-3, 8: 0.1}[bits]  # 8-bit: half a code (4.8 %) per value, and the renormalisation
    torch.testing.assert_close(q[top], p[top] / p[top].sum(), rtol=tol, atol=1e-7)
    rest = torch.ones(1000, dtype=torch.bool)
    rest[top] = False
    assert float(q[rest].abs().max()) == 0.0
    assert payload_bits(151_936, 16, 16) < payload_bits(151_936, 16, 0) / 1000


def test_a_topk_residual_from_another_sender_is_spread_uniformly():
    import struct

    idx, vals = np.array([3, 7], dtype="<u4"), np.array([0.5, 0.25], dtype="<f4")
    q = decode(struct.pack("<4sBBII", b"HLMP", 32, 1, 10, 2) + idx.tobytes() + vals.tobytes(), 10)
    assert float(q[3]) == 0.5 and float(q[7]) == 0.25
    torch.testing.assert_close(q[[0, 1, 2, 4, 5, 6, 8, 9]], torch.full((8,), 0.25 / 8))


def _distributions():
    """Drafts as the decoder sees them: a softmax, one with masked (filler / top-p) zeros, a one-hot (greedy)."""
    soft = probs()
    masked = soft.clone()
    masked[900:] = 0.0
    masked[: 200] = 0.0
    greedy = torch.zeros(1000)
    greedy[42] = 1.0
    return {"softmax": soft, "masked": masked / masked.sum(), "greedy": greedy}


@pytest.mark.parametrize("bits,topk", [(32, 0), (16, 0), (8, 0), (32, 16), (16, 16), (8, 16), (16, 999)])
@pytest.mark.parametrize("kind", ["softmax", "masked", "greedy"])
def test_as_sent_is_what_the_cloud_decodes(bits, topk, kind):
    """p_hat (what the draft is sampled from) equals, bit for bit, what the verifier decodes from the bytes;
    it is a distribution with no mass where p has none, and a greedy one-hot survives every format."""
    p = _distributions()[kind]
    data, sent = as_sent(p, bits, topk)
    assert data == encode(p, bits, topk)
    assert torch.equal(decode(data, 1000), sent) and sent.dtype == torch.float32
    assert len(data) * 8 == payload_bits(1000, bits, topk)
    assert abs(float(sent.sum()) - 1.0) < 1e-5
    assert not sent[p == 0].any()
    if kind == "greedy":
        assert torch.equal(sent, p)
    elif not topk and bits == 32:
        torch.testing.assert_close(sent, p, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mutate", [
    lambda d: d[:5],
    lambda d: b"XXXX" + d[4:],
    lambda d: d + b"\0",
    lambda d: d[:-2],
])
def test_malformed_payloads_are_rejected(mutate):
    with pytest.raises(PayloadError):
        decode(mutate(encode(probs(), 16)), 1000)


def test_payload_of_another_vocabulary_is_rejected():
    with pytest.raises(PayloadError, match="vocabulary"):
        decode(encode(probs(), 16), 999)


@pytest.mark.parametrize("make", [
    lambda: PolicyConfig(k=0), lambda: PolicyConfig(gamma=-0.1), lambda: PolicyConfig(u_th=1.5),
    lambda: PolicyConfig(u_th=-0.01), lambda: PolicyConfig(name="nope"), lambda: SamplingConfig(temperature=-1),
    lambda: SamplingConfig(max_new_tokens=0), lambda: SamplingConfig(top_p=0), lambda: LinkConfig(bits_per_prob=12),
    lambda: LinkConfig(bandwidth_hz=0), lambda: LinkConfig(snr_db=float("nan")),
    lambda: RunConfig.from_dict({"policy": {"kk": 3}}),
])
def test_out_of_range_settings_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


def test_run_config_roundtrips_through_dicts():
    cfg = RunConfig().with_policy(name="uhlm", k=3)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_uncertainty_is_zero_when_peaked_and_high_when_flat():
    g = torch.Generator().manual_seed(0)
    peaked = torch.full((500,), -30.0)
    peaked[7] = 30.0
    assert uncertainty(peaked, 7, 20, 2.0, g) == (0.0, 0.0)
    assert uncertainty(torch.zeros(500), 7, 20, 2.0, g).u > 0.9
    assert uncertainty(torch.zeros(500), 7, 20, 2.0, g).ubar > 0.99


def test_uncertainty_matches_its_definition_in_expectation():
    """E[u] = E_theta[1 - softmax(z/theta)[d]]: compare the Gumbel estimate with numerical integration."""
    z = torch.tensor([2.0, 1.0, 0.5, 0.0])
    g = torch.Generator().manual_seed(1)
    draws = [uncertainty(z, 0, 20, 2.0, g) for _ in range(2000)]
    thetas = torch.linspace(1e-3, 2.0, 20001)
    exact = float((1 - torch.softmax(z[None] / thetas[:, None], -1)[:, 0]).mean())
    assert abs(sum(d.u for d in draws) / 2000 - exact) < 0.01
    assert abs(sum(d.ubar for d in draws) / 2000 - exact) < 0.005
    assert torch.tensor([d.ubar for d in draws]).std() < torch.tensor([d.u for d in draws]).std() / 2


def test_importance_excludes_sinks_and_uses_the_adaptive_threshold():
    row = torch.tensor([0.6, 0.1, 0.02, 0.02, 0.2, 0.02, 0.04])  # query at 6, candidate 4 stands out
    imp = score(row, 4, k=1, gamma=1.0, sink_tokens=2)
    assert imp.rank == 0 and imp.important
    # sinks and the query itself are excluded from the renormalised row
    assert math.isclose(imp.score, 0.2 / (0.02 + 0.02 + 0.2 + 0.02), rel_tol=1e-6)
    assert not score(row, 5, k=3, gamma=1.0, sink_tokens=2).important  # below tau
    assert not score(row, 4, k=1, gamma=10.0, sink_tokens=2).important  # stricter gamma
    assert score(row, 6, k=8, gamma=0.0, sink_tokens=2).rank >= 0  # self estimator: the query scores itself


def test_policies_are_pure_functions_of_the_statistics():
    assert not should_upload(PolicyConfig(name="slm"), 1.0, 0.5)
    assert should_upload(PolicyConfig(name="hlm"), 0.0, 0.5)
    assert should_upload(PolicyConfig(name="uhlm", u_th=0.2), 0.3, 0.5)
    assert not should_upload(PolicyConfig(name="uhlm", u_th=0.2), 0.2, 0.5)
    assert should_upload(PolicyConfig(name="random", skip_rate=0.25), None, 0.5)  # the coin alone decides
    assert not should_upload(PolicyConfig(name="random", skip_rate=0.75), None, 0.5)
    with pytest.raises(ValueError):
        should_upload(PolicyConfig(name="ours"), 0.5, 0.5)  # ours asks its estimator (tests/test_estimators.py)


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


def test_log_normaliser_matches_the_exact_logsumexp():
    from hlm.uncertainty import log_normaliser

    g = torch.Generator().manual_seed(3)
    z = torch.randn(151_936, generator=g) * 2.5
    z[11] = 22.0
    thetas = torch.tensor([1e-3, 0.05, 0.3, 1.0, 2.0])
    exact = torch.stack([torch.logsumexp((z.double() - 22.0) / t, 0) for t in thetas.double()])
    assert float((log_normaliser(z, thetas).double() - exact).abs().max()) < 1e-4


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
    s = summarize(run, link, 1000, "hlm", {})
    assert s.energy_saving == pytest.approx(0.0, abs=1e-12) and s.hlm_call_s == 0.5
    # Keeping every token local saves exactly the radio and idle energy HLM would spend.
    local = summarize([event(i, "local") for i in range(8)], link, 1000, "slm", {}, known_call_s=0.5)
    assert local.hlm_device_energy_j == pytest.approx(8 * (1.0 + cost.radio_j + cost.idle_j))
