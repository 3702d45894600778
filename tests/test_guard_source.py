"""`scripts/guard_source.py --recipe gguf`: a GGUF block of 5 or 8 bits as two 4-bit planes on torch's int4 kernel
computes the block's own weights."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import gguf
import pytest
import torch
from gguf.quants import dequantize, quantize
from test_app import ROOT

spec = importlib.util.spec_from_file_location("guard_source", ROOT / "scripts" / "guard_source.py")
guard_source = importlib.util.module_from_spec(spec)
spec.loader.exec_module(guard_source)
Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize(("kind", "low", "high"), [(Q.Q8_0, -127, 127), (Q.Q5_0, -16, 15), (Q.Q5_0, -15, 16)])
def test_two_planes_compute_the_blocks_weights(kind: Q, low: int, high: int) -> None:
    """Weights that are small integers times a power of two per row (each block holding the code range's far end,
    so the block's scale is that power of two, negative for Q5_0 when the far end is +16) are exact at every step in
    bf16: the planes must give them back bit for bit, and a wrong code, scale or zero would not."""
    torch.manual_seed(0)
    n, k = 64, 128
    ints = torch.randint(low, high + 1, (n, k // 32, 32)).float()
    ints[:, :, 0] = low if kind == Q.Q5_0 and low == -16 else high
    source = (ints * 2.0 ** -torch.randint(2, 9, (n, 1, 1)).float()).reshape(n, k)
    blocks = quantize(source.numpy(), kind)
    weight = torch.from_numpy(dequantize(blocks, kind).reshape(n, k).copy())
    assert torch.equal(weight, source)
    linear = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
    planes = guard_source.Planes(linear, SimpleNamespace(data=blocks, tensor_type=kind), weight)
    with torch.inference_mode():
        computed = planes(torch.eye(k, dtype=torch.bfloat16)).float().T  # row i of the identity reads column i
    assert torch.equal(computed, weight)
