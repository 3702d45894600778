"""The fast path (`hlm.quant`): the quantised layers compute what their codes say, the quality guard can fail,
and the verifier's distribution stays exact on a quantised pair (`test_decoder`)."""

import copy
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_gguf
from gguf.quants import dequantize
from safetensors.numpy import save_file

from hlm import gguf_blocks, memory, quant, rows
from hlm.quant import (
    INT4_PREFILL_ROWS,
    HeadRows,
    Int4Linear,
    Int8Linear,
    PackedLinear,
    PlanesLinear,
    QuantError,
    Streamed,
    WideLinear,
    int4_row_block,
    onednn_bf16,
    pack_float_linears,
    quality,
    quantize,
    streamed_seconds,
)


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
    err = (Int4Linear.fitted(lin)(x) - lin(x)).norm() / lin(x).norm()
    assert 0 < err < 0.15  # 4 bits in groups of 32: close, not exact


def test_the_int4_packing_is_read_on_both_x86_vector_widths():
    """torch packs int4 codes by the CPU's vector width: blocks of 64 rows with AVX-512, 32 with AVX2 (both seen).
    Reading that packing is what lets a prompt chunk take the float GEMM and the semantic statistic read a head's
    rows; a torch that packs otherwise leaves both to the kernel, and this test says so."""
    width = torch.backends.cpu.get_cpu_capability()
    if width not in ("AVX512", "AVX2"):
        pytest.skip(f"no expectation for {width}")
    assert int4_row_block() == {"AVX512": 64, "AVX2": 32}[width]


def test_int4_prompt_chunks_run_on_the_dequantised_weights():
    """From INT4_PREFILL_ROWS rows a layer dequantises once and takes the float GEMM; fewer take the kernel. Both
    compute with the same weights, unpacked from the kernel's own packing."""
    torch.manual_seed(0)
    n, k = 128, 256
    codes, scale, zero = torch.randint(0, 16, (n, k)), torch.rand(n, k // 32) / 100, torch.rand(n, k // 32) / 100
    layer = Int4Linear(codes, scale, zero, None, torch.float32)
    w = ((codes.view(n, -1, 32) - 8) * scale[..., None] + zero[..., None]).view(n, k)
    assert layer.unpacks
    torch.testing.assert_close(layer.dequantised_t(torch.empty(n * k), 0, n).T, w, rtol=1e-6, atol=1e-6)
    x = torch.randn(INT4_PREFILL_ROWS, k)
    torch.testing.assert_close(layer(x), x @ w.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer(x[:3]), x[:3] @ w.T, rtol=1e-4, atol=1e-4)


def test_bf16_prompt_chunks_are_multiplied_in_fp32_where_onednn_has_no_bf16(monkeypatch):
    """With AVX2 alone torch multiplies bf16 rows at one slow rate, so a prompt chunk runs in fp32 (the dequantised
    int4 weights, and a plain bf16 layer copied a block at a time: `WideLinear`), rounded back to bf16; fewer rows,
    a decode step's, stay bf16."""
    from hlm import quant

    monkeypatch.setattr(quant, "onednn_bf16", lambda: False)
    torch.manual_seed(0)
    n, k = 128, 256
    codes, scale, zero = torch.randint(0, 16, (n, k)), torch.rand(n, k // 32) / 100, torch.rand(n, k // 32) / 100
    layer = Int4Linear(codes, scale, zero, None, torch.bfloat16)
    w = ((codes.view(n, -1, 32) - 8) * scale.bfloat16().float()[..., None] + zero.bfloat16().float()[..., None])
    x = torch.randn(INT4_PREFILL_ROWS, k, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, (x.float() @ w.view(n, k).T).bfloat16(), rtol=1e-2, atol=1e-3)

    model = torch.nn.Sequential(torch.nn.Linear(k, n, dtype=torch.bfloat16), torch.nn.Linear(n, 8))
    plain = torch.nn.Linear(k, n, dtype=torch.bfloat16)
    plain.load_state_dict(model[0].state_dict())
    assert pack_float_linears(model) == "1 bf16 layers with fp32 prompts"  # the fp32 layer stays as it was
    assert isinstance(model[0], quant.WideLinear) and isinstance(model[1], torch.nn.Linear)
    with torch.no_grad():
        for rows in (1, 4, quant.PREFILL_ROWS - 1):
            assert torch.equal(model[0](x[:rows]), plain(x[:rows]))
        wide = model[0](x)
        assert wide.dtype == torch.bfloat16
        fp32 = F.linear(x.float(), plain.weight.float(), plain.bias.float())
        torch.testing.assert_close(wide, fp32.bfloat16(), rtol=1e-2, atol=1e-3)


def test_prompt_chunks_dequantise_block_by_block(monkeypatch):
    """A layer larger than the scratch buffer is dequantised a block of output rows at a time: the same product."""
    from hlm import quant

    torch.manual_seed(0)
    lin, x = torch.nn.Linear(64, 320, bias=False), torch.randn(quant.INT4_PREFILL_ROWS, 64)
    int8, int4 = Int8Linear(lin), Int4Linear.fitted(lin)
    whole = int8(x), int4(x)
    monkeypatch.setattr(quant, "SCRATCH_WEIGHTS", 128 * 64)  # two int4 row blocks, 128 int8 rows
    monkeypatch.setattr(quant, "_scratch", quant.threading.local())
    with torch.inference_mode():  # the buffer made here serves passes outside inference mode too
        torch.testing.assert_close(int8(x), whole[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(int4(x), whole[1], rtol=1e-5, atol=1e-5)
    assert quant._scratch.buffers[(x.device, x.dtype, 0)].numel() == 128 * 64


def _sequences(pair):
    ids = [pair.encode_prompt(p, 8) for p in ("abc", "hello world", "a b c d e f")]
    return [i + [65, 66, 67, 68, 69, 70] for i in ids], [len(i) for i in ids]


def test_quality_guard_passes_int8_and_fails_a_different_model(tiny):
    fast = quantize(copy.deepcopy(tiny.draft), "int8")
    guard = quality(tiny.draft, fast, *_sequences(tiny))
    assert guard.top1 >= 0.99 and guard.kl <= 0.01
    assert guard.positions == 3 * 6 and guard.apart == round((1 - guard.top1) * guard.positions)
    # The guard can fail: another model (the verifier of the pair) is far from the draft.
    guard = quality(tiny.draft, tiny.verifier, *_sequences(tiny))
    assert guard.top1 < 0.9 and guard.kl > 0.1 and guard.apart > 0


def test_quality_guard_scores_the_answer_with_decode_steps(tiny):
    """The guard reads each prompt in one pass and every answer position in a one-token step on the cache, as
    decoding does, so a quantised layer runs its decode kernel there, not its prompt path."""
    fast = quantize(copy.deepcopy(tiny.draft), "int8")
    layer = next(m for m in fast.modules() if isinstance(m, Int8Linear))
    rows, forward = [], layer.forward
    layer.forward = lambda x: rows.append(x.reshape(-1, x.shape[-1]).shape[0]) or forward(x)
    sequences, start = _sequences(tiny)
    quality(tiny.draft, fast, sequences, start)
    expected = [n for ids, s in zip(sequences, start, strict=True) for n in [s] + [1] * (len(ids) - 1 - s)]
    assert rows == expected


def test_kept_layers_stay_as_loaded(tiny):
    """`keep` (the guard script's per-layer probe) leaves the named layers float and quantises every other one."""
    fast = quantize(copy.deepcopy(tiny.draft), "int8", keep=("q_proj", "o_proj"))
    kinds = {name.rsplit(".", 1)[-1]: type(m) for name, m in fast.named_modules()
             if isinstance(m, (torch.nn.Linear, Int8Linear))}
    assert kinds["q_proj"] is kinds["o_proj"] is torch.nn.Linear
    assert kinds["k_proj"] is kinds["down_proj"] is kinds["lm_head"] is Int8Linear


def test_unknown_recipe_is_refused(tiny):
    with pytest.raises(ValueError, match="unknown quantisation"):
        quantize(copy.deepcopy(tiny.draft), "int3")


def _q4k_blocks(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random Q4_K blocks (d and dmin small positive halves, any 6-bit scales and 4-bit codes), rows x cols/256."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * cols // 256, gguf_blocks.BLOCK_BYTES), dtype=np.uint8)
    blocks[:, 0:4] = rng.uniform(1e-4, 1e-2, (len(blocks), 2)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def test_q4k_codes_decode_exactly_as_gguf_dequantises():
    blocks = _q4k_blocks(64, 512)
    codes, scale, offset = gguf_blocks.decode(blocks, 64, 512)
    assert codes.min() >= 0 and codes.max() <= 15
    w = (codes.reshape(64, -1, 32) * scale[..., None] - offset[..., None]).reshape(64, 512)
    expected = dequantize(blocks, gguf.GGMLQuantizationType.Q4_K).reshape(64, 512)
    assert torch.equal(w, torch.from_numpy(expected))


def test_q4k_linear_computes_with_its_own_codes():
    blocks = _q4k_blocks(128, 256, seed=1)
    w = torch.from_numpy(dequantize(blocks, gguf.GGMLQuantizationType.Q4_K).reshape(128, 256))
    lin = torch.nn.Linear(256, 128)
    x = torch.randn(3, 256)
    # float32 scales: the same weights, so the same products to float rounding
    torch.testing.assert_close(Int4Linear.q4k(lin, blocks)(x), x @ w.T + lin.bias.detach(), rtol=1e-4, atol=1e-4)
    lin = lin.to(torch.bfloat16)  # bf16 scales and zeros: within a few bf16 steps of each weight's group scale
    err = (Int4Linear.q4k(lin, blocks)(x.bfloat16()).float() - x @ w.T - lin.bias.float()).norm() / (x @ w.T).norm()
    assert err < 0.02


def _small_qwen2() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()


def test_q4k_takes_only_layers_the_gguf_holds_exactly(tmp_path):
    model = _small_qwen2()
    mlp = model.model.layers[0].mlp
    up, gate = _q4k_blocks(512, 256, seed=2), _q4k_blocks(512, 256, seed=3)
    with torch.no_grad():  # up_proj holds exactly what its blocks decode to; gate_proj is one step off somewhere
        mlp.up_proj.weight.copy_(torch.from_numpy(dequantize(up, gguf.GGMLQuantizationType.Q4_K).reshape(512, 256)))
        mlp.gate_proj.weight.copy_(torch.from_numpy(dequantize(gate, gguf.GGMLQuantizationType.Q4_K)
                                                    .reshape(512, 256)))
        mlp.gate_proj.weight[0, 0] += 1e-3
    path = tmp_path / "small.gguf"
    q4k = gguf.GGMLQuantizationType.Q4_K
    write_gguf(path, {"blk.0.ffn_up.weight": (up, q4k), "blk.0.ffn_gate.weight": (gate, q4k),
                      "blk.0.ffn_down.weight": mlp.down_proj.weight.detach().numpy()})  # F32: not Q4_K

    blocks = gguf_blocks.from_gguf(model, path)
    assert set(blocks) == {"model.layers.0.mlp.up_proj"}
    folder = tmp_path / "converted"  # as the embedded pair keeps them: beside the converted weights
    folder.mkdir()
    save_file(blocks, folder / gguf_blocks.FILE)
    ids = torch.tensor([[1, 5, 9, 3]])
    before = model(input_ids=ids).logits
    with pytest.raises(QuantError, match="needs the model's Q4_K blocks"):
        quantize(model, "q4k")  # where it came from is unknown
    for source in (path, folder):
        fast = copy.deepcopy(model)
        fast.hlm_source = source
        quantize(fast, "q4k")
        layers = fast.model.layers[0].mlp
        assert isinstance(layers.up_proj, Int4Linear) and isinstance(layers.gate_proj, torch.nn.Linear)
        torch.testing.assert_close(fast(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


Q = gguf.GGMLQuantizationType


def _plane_weights(kind: Q, low: int, high: int, n: int = 64, k: int = 128, seed: int = 0) -> torch.Tensor:
    """Small integers times a power of two per row, each block holding the code range's far end (so the block's
    scale is that power of two, negative for Q5_0 when the far end is +16): exact at every step in bf16."""
    torch.manual_seed(seed)
    ints = torch.randint(low, high + 1, (n, k // 32, 32)).float()
    ints[:, :, 0] = low if kind == Q.Q5_0 and low == -16 else high
    return (ints * 2.0 ** -torch.randint(2, 9, (n, 1, 1)).float()).reshape(n, k)


@pytest.mark.parametrize(("kind", "low", "high"), [(Q.Q8_0, -127, 127), (Q.Q5_0, -16, 15), (Q.Q5_0, -15, 16)])
def test_two_planes_compute_the_blocks_weights(kind: Q, low: int, high: int) -> None:
    """A Q5_0 or Q8_0 block decodes to gguf's own weights, and as two 4-bit planes on the int4 kernel gives them back
    bit for bit (a wrong code, scale or zero would not), in a one-row step and in a prompt chunk's GEMM alike."""
    n, k = 64, 128
    source = _plane_weights(kind, low, high, n, k)
    blocks = gguf.quants.quantize(source.numpy(), kind)
    assert torch.equal(torch.from_numpy(dequantize(blocks, kind).reshape(n, k)), source)
    assert gguf_blocks.kind(blocks, n, k) == kind.name
    assert torch.equal(gguf_blocks.weights(blocks, n, k), source)
    planes = PlanesLinear(torch.nn.Linear(k, n, bias=False).to(torch.bfloat16), blocks, kind.name)
    eye = torch.eye(k, dtype=torch.bfloat16)  # row i of the identity reads column i
    with torch.inference_mode():
        for rows in (1, INT4_PREFILL_ROWS):  # the kernel, then the dequantised GEMM
            got = torch.cat([planes(eye[i:i + rows]) for i in range(0, k, rows)])
            assert torch.equal(got.float().T, source), rows


def _planes_model(tmp_path: Path) -> torch.nn.Module:
    """The small Qwen2 with its q_proj in Q5_0 and its o_proj in Q8_0 blocks, in a GGUF it was loaded from."""
    model = _small_qwen2()
    attention = model.model.layers[0].self_attn
    layers = {"q_proj": (Q.Q5_0, -16, 15), "o_proj": (Q.Q8_0, -127, 127)}
    blocks = {}
    with torch.no_grad():
        for i, (name, (kind, low, high)) in enumerate(layers.items()):
            layer = getattr(attention, name)
            weight = _plane_weights(kind, low, high, layer.out_features, layer.in_features, seed=i)
            blocks[name] = gguf.quants.quantize(weight.numpy(), kind)
            layer.weight.copy_(weight)
    path = tmp_path / "small.gguf"
    write_gguf(path, {f"blk.0.{name}.weight": (blocks[tensor], layers[tensor][0])
                      for name, tensor in (("attn_q", "q_proj"), ("attn_output", "o_proj"))})
    model.hlm_source = path
    return model


def test_the_gguf_recipe_runs_q5_0_and_q8_0_layers_on_their_planes(tmp_path):
    """`q4k` takes only Q4_K layers, `gguf` also Q5_0 and Q8_0 ones, each checked against the model's weights."""
    model = _planes_model(tmp_path)
    path = model.hlm_source
    assert set(gguf_blocks.from_gguf(model, path)) == {"model.layers.0.self_attn.q_proj",
                                                      "model.layers.0.self_attn.o_proj"}
    with pytest.raises(QuantError, match="needs the model's Q4_K blocks"):
        quantize(copy.deepcopy(model), "q4k")  # no layer is Q4_K
    ids = torch.tensor([[1, 5, 9, 3]])
    before = model(input_ids=ids).logits
    fast = quantize(copy.deepcopy(model), "gguf")
    assert isinstance(fast.model.layers[0].self_attn.q_proj, PlanesLinear)
    assert isinstance(fast.model.layers[0].self_attn.o_proj, PlanesLinear)
    assert isinstance(fast.model.layers[0].self_attn.k_proj, torch.nn.Linear)
    torch.testing.assert_close(fast(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


def test_a_plane_heads_rows_are_its_weights_rows():
    """The semantic statistic reads a few of the head's rows a draft: decoded from the planes, they are the blocks'
    weights (the order of the index kept, rows from both halves of a 64-row kernel block)."""
    n, k = 128, 64
    source = _plane_weights(Q.Q8_0, -127, 127, n, k, seed=5)
    head = PlanesLinear(torch.nn.Linear(k, n, bias=False).to(torch.bfloat16),
                        gguf.quants.quantize(source.numpy(), Q.Q8_0), "Q8_0")
    index = torch.tensor([127, 0, 31, 32, 63, 64, 5])
    assert torch.equal(HeadRows(head)[index].float(), source[index])


def file_backed_linear(tmp_path, n: int, k: int, bias: bool) -> torch.nn.Linear:
    """A bf16 Linear whose weight is a view of a memory-mapped file, as transformers loads a bf16 checkpoint."""
    path = tmp_path / "weight.bin"
    torch.randn(n * k, generator=torch.Generator().manual_seed(3)).bfloat16().view(torch.int16).numpy().tofile(path)
    linear = torch.nn.Linear(k, n, bias=bias, dtype=torch.bfloat16)
    linear.weight = torch.nn.Parameter(torch.from_file(str(path), size=n * k, dtype=torch.bfloat16).view(n, k),
                                       requires_grad=False)
    return linear


def can_pack(tmp_path) -> bool:
    """Whether layers are packed here at all: oneDNN's bf16 packing on this CPU, and an OS that takes pages back
    (Linux >= 5.4)."""
    probe = tmp_path / "can-pack"
    probe.mkdir(exist_ok=True)
    return onednn_bf16() and memory.page_out(file_backed_linear(probe, 64, 1024, False).weight)


@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_layer_computes_bit_for_bit_what_f_linear_does(tmp_path, bias):
    """oneDNN's packed weight is the layout `F.linear` reorders into on every call: the same sums, whatever the rows
    (a decode step, a sync's block, a prompt chunk), and the weight is still there, unchanged, for readers."""
    if not can_pack(tmp_path):
        pytest.skip("oneDNN cannot pack bf16 on this CPU (AVX2 alone), or the OS keeps the pages")
    linear = file_backed_linear(tmp_path, 272, 320, bias)
    before = linear.weight.detach().clone()
    assert memory.file_backed(linear.weight)
    packed = PackedLinear.of(linear)
    assert packed is not None
    for n in (1, 2, 3, 4, 7, 64, 130):
        x = torch.randn(n, 320, dtype=torch.bfloat16)
        with torch.no_grad():  # as every pass runs
            assert torch.equal(packed(x), F.linear(x, linear.weight, linear.bias))
    assert torch.equal(packed.weight, before)  # its pages were given back, and read again from the file


def test_only_bf16_views_of_a_mapped_file_are_packed(tmp_path):
    """A copy would cost memory where the weight is not a file's pages (they are given back once packed), and fp32
    is not what was measured: both stay as they are."""
    anonymous = torch.nn.Linear(320, 272, dtype=torch.bfloat16)
    assert not memory.file_backed(anonymous.weight) and PackedLinear.of(anonymous) is None
    assert PackedLinear.of(torch.nn.Linear(320, 272)) is None
    model = torch.nn.Sequential(file_backed_linear(tmp_path, 272, 320, True), anonymous)
    assert pack_float_linears(model) == ("1 bf16 layers packed" if can_pack(tmp_path) else
                                         "" if onednn_bf16() else "2 bf16 layers with fp32 prompts")
    assert isinstance(model[1], torch.nn.Linear if onednn_bf16() else WideLinear)


def test_layers_are_timed_in_turn_round_after_round(monkeypatch):
    """A moment of noise falls on every layer timed, not on the one timed then: a round runs each layer once."""
    monkeypatch.setattr(quant, "BUSY_SHARE", 0.0)  # these layers are Python alone: one thread of the team's
    calls: list[str] = []
    a, b = (Streamed(lambda name=name: calls.append(name), 2) for name in "ab")
    seconds = streamed_seconds(a, b, repeats=3)
    assert calls == ["a", "b"] * 4 and len(seconds) == 2 and all(s >= 0 for s in seconds)


@pytest.mark.parametrize(("cpu_seconds", "attempts"), [([0.0, 0.0, 0.0, 100.0], 2), ([0.0] * 4, None)])
def test_a_timing_the_cores_were_busy_for_is_taken_again_then_refused(monkeypatch, cpu_seconds, attempts):
    """A timing in which this process got under BUSY_SHARE of its threads' time measured something else: it is
    taken again after a pause, and `Busy` is raised when no attempt got the cores."""
    clock, paused, runs = iter(cpu_seconds), [], []
    monkeypatch.setattr(quant.time, "process_time", lambda: next(clock))
    monkeypatch.setattr(quant.time, "sleep", paused.append)
    layer = Streamed(lambda: runs.append(1), 1)
    if attempts is None:
        with pytest.raises(quant.Busy, match="the cores were busy"):
            streamed_seconds(layer, repeats=1)
    else:
        assert len(streamed_seconds(layer, repeats=1)) == 1
    assert paused == [quant.BUSY_PAUSE_S] * (quant.TIMING_ATTEMPTS - 1) and quant.TIMING_ATTEMPTS == 2
    assert len(runs) == 2 * quant.TIMING_ATTEMPTS  # each attempt: the untimed call and one timed


def test_busy_cores_leave_each_choice_at_its_default(tmp_path, monkeypatch):
    """No choice is made on a busy timing: bf16, the block oneDNN's bf16 runs at a row's cost (one row without it),
    and the blocks of the recipe the guard accepted, each said to be untimed."""
    from hlm.models import presets

    def busy(*layers):
        raise quant.Busy("this process got 48% of its 2 threads' time while timing: the cores were busy")

    for module in (presets, rows):
        monkeypatch.setattr(module, "streamed_seconds", busy)
    presets.cpu_bf16_taken.cache_clear()
    rows.block_rows.cache_clear()
    try:
        assert presets.cpu_bf16_taken()
        assert rows.block_rows("cpu", torch.bfloat16) == (rows.BLOCK if onednn_bf16() else 1)
    finally:
        presets.cpu_bf16_taken.cache_clear()
        rows.block_rows.cache_clear()
    model = _planes_model(tmp_path)
    why = presets.fast_path(model, "auto", "gguf")
    assert why.startswith("gguf, 2 layers (taken untimed: this process got 48%")
    assert isinstance(model.model.layers[0].self_attn.q_proj, PlanesLinear)


@pytest.mark.parametrize(("bf16_s", "taken"), [(1.4e-3, True), (1.5e-3, True), (1.6e-3, False)])
def test_fp32_is_taken_only_where_bf16_is_much_slower(monkeypatch, bf16_s, taken):
    """fp32 holds twice the bytes: it must buy more than FP32_MARGIN of speed, or an even timing flips the dtype."""
    from hlm.models import presets

    monkeypatch.setattr(presets, "streamed_seconds", lambda *layers: [bf16_s, 1e-3])
    presets.cpu_bf16_taken.cache_clear()
    try:
        assert presets.cpu_bf16_taken() == taken and presets.FP32_MARGIN == 1.5
    finally:
        presets.cpu_bf16_taken.cache_clear()


def test_a_block_of_rows_on_a_packed_layer_keeps_each_row_exact(tmp_path):
    """The verifier's float layers (`hlm.rows.BlockLinear`) may run packed: a row's product is still the same in any
    block, so a sync still sees the LLM alone's logits."""
    if not can_pack(tmp_path):
        pytest.skip("oneDNN cannot pack bf16 on this CPU (AVX2 alone), or the OS keeps the pages")
    block = rows.BlockLinear(file_backed_linear(tmp_path, 272, 320, True))
    pack_float_linears(block)
    assert isinstance(block.linear, PackedLinear)
    x = torch.randn(rows.EXACT_ROWS, 320, dtype=torch.bfloat16)
    alone = torch.cat([block(x[i:i + 1]) for i in range(len(x))])
    for n in range(2, rows.EXACT_ROWS + 1):
        assert torch.equal(block(x[:n]), alone[:n])


@pytest.mark.parametrize(("int4_s", "taken"), [(0.9e-3, True), (1.1e-3, False)])
def test_auto_times_every_shape_its_blocks_replace_and_sums_them(tmp_path, monkeypatch, int4_s, taken):
    """`auto` weighs each shape by how many layers have it (here one shape, two layers of two planes), float
    against int4, and takes the blocks only where their sum is smaller."""
    from hlm.models import presets

    timed = []
    monkeypatch.setattr(presets.ggml_kernel, "available", lambda: False)  # ggml's own weighing: test_ggml_kernel
    monkeypatch.setattr(presets, "float_layer", lambda n, k, dtype: ("float", n, k))
    monkeypatch.setattr(presets, "int4_layer", lambda n, k, dtype, planes: ("int4", n, k, planes))
    monkeypatch.setattr(presets, "streamed_seconds", lambda *layers: timed.extend(layers) or [1e-3, int4_s])
    model = _planes_model(tmp_path)
    why = presets.fast_path(model, "auto", "gguf")
    assert timed == [("float", 256, 256), ("int4", 256, 256, 2)]  # the shape once, for its two layers
    assert f"({2 * int4_s * 1e3:.1f} vs 2.0 ms in float32 for one row through its 2 layers but the head" in why
    assert why.startswith("gguf") == taken == isinstance(model.model.layers[0].self_attn.q_proj, PlanesLinear)


def test_a_second_load_takes_the_kept_timing_and_the_same_blocks(tmp_path, monkeypatch):
    """With timings kept (`hlm.timings`), a second load of the same model on this machine times nothing and takes
    what the first took, even where a new timing would come out the other way."""
    from hlm.models import presets

    monkeypatch.setenv("HLM_TIMINGS", str(tmp_path / "timings.json"))
    monkeypatch.setattr(presets.ggml_kernel, "available", lambda: False)
    monkeypatch.setattr(presets, "float_layer", lambda n, k, dtype: ("float", n, k))
    monkeypatch.setattr(presets, "int4_layer", lambda n, k, dtype, planes: ("int4", n, k, planes))
    timed = []
    monkeypatch.setattr(presets, "streamed_seconds", lambda *layers: timed.extend(layers) or [1e-3, 0.9e-3])
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = presets.fast_path(_planes_model(tmp_path / "a"), "auto", "gguf")
    monkeypatch.setattr(presets, "streamed_seconds", lambda *layers: timed.extend(layers) or [1e-3, 1.1e-3])
    model = _planes_model(tmp_path / "b")
    second = presets.fast_path(model, "auto", "gguf")
    assert len(timed) == 2 and first.startswith("gguf") and second.startswith("gguf")
    assert first.endswith("measured at load)") and "kept in $HLM_TIMINGS" in second
    assert isinstance(model.model.layers[0].self_attn.q_proj, PlanesLinear)


def _step_timer(seconds: list[float], timed: list[float]):
    """A stand-in for `step_seconds`: the given step times in turn, each one recorded in `timed`."""
    queue = iter(seconds)

    def step_seconds(model: torch.nn.Module) -> float:
        timed.append(next(queue))
        return timed[-1]

    return step_seconds


@pytest.mark.parametrize(("recipe", "before_after", "taken"), [("int8", [2e-3, 1e-3], True),
                                                                ("int4", [1e-3, 2e-3], False)])
def test_the_step_timed_recipes_keep_their_timing_too(tmp_path, monkeypatch, recipe, before_after, taken):
    """`int8` and `int4` are chosen on a whole step timed before and after, kept like the blocks' timings: a second
    load times nothing and takes what the first took, quantised or left as loaded, whatever a new timing would say."""
    from hlm.drafter import KERNEL
    from hlm.models import presets

    monkeypatch.setenv("HLM_TIMINGS", str(tmp_path / "timings.json"))
    timed: list[float] = []
    monkeypatch.setattr(presets, "step_seconds", _step_timer(before_after, timed))
    first = presets.tiny_role("draft", KERNEL)
    if taken:
        why = presets.fast_path(first, "auto", recipe)
        assert why.endswith("measured at load)") and isinstance(first.model.layers[0].mlp.up_proj, Int8Linear)
    else:
        with pytest.raises(presets._Slower):  # measured slower: the caller reloads the model as it was
            presets.fast_path(first, "auto", recipe)
    assert len(timed) == 2
    monkeypatch.setattr(presets, "step_seconds", _step_timer(before_after[::-1], timed))  # would now say the opposite
    second = presets.tiny_role("draft", KERNEL)
    why = presets.fast_path(second, "auto", recipe)
    assert len(timed) == 2 and "kept in $HLM_TIMINGS" in why  # nothing timed again
    up_proj = second.model.layers[0].mlp.up_proj
    assert why.startswith(recipe) == taken == (type(up_proj) is not torch.nn.Linear)
