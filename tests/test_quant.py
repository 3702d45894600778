"""The fast path (`hlm.quant`): the quantised layers compute what their codes say, the quality guard can fail,
and the verifier's distribution stays exact on a quantised pair (`test_decoder`)."""

import copy

import pytest
import torch

from hlm.quant import Int4Linear, Int8Linear, quality, quantize


def test_int8_linear_is_the_matmul_of_its_dequantised_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    q = Int8Linear(lin)
    x = torch.randn(5, 64)
    w = q.weight_int8.float() * q.scale[:, None]
    torch.testing.assert_close(q(x), x @ w.T + lin.bias, rtol=1e-4, atol=1e-4)
    assert (w - lin.weight).abs().max() <= q.scale.max() / 2 + 1e-6  # rounding error at most half a step
    chunk = torch.randn(40, 64)  # a prompt chunk takes the dequantised GEMM: the same function
    torch.testing.assert_close(q(chunk), chunk @ w.T + lin.bias, rtol=1e-4, atol=1e-4)


def test_int4_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(3, 64)
    err = (Int4Linear(lin)(x) - lin(x)).norm() / lin(x).norm()
    assert 0 < err < 0.15  # 4 bits in groups of 32: close, not exact


def _sequences(pair):
    ids = [pair.encode_prompt(p, 8) for p in ("abc", "hello world", "a b c d e f")]
    return [i + [65, 66, 67, 68, 69, 70] for i in ids], [len(i) for i in ids]


def test_quality_guard_passes_int8_and_fails_a_different_model(tiny):
    fast = quantize(copy.deepcopy(tiny.draft), "int8")
    top1, kl = quality(tiny.draft, fast, *_sequences(tiny))
    assert top1 >= 0.99 and kl <= 0.01
    # The guard can fail: another model (the verifier of the pair) is far from the draft.
    top1, kl = quality(tiny.draft, tiny.verifier, *_sequences(tiny))
    assert top1 < 0.9 and kl > 0.1


def test_unknown_recipe_is_refused(tiny):
    with pytest.raises(ValueError, match="unknown quantisation"):
        quantize(copy.deepcopy(tiny.draft), "int3")
