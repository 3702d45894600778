"""`hlm.payload`: the bytes a draft's distribution travels in, and what the cloud decodes from them."""

import numpy as np
import pytest
import torch

from hlm.payload import PayloadError, as_sent, decode, encode, payload_bits


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
