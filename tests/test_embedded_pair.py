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


def test_embedded_verifier_runs_its_own_q4k_blocks(embedded):
    """Where the int4 kernel measures faster (the load says which), the verifier's 168 Q4_K layers run on their
    GGUF codes: each computes what its converted bf16 weight does, to the rounding of the group scales."""
    from safetensors import safe_open

    from hlm.models import embedded as files
    from hlm.quant import Int4Linear

    verifier = embedded.pair.verifier
    if getattr(verifier, "hlm_quant", "none") != "q4k":
        assert embedded.pair.quant["verifier"].startswith("none (auto: q4k")  # measured slower on this CPU
        pytest.skip(embedded.pair.quant["verifier"])
    assert sum(isinstance(m, Int4Linear) for m in verifier.modules()) == 168
    layer = verifier.model.layers[3].mlp.up_proj
    with safe_open(files.model_dir(files.VERIFIER) / "model.safetensors", "pt") as f:
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
