"""The real embedded pair end to end (slow: loads Qwen2.5-Coder 0.5B + 1.5B; CI runs it)."""

import pytest
import torch

from hlm.config import PolicyConfig, RunConfig, SamplingConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    torch.set_num_threads(2)
    from hlm.decoder import HybridDecoder
    from hlm.models import load_pair

    yield HybridDecoder(load_pair("embedded"))
    torch.set_num_threads(1)


def test_embedded_pair_shares_one_vocabulary_and_masks_fillers(embedded):
    pair = embedded.pair
    assert pair.vocab_size == 151_936 and int(pair.valid.sum()) == 151_665
    assert not pair.valid[151_665:].any() and pair.valid[151_664]  # "[PAD...]" rows of the GGUF tokenizer
    assert pair.tokenizer.convert_tokens_to_ids("<|im_end|>") in pair.stop_ids


@pytest.mark.parametrize("policy", ["ours", "hlm"])
def test_embedded_pair_generates_code(embedded, policy):
    cfg = RunConfig(SamplingConfig(temperature=0.0, max_new_tokens=12),
                    PolicyConfig(name=policy, u_th=0.05, k=8, gamma=0.5))
    text, events, summary = embedded.run("Write a Python function that reverses a string.", cfg)
    assert len(events) == 12 and text.strip()
    assert "def" in text or "```" in text
    if policy == "hlm":
        assert summary["llm_calls"] == 12 and summary["energy_saving"] == pytest.approx(0.0, abs=0.02)
    else:
        assert all(e.score is not None and e.uploaded == (e.score >= e.score_threshold) for e in events)
        assert summary["uploads"] <= 12


@pytest.mark.parametrize(("role", "recipe", "int4", "planes", "ggml"),
                         [("verifier", "q4k", 168, 0, 197), ("draft", "gguf", 157, 145, 169)])
def test_embedded_models_run_their_own_gguf_blocks(embedded, role, recipe, int4, planes, ggml):
    """Where a kernel on the blocks measures faster than float (the load says which), each model's layers run on
    their GGUF blocks: on ggml every layer the GGUF stores (the verifier's 168 Q4_K and 29 Q6_K ones, the draft's 169
    of four formats); on torch's int4 kernel the verifier's 168 Q4_K layers as one 4-bit plane each, the draft's 12
    Q4_K layers so too and its 145 Q5_0 and Q8_0 layers as two. Each computes what its converted bf16 weight does,
    to the rounding of the group scales (and, on ggml, of the activations to 8 bits a block)."""
    from safetensors import safe_open

    from hlm import memory
    from hlm.models import embedded as files
    from hlm.quant import GgmlLinear, Int4Linear, PlanesLinear

    model = getattr(embedded.pair, role)
    taken = getattr(model, "hlm_quant", "none")
    if taken not in (recipe, "ggml"):
        # measured slower on this CPU; the reason names the fastest of the two kernels
        assert embedded.pair.quant[role].startswith(("none (auto: ggml", f"none (auto: {recipe}"))
        pytest.skip(embedded.pair.quant[role])
    if taken == "ggml":
        layers = [m for m in model.modules() if isinstance(m, GgmlLinear)]
        assert len(layers) == ggml
        assert all(memory.file_backed(m.blocks) for m in layers)  # ggml runs the stored blocks in place: no copy
    else:
        assert sum(isinstance(m, Int4Linear) for m in model.modules()) == int4  # a plane layer holds one of 2n rows
        assert sum(isinstance(m, PlanesLinear) for m in model.modules()) == planes
    layer = model.model.layers[3].mlp.up_proj
    with safe_open(files.model_dir(getattr(files, role.upper())) / "model.safetensors", "pt") as f:
        weight = f.get_tensor("model.layers.3.mlp.up_proj.weight").float()
    x = torch.randn(2, weight.shape[1])
    err = (layer(x.bfloat16()).float() - x @ weight.T).norm() / (x @ weight.T).norm()
    assert err < 0.02


@pytest.mark.parametrize("every", [3, 9])
def test_embedded_verifier_syncs_give_bitwise_the_one_row_logits(embedded, every):
    """On the real verifier (q4k, or bf16 where that measured faster) a sync of kept drafts sees what the LLM alone
    sees, one token a pass: without `hlm.rows` the logits differed by up to 0.19."""
    from test_rows import worst_gap

    assert worst_gap(embedded.pair, every) == 0.0


def test_embedded_float_layers_run_packed_with_the_same_products(embedded, tmp_path):
    """What no GGUF block fits (the Q6_K layers, kept bf16) runs on oneDNN's packed weights: the product `F.linear`
    computes, bit for bit, with the weights read once a step (docs/speed.md)."""
    import torch.nn.functional as F
    from test_quant import can_pack

    from hlm.quant import PackedLinear, recipe_of

    if not can_pack(tmp_path):
        pytest.skip("oneDNN cannot pack bf16 on this CPU (AVX2 alone), or the OS keeps the pages")
    for role in ("draft", "verifier"):
        packed = [m for m in getattr(embedded.pair, role).modules() if isinstance(m, PackedLinear)]
        why, note = embedded.pair.quant[role], f" ({len(packed)} bf16 layers packed)"
        if not packed and "ggml, " in why:  # auto took ggml, which runs every layer on its blocks (Q6_K too)
            continue
        assert packed and note in why  # at the end, or inside the llama.cpp draft's note on what it was taken over
        assert recipe_of(why) == recipe_of(why.replace(note, "", 1))  # the numerics' key, as before packing
        x = torch.randn(4, packed[-1].in_features, dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(packed[-1](x), F.linear(x, packed[-1].weight, packed[-1].bias))
