"""`--quant ggml`: Linear layers on a GGUF's own blocks, multiplied by ggml (`hlm.ggml_kernel`, `hlm.quant.GgmlLinear`):
products close to the float weights the blocks decode to, each row independent of the rows beside it (the verifier's
exact syncs), prompt chunks on the float GEMM, head rows decoded alone, and `auto` weighing ggml against the guard's
recipe."""

from __future__ import annotations

import copy

import gguf
import pytest
import torch
from conftest import write_gguf
from gguf.quants import dequantize

from hlm import ggml_kernel, gguf_blocks, quant, rows
from hlm.quant import GgmlLinear, HeadRows, PlanesLinear

pytestmark = pytest.mark.skipif(not ggml_kernel.available(), reason="ggml-python is not installed")


def _layer(kind: str, n: int, k: int, seed: int = 0) -> tuple[GgmlLinear, torch.Tensor]:
    """A GgmlLinear on made-up blocks, and the float32 weights they decode to (gguf's own decoding)."""
    blocks = ggml_kernel.random_blocks(kind, n, k, seed)
    w = torch.from_numpy(dequantize(blocks, getattr(gguf.GGMLQuantizationType, kind)).reshape(n, k))
    return GgmlLinear(torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16), blocks, kind), w


@pytest.mark.parametrize("kind", ggml_kernel.KINDS)
def test_products_are_the_decoded_weights_with_8_bit_activations(kind):
    """ggml rounds each row of activations to 8 bits a block: within about 1 % of the float product, never exact
    (which would mean the float path ran)."""
    layer, w = _layer(kind, 96, 512, seed=1)
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    exact = x.float() @ w.T
    err = float((layer(x).float() - exact).norm() / exact.norm())
    assert 1e-4 < err < 0.02


@pytest.mark.parametrize("kind", ggml_kernel.KINDS)
def test_a_rows_product_does_not_depend_on_the_rows_beside_it(kind):
    """The verifier syncs up to EXACT_ROWS rows a pass and promises each row the LLM alone's logits."""
    layer, _ = _layer(kind, 64, 256, seed=2)
    x = torch.randn(rows.EXACT_ROWS, 256, dtype=torch.bfloat16)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    for n in range(2, rows.EXACT_ROWS + 1):
        assert torch.equal(layer(x[:n]), alone[:n])


def test_a_prompt_chunk_takes_the_float_gemm_on_decoded_weights():
    layer, w = _layer("Q4_K", 64, 256, seed=3)
    x = torch.randn(quant.INT4_PREFILL_ROWS, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    # The GEMM `quant._dequantised_gemm` runs: bf16 on the bf16-rounded weights where oneDNN has a bf16 GEMM, else
    # widened to fp32 and rounded back. Against the fp32 product alone, rounding the weights to bf16 moved outputs near
    # zero by 0.028 (AMX, one input of CI's), past this tolerance.
    gemm = torch.nn.functional.linear(x, w.bfloat16()) if quant.onednn_bf16() else (x.float() @ w.T).bfloat16()
    torch.testing.assert_close(layer(x).float(), gemm.float(), rtol=2e-2, atol=2e-2)
    index = torch.tensor([5, 0, 63])
    assert torch.equal(HeadRows(layer)[index], w[index])  # the semantic statistic's rows, decoded alone
    for dtype in (torch.float32, torch.bfloat16):  # the widened GEMM's buffer, and oneDNN's bf16 one
        buffer = torch.empty(32 * 256, dtype=dtype)  # as `_dequantised_gemm` slices it: rows 8 to 40
        assert torch.equal(layer._dequantised_t(buffer, 8, 40).T, w[8:40].to(dtype))


def test_a_copy_is_its_own_layer_to_the_compiled_op():
    """`hlm::ggml_mul_mat` finds a layer by its key: a copy gets a key of its own, so its op reads its own blocks."""
    layer, _ = _layer("Q8_0", 32, 256, seed=4)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.blocks[:, 2:] = 0  # every code zero: a product of zeros, unlike the original's
    x = torch.randn(1, 256)
    assert twin.key != layer.key
    assert torch.equal(torch.ops.hlm.ggml_mul_mat(x, twin.blocks, twin.key), torch.zeros(1, 32))
    assert torch.equal(torch.ops.hlm.ggml_mul_mat(x, layer.blocks, layer.key), layer.product(x))


def test_wrong_sized_blocks_are_refused():
    with pytest.raises(quant.QuantError, match="bytes of Q8_0 blocks"):
        GgmlLinear(torch.nn.Linear(256, 64), ggml_kernel.random_blocks("Q8_0", 32, 256), "Q8_0")


def _gguf_model(tmp_path) -> torch.nn.Module:
    """One Qwen2 layer whose up_proj is Q8_0 and down_proj Q6_K in its GGUF (each weight what its blocks decode
    to), the rest float."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()
    mlp = model.model.layers[0].mlp
    tensors = {}
    for name, layer, kind in (("blk.0.ffn_up.weight", mlp.up_proj, "Q8_0"), ("blk.0.ffn_down.weight", mlp.down_proj,
                                                                            "Q6_K")):
        blocks = ggml_kernel.random_blocks(kind, layer.out_features, layer.in_features, seed=len(name))
        w = dequantize(blocks, getattr(gguf.GGMLQuantizationType, kind)).reshape(layer.weight.shape)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w))
        tensors[name] = (blocks, getattr(gguf.GGMLQuantizationType, kind))
    path = tmp_path / "small.gguf"
    write_gguf(path, tensors)
    model.hlm_source = path
    return model


def test_ggml_runs_every_format_the_gguf_holds_and_gguf_only_its_planes(tmp_path):
    model = _gguf_model(tmp_path)
    assert set(gguf_blocks.from_gguf(model, model.hlm_source)) == {"model.layers.0.mlp.up_proj",
                                                                   "model.layers.0.mlp.down_proj"}
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fast = quant.quantize(copy.deepcopy(model), "ggml")
    mlp = fast.model.layers[0].mlp
    assert isinstance(mlp.up_proj, GgmlLinear) and isinstance(mlp.down_proj, GgmlLinear)
    assert isinstance(mlp.gate_proj, torch.nn.Linear)
    with torch.no_grad():
        assert float((fast(input_ids=ids).logits - before).abs().max()) < 0.05
    planes = quant.quantize(copy.deepcopy(model), "gguf")  # Q6_K does not fit torch's int4 kernel
    assert isinstance(planes.model.layers[0].mlp.up_proj, PlanesLinear)
    assert isinstance(planes.model.layers[0].mlp.down_proj, torch.nn.Linear)


@pytest.mark.parametrize(("ggml_s", "int4_s", "output", "taken"),
                         [(0.5e-3, 0.8e-3, False, "ggml"), (1e-3, 0.8e-3, False, "gguf"),
                          (0.8e-3, 0.8e-3, False, "ggml"), (0.8e-3, 0.8e-3, True, "gguf"),
                          (0.5e-3, 0.8e-3, True, "ggml"), (1.5e-3, 1.5e-3, False, "none")])
def test_auto_weighs_ggml_against_the_guards_recipe_over_the_same_layers(tmp_path, monkeypatch, ggml_s, int4_s,
                                                                         output, taken):
    """Each recipe is charged its kernel where it has blocks and float elsewhere (gguf leaves the Q6_K layer float),
    and the fastest is taken only if it beats float; on the model whose distribution is the output, ggml only if it
    beats the guard's recipe by GUARD_MARGIN (there 1.6 against 1.8 ms is a near-tie, which goes to gguf)."""
    from hlm.models import presets

    monkeypatch.setattr(presets, "float_layer", lambda n, k, dtype: ("float", n, k))
    monkeypatch.setattr(presets, "int4_layer", lambda n, k, dtype, planes: ("int4", n, k))
    monkeypatch.setattr(presets, "ggml_layer", lambda n, k, dtype, kind: ("ggml", n, k))
    seconds = {"float": 1e-3, "int4": int4_s, "ggml": ggml_s}
    monkeypatch.setattr(presets, "streamed_seconds", lambda *layers: [seconds[layer[0]] for layer in layers])
    model = _gguf_model(tmp_path)
    why = presets.fast_path(model, "auto", "gguf", output=output)
    # ggml: two layers at ggml_s; gguf: up_proj at int4_s and down_proj float (1 ms); float: 2 ms
    assert presets.GUARD_MARGIN == 1.25
    assert why.startswith(taken if taken != "none" else "none (auto: gguf")  # the fastest, named
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is {"ggml": GgmlLinear, "gguf": PlanesLinear, "none": torch.nn.Linear}[taken]


def test_a_compiled_step_calls_ggml_as_one_op_of_its_graph(tmp_path):
    """`--quant compiled` on a ggml draft: ggml's products are an op of the graph (`hlm::ggml_mul_mat`), not a break
    in it, and the step computes what the eager pass does, through a growing cache, in one graph."""
    from torch._dynamo.utils import counters
    from transformers import DynamicCache

    from hlm.compiled import CompiledStep

    model = quant.quantize(_gguf_model(tmp_path), "ggml")
    step = CompiledStep(model)
    caches = DynamicCache(), DynamicCache()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.inference_mode():  # as the drafter prefills: a cache made otherwise would compile the step again
        for cache in caches:
            model(input_ids=ids, cache=cache, use_cache=True)
        graphs = counters["stats"]["unique_graphs"]
        for token in (7, 2, 11):
            ids = torch.tensor([[token]])
            logits, _, _ = step(ids, caches[0])
            eager = model(input_ids=ids, cache=caches[1], use_cache=True).logits[:, -1]
            torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] - graphs == 1
