"""The bench's 'how close to the limit' rows: the bytes a decode step reads against a hand count, the held-back
prompt choice, and the new sections on the tiny pair (values sane, never timed against a figure)."""

import functools
import re

import pytest
from transformers import Qwen2ForCausalLM

from hlm.cli.main import main
from hlm.experiments.bench import bench, spread
from hlm.experiments.roofline import decode_bytes, measure_bandwidth
from hlm.models.presets import load_unquantised
from hlm.models.tiny import VOCAB_SIZE, tiny_role
from hlm.quant import quantize
from hlm.session import open_decoder

# The tiny draft by hand: hidden 64, MLP 128, 2 layers, 4 heads of 16 with 2 k/v heads (k/v width 32), fp32.
H, MLP, LAYERS, KV, V, F32 = 64, 128, 2, 32, VOCAB_SIZE, 4
# Per layer (out, in, bias): q, k, v (Qwen2 biases), o, gate, up, down.
LINEARS = [(H, H, True), (KV, H, True), (KV, H, True), (H, H, False), (MLP, H, False), (MLP, H, False),
           (H, MLP, False)]
NORMS = (2 * LAYERS + 1) * H * F32  # two per layer and the final one, fp32


def hand_count(linear_bytes, head_bytes: int, embedding_bytes: int) -> int:
    layers = LAYERS * sum(linear_bytes(out, inp) + (out * F32 if bias else 0) for out, inp, bias in LINEARS)
    return layers + NORMS + head_bytes + embedding_bytes


def test_decode_bytes_tied_head_reads_the_whole_embedding_once():
    model = tiny_role("draft", "eager")
    assert model.config.tie_word_embeddings
    read = decode_bytes(model, context=10)
    assert read.weights == hand_count(lambda o, i: o * i * F32, V * H * F32, 0)  # the head's matrix is the embedding
    assert read.kv_cache == 2 * LAYERS * KV * 10 * F32


def test_decode_bytes_untied_embedding_reads_one_row():
    config = tiny_role("draft", "eager").config
    config.tie_word_embeddings = False
    model = Qwen2ForCausalLM(config)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    read = decode_bytes(model, context=0)
    assert read.weights == hand_count(lambda o, i: o * i * F32, V * H * F32, H * F32)
    assert read.kv_cache == 0


def test_decode_bytes_counts_int8_codes_and_scales_and_unties_the_head():
    model = quantize(tiny_role("draft", "eager"), "int8")  # tied in the config; the head gets int8 rows of its own
    read = decode_bytes(model, context=3)
    int8 = lambda o, i: o * i + o * F32  # noqa: E731 - one byte a weight, one fp32 scale per output channel
    assert read.weights == hand_count(int8, int8(V, H), H * F32)
    assert read.kv_cache == 2 * LAYERS * KV * 3 * F32


def test_decode_bytes_counts_int4_packed():
    model = quantize(tiny_role("draft", "eager"), "int4")  # groups of 32: a scale and a zero each; head int8
    int4 = lambda o, i: o * i // 2 + (i // 32) * o * 2 * F32  # noqa: E731
    assert decode_bytes(model, 0).weights == hand_count(int4, V * H + V * F32, H * F32)


def test_spread_takes_the_first_of_each_category_then_the_rest_in_order():
    rows = [{"category": c, "prompt": f"{c}{i}"} for i, c in enumerate("aabcab")]
    assert [r["prompt"] for r in spread(rows, 4)] == ["a0", "b2", "c3", "a1"]
    assert len(spread(rows, 99)) == len(rows)


def test_bandwidth_is_measured():
    bw = measure_bandwidth(mib=32, repeats=2)
    assert bw.read_gbs > 0 and bw.copy_gbs > 0 and bw.bound == max(bw.read_gbs, bw.copy_gbs)


def test_limit_and_heldout_rows_on_the_tiny_pair():
    decoder = open_decoder("tiny", quant="int8")  # a fast path, so every model has a plain and a shipped row
    rows = bench(decoder, functools.partial(load_unquantised, "tiny"), ("limit", "heldout"), n_tokens=4,
                 repeats=1, prompt="Say hi.", guard_prompts=0, n_prompts=2, bandwidth_mib=32)
    values = {name: value for name, value, _ in rows}
    bandwidth = [v for n, v in values.items() if n.startswith("(r) memory bandwidth, measured")]
    assert len(bandwidth) == 2 and min(bandwidth) > 0
    for role in ("draft", "verifier"):
        for path in ("float32 plain", "int8 shipped"):
            assert values[f"(r) {role} {path}: decode step tok/s"] > 0
            assert values[f"(r) {role} {path}: fraction of the bandwidth bound"] > 0
        plain, shipped = (values[f"(r) {role} {p}: MB read per token"] for p in ("float32 plain", "int8 shipped"))
        assert 0 < shipped < plain
    held = {name: (value, note) for name, value, note in rows if name.startswith("(h)")}
    assert len(held) == 6 and all(value > 0 for value, _ in held.values())
    assert held["(h) project SLM decode (slm policy, draft int8), mean tok/s"][1] == "mean upload rate 0%"
    assert "2 held-back prompts x 4 tokens, greedy" in held["(h) verifier plain generate (float32), mean tok/s"][1]
    assert {"(h) ratio: project SLM / plain generate of the draft",
            "(h) ratio: default ours / plain generate of the verifier"} <= held.keys()


def test_the_guard_row_says_how_many_positions_it_compared_and_how_many_differ():
    decoder = open_decoder("tiny", quant="int8")
    rows = bench(decoder, functools.partial(load_unquantised, "tiny"), ("plain",), n_tokens=4, repeats=1,
                 prompt="Say hi.", guard_prompts=2, n_prompts=1, bandwidth_mib=32)
    guard = {name.split(":")[0]: (value, note) for name, value, note in rows if "guard: top-1" in name}
    assert set(guard) == {"(p) draft guard", "(p) verifier guard"}
    for top1, note in guard.values():
        match = re.fullmatch(r"target >= 99 %, 2 prompts x 32 tokens: (\d+) of (\d+) positions apart", note)
        assert match, note
        apart, n = map(int, match.groups())
        assert 0 < n <= 2 * 32 and apart == round((1 - top1) * n)


def test_rows_section_times_steps_of_several_new_tokens():
    decoder = open_decoder("tiny", quant="int8")
    seen: list[int] = []
    hook = decoder.pair.verifier.register_forward_pre_hook(lambda _, args, kwargs: seen.append(
        kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        rows = bench(decoder, functools.partial(load_unquantised, "tiny"), ("rows",), n_tokens=4, repeats=1,
                     prompt="Say hi.", guard_prompts=0, n_prompts=1, bandwidth_mib=32)
    finally:
        hook.remove()
    values = {name: value for name, value, _ in rows}
    assert len(values) == 8 and all(value > 0 for value in values.values())
    assert values["(n) verifier int8 shipped: 1 row a step, ms"] > 0
    assert "(n) draft int8 shipped: 8 rows a step, time per row / one row's" in values
    assert {2, 4, 8} <= set(seen) and seen.count(8) >= 8  # a step of 8 new tokens, timed 8 times


def test_overhead_rows_on_the_tiny_pair():
    decoder = open_decoder("tiny")
    rows = bench(decoder, functools.partial(load_unquantised, "tiny"), ("overhead",), n_tokens=4, repeats=1,
                 prompt="Say hi.", guard_prompts=0, n_prompts=1, bandwidth_mib=32)
    values = {name: value for name, value, _ in rows}
    assert values["(a) draft step with the judge, ms"] > 0 and values["(a) draft step with ubar, ms"] > 0
    assert values["(a) overhead of the judge per draft"] == pytest.approx(
        values["(a) the judge's own work per draft, us"] / 1e6 / (values["(a) draft step with ubar, ms"] / 1e3))
    assert "(a) overhead as the two runs' difference" in values
    assert decoder.verifier.remember is False  # its repeated runs time every pass: none served (`hlm.verifier.Track`)


def test_an_unknown_section_is_refused():
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--models", "tiny", "--sections", "limit,nope"])
    assert exc.value.code == 2


@pytest.mark.parametrize("kind", ["packed", "wide"])
def test_a_model_with_packed_or_widened_layers_is_not_its_own_plain_reference(tmp_path, kind):
    """Plain `generate` is timed on plain transformers: a pair's unquantised model is its own reference only while no
    layer of it runs packed (`hlm.quant.PackedLinear`, faster than transformers' own bf16 product) or widened
    (`hlm.quant.WideLinear`, bf16 prompts in fp32 where oneDNN has no bf16)."""
    import torch
    from test_quant import file_backed_linear

    from hlm.experiments.bench import _plain
    from hlm.models.tiny import tiny_pair
    from hlm.quant import PackedLinear, WideLinear

    linear = file_backed_linear(tmp_path, 272, 320, False)
    packed = PackedLinear.of(linear) if kind == "packed" else WideLinear(linear)
    if packed is None:
        pytest.skip("oneDNN cannot pack bf16 on this CPU (AVX2 alone)")
    pair, loads = tiny_pair(), []

    def load(role, device, dtype, attention):
        loads.append(role)
        return tiny_role(role, attention)

    assert _plain(pair, load, "draft", torch.float32) is pair.draft and not loads
    pair.draft.add_module("packed", packed)
    assert _plain(pair, load, "draft", torch.float32) is not pair.draft and loads == ["draft"]
