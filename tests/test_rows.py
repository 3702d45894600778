"""The verifier's short passes compute each row as a one-row pass does (`hlm.rows`): a sync of kept drafts gives
bitwise the logits the LLM alone sees, one token a pass, so greedy HLM gives the LLM alone's tokens. Without it the
tiny pair's logits differ by ~4e-5 (SDPA and eager alike), the embedded pair's q4k verifier's by up to 0.19."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hlm import rows
from hlm.config import PolicyConfig, RunConfig, SamplingConfig
from hlm.decoder import HybridDecoder
from hlm.models.pairs import ModelPair
from hlm.verifier import LocalVerifier

PROMPT = "Write a Python function that merges two sorted lists."
ANSWER = " def merge(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n        out += a[i]"


def worst_gap(pair: ModelPair, every: int) -> float:
    """The largest logit difference between a verifier that syncs `every` tokens of ANSWER at a time (the first
    sync reads the prompt and the kept tokens after it) and one that reads a token a pass."""
    sampling = SamplingConfig(temperature=0.0)
    prompt = list(pair.encode_prompt(PROMPT, 64))
    answer = pair.tokenizer.encode(ANSWER)
    one, block = (LocalVerifier(pair.verifier, pair.valid, head=pair.template_head) for _ in range(2))
    one.open(sampling, prompt)
    block.open(sampling, prompt)
    gap = 0.0
    for i in range(len(answer) + 1):
        one._sync(prompt + answer[:i])
        if i and i % every == 0:
            block._sync(prompt + answer[:i])
            gap = max(gap, (block.last_logits.float() - one.last_logits.float()).abs().max().item())
    return gap


@pytest.mark.parametrize("every", [2, 3, 5, rows.EXACT_ROWS, rows.EXACT_ROWS + 4])
def test_a_sync_gives_bitwise_the_one_row_logits(tiny, every):
    assert worst_gap(tiny, every) == 0.0


@pytest.mark.parametrize("size", [1, rows.BLOCK])
def test_syncs_are_exact_in_either_block_of_rows(tiny, size):
    """The block is measured per machine (`block_rows`); the tiny pair's syncs are exact in both sizes."""
    layers = [m for m in tiny.verifier.modules() if isinstance(m, rows.BlockLinear)]
    measured = layers[0].block
    try:
        for layer in layers:
            layer.block = size
        assert worst_gap(tiny, 5) == 0.0
    finally:
        for layer in layers:
            layer.block = measured


@pytest.mark.parametrize(("block_cost", "expected"), [(1.1, rows.BLOCK), (2.0, rows.BLOCK), (2.5, 1), (4.0, 1)])
def test_the_block_of_rows_is_chosen_by_what_a_block_costs_here(monkeypatch, block_cost, expected):
    """A block costing c rows loses c-fold on a one-token pass and gains 4/c-fold on a full one: blocks up to 2."""
    monkeypatch.setattr(rows, "float_passes", lambda n, k, dtype, counts: list(counts))  # a pass known by its rows
    monkeypatch.setattr(rows, "streamed_seconds", lambda *layers: [1e-3 * (block_cost if n > 1 else 1) for n in layers])
    rows.block_rows.cache_clear()
    try:
        assert rows.block_rows("cpu", torch.bfloat16) == expected
        assert rows.block_rows("cuda", torch.bfloat16) == rows.BLOCK  # a GPU reads the weights once: not measured
    finally:
        rows.block_rows.cache_clear()


def test_a_pinned_block_is_taken_without_measuring(monkeypatch):
    """$HLM_BLOCK_ROWS (what a run's Ray workers are told) wins over the timing; a bad value is a clear error."""
    from hlm.config import ConfigError
    from hlm.models.tiny import tiny_role

    monkeypatch.setattr(rows, "block_rows", lambda *args: pytest.fail("measured although pinned"))
    monkeypatch.setenv(rows.BLOCK_ENV, "3")
    verifier = rows.exact_rows(tiny_role("verifier", rows.KERNEL))
    assert verifier.hlm_block_rows == 3
    assert {m.block for m in verifier.modules() if isinstance(m, rows.BlockLinear)} == {3}
    for bad in ("0", "four", str(rows.EXACT_ROWS + 1)):
        monkeypatch.setenv(rows.BLOCK_ENV, bad)
        with pytest.raises(ConfigError, match=rows.BLOCK_ENV):  # a setting: one line, no traceback
            rows.exact_rows(tiny_role("verifier", rows.KERNEL))


@pytest.mark.parametrize("size", [1, rows.BLOCK])
def test_a_block_linear_row_does_not_depend_on_the_rows_beside_it(size):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 272)
    block = rows.BlockLinear(linear, size)
    x = torch.randn(rows.EXACT_ROWS, 96)
    alone = torch.cat([block(x[i:i + 1]) for i in range(len(x))])
    for n in range(2, rows.EXACT_ROWS + 1):
        assert torch.equal(block(x[:n]), alone[:n])
    assert torch.allclose(alone, F.linear(x, linear.weight, linear.bias), atol=1e-5)
    long = torch.randn(rows.EXACT_ROWS + 1, 96)
    assert torch.equal(block(long), F.linear(long, linear.weight, linear.bias))  # a prompt chunk: one GEMM


def test_greedy_ours_keeps_the_llm_alones_token_wherever_the_cloud_decides(tiny):
    """Every token the verifier decides in a greedy `ours` run is the LLM alone's argmax for that context."""
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=40, stop_at_eos=False)
    decoder = HybridDecoder(tiny)
    events = list(decoder.generate(PROMPT, RunConfig(sampling, PolicyConfig(name="ours", k=12))))
    decided = [e for e in events if e.uploaded]
    assert decided and len(decided) < len(events)  # some drafts kept, so the verifier synced blocks
    prompt = list(tiny.encode_prompt(PROMPT, 40))
    alone = LocalVerifier(tiny.verifier, tiny.valid, head=tiny.template_head)
    alone.open(sampling, prompt)
    ids = [e.token_id for e in events]
    for e in decided:
        alone._sync(prompt + ids[:e.index])
        assert e.token_id == int(alone.last_logits.masked_fill(~tiny.valid, float("-inf")).argmax())


def test_a_padded_batch_keeps_sdpa_with_its_mask(tiny):
    """The study generates answers in left-padded batches: there the mask decides, not the row slicing."""
    ids = [list(tiny.encode_prompt(p, 8))[-6:] for p in ("Say hello.", "Why is the sky blue?")]
    ids[0][:2] = [tiny.tokenizer.pad_token_id] * 2
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    with torch.inference_mode():
        batch = tiny.verifier(input_ids=torch.tensor(ids), attention_mask=mask).logits
        alone = tiny.verifier(input_ids=torch.tensor([ids[0][2:]])).logits
    assert torch.allclose(batch[0, -1], alone[0, -1], atol=1e-4)
