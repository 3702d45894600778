"""The draft on llama.cpp (`hlm.llamacpp`) against the transformers draft on the same GGUF's blocks, and the two
native ggml builds side by side (`hlm.native`). Slow: loads the embedded pair (CI runs it)."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from hlm import llamacpp, native, prefix
from hlm.drafter import Drafter

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed")]


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(2)
    from hlm.models import load_pair

    yield load_pair("embedded")
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def draft(pair):
    from hlm.models import embedded

    return pair.llama or llamacpp.LlamaDraft(embedded.ensure_gguf(embedded.DRAFT, progress=False), pair.template_head)


@pytest.mark.skipif(not hasattr(os, "RTLD_DEEPBIND"), reason="RTLD_DEEPBIND is glibc's")
def test_each_native_library_binds_to_its_own_ggml(tmp_path):
    """Both packages open their ggml into the global scope; after `hlm.native.load` no library of llama-cpp-python
    binds a ggml symbol to ggml-python's build (without it, 1,362 did when `ggml` came first)."""
    script = "import hlm.native as n; n.load(); import ggml; ggml.ggml_cpu_has_avx2(); import llama_cpp"
    log = tmp_path / "bindings"
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "LD_DEBUG": "bindings",
                                                                      "LD_DEBUG_OUTPUT": str(log)})
    llama, ggml = (str(native.library_folder(package)) for package in ("llama_cpp", "ggml"))
    lines = [line for f in tmp_path.iterdir() for line in f.read_text().splitlines() if "binding file" in line]
    crossed = [line for line in lines if llama in line.split(" to ")[0] and ggml in line.split(" to ")[1]
               and "`ggml_" in line]
    assert len(lines) > 1000 and not crossed, crossed[:3]


def test_llama_drafter_agrees_with_the_transformers_draft(pair, draft):
    """Teacher-forced on the transformers draft's own greedy answer: the same top-1 at nearly every position (the
    guard: 99.14 % over 466 positions), the same final hidden state to a cosine of 0.999."""
    ids = pair.encode_prompt("Write a Python function that reverses a string.", 24)
    ours, theirs = Drafter(pair.draft, pair.template_head), draft.drafter(len(ids) + 24)
    a, b = ours.prefill(ids, hidden=True), theirs.prefill(ids, hidden=True)
    agree, tokens = [], []
    for _ in range(24):
        agree.append(int(a.logits.argmax()) == int(b.logits.argmax()))
        assert torch.cosine_similarity(a.hidden.float(), b.hidden.float(), 0) > 0.999
        tokens.append(int(a.logits.argmax()))
        a, b = ours.forward(tokens[-1:], hidden=True), theirs.forward(tokens[-1:], hidden=True)
    assert sum(agree) >= 22 and theirs.length == len(ids) + 24
    assert b.logits.shape == (pair.vocab_size,) and b.attentions is None


def test_rollback_then_the_same_tokens_give_the_same_logits(pair, draft):
    ids = pair.encode_prompt("def add(a, b):", 8)
    drafter = draft.drafter(len(ids) + 8)
    drafter.prefill(ids)
    first = [drafter.forward([t]).logits for t in (220, 220, 284)]
    drafter.rollback(2)
    assert drafter.length == len(ids) + 1
    again = [drafter.forward([t]).logits for t in (220, 284)]
    assert torch.equal(first[1], again[0]) and torch.equal(first[2], again[1])


def test_bad_use_is_a_clear_error_and_stop_cuts_the_prompt_read(pair, draft):
    ids = pair.encode_prompt("Explain DNS in one paragraph. " * 40, 4)
    drafter = draft.drafter(len(ids) + 4)
    with pytest.raises(ValueError, match="no attention weights"):
        drafter.forward([220], layers=(3,))
    stop = threading.Event()
    stop.set()
    with prefix.stopping(stop), pytest.raises(prefix.Cancelled):
        drafter.prefill(ids)
    drafter.prefill(ids)  # the same drafter reads the prompt again afterwards
    with pytest.raises(ValueError, match="context holds"):
        drafter.forward([220] * 5)


def test_a_drafter_frees_its_context_when_its_last_reference_goes(pair, draft):
    """No reference cycle through llama.cpp's callbacks: a drafter's context (KV cache and compute buffers, outside
    Python's heap) goes with the drafter, not at some later full collection (a cycle grew HumanEval's process to 23
    GB)."""
    import gc
    import weakref

    gc.disable()
    try:
        for weights in (False, True):
            drafter = draft.drafter(64, weights=weights)
            drafter.prefill(pair.encode_prompt("def add(a, b):", 8))
            drafter.forward([220], pair.head_layers if weights else ())
            gone = weakref.ref(drafter)
            del drafter
            assert gone() is None, weights
    finally:
        gc.enable()


def test_the_pair_drafts_every_run_on_llama_cpp_where_it_took_it(pair):
    if pair.llama is None:
        assert "llama.cpp not taken" in pair.quant["draft"]
        pytest.skip(pair.quant["draft"])
    kept = getattr(pair.draft, "hlm_quant", "none")  # the path the study's batched passes take
    assert pair.quant["draft"].startswith(f"llama.cpp+{kept} (auto: ") and f"draft llama.cpp+{kept}," in pair.numerics
    plain, reading = pair.new_drafter(frozenset(), 64), pair.new_drafter(pair.head_layers, 64)
    assert isinstance(plain, llamacpp.LlamaCppDrafter) and not plain.weights
    assert isinstance(reading, llamacpp.LlamaCppDrafter) and reading.weights
    assert "llama.cpp" in pair.attention_path


def test_attention_weights_read_from_the_graph_are_the_transformers_drafts(pair, draft):
    """Teacher-forced on the transformers draft's greedy answer: the default estimator's feature (previous-token
    attention of the calibrated heads) within 0.02 at every step (0.0056 measured), in the same (1, heads, new,
    context) shape; after a rollback, a 3-token pass gives every head's rows of those layers within 0.05 (0.024
    measured); the steps that ask for none copy none."""
    from hlm.features import prev_attention

    layers = pair.head_layers
    ids = pair.encode_prompt("Write a Python function that checks whether a string is a palindrome.", 24)
    ours, theirs = Drafter(pair.draft, pair.template_head), draft.drafter(len(ids) + 24, weights=True)
    a, b = ours.prefill(ids), theirs.prefill(ids)
    tokens = []
    for _ in range(16):
        tokens.append(int(a.logits.argmax()))
        a, b = ours.forward(tokens[-1:], layers), theirs.forward(tokens[-1:], layers)
        assert [w is None for w in a.attentions] == [w is None for w in b.attentions]
        assert b.attentions[min(layers)].shape == a.attentions[min(layers)].shape == (1, 14, 1, theirs.length)
        assert abs(prev_attention(a.attentions, pair.heads) - prev_attention(b.attentions, pair.heads)) < 0.02
    assert theirs.forward([220]).attentions is None and theirs._copied == {}
    ours.forward([220])
    ours.rollback(4)
    theirs.rollback(4)
    a, b = ours.forward(tokens[-3:], layers), theirs.forward(tokens[-3:], layers)
    for layer in layers:
        assert b.attentions[layer].shape == (1, 14, 3, len(ids) + 16)
        assert torch.allclose(a.attentions[layer].float(), b.attentions[layer], atol=0.05)
        assert torch.allclose(b.attentions[layer].sum(-1), torch.ones(1, 14, 3), atol=1e-4)


def test_prompt_reads_are_kept_and_never_change_a_run(pair):
    """A prompt read again comes back as it was (its cost then, the same cache), and a run's numbers do not depend on
    whether the template's head was kept: the head is always its own pass."""
    from hlm.models import embedded

    cold = llamacpp.LlamaDraft(embedded.ensure_gguf(embedded.DRAFT, progress=False), pair.template_head)
    ids, other = (pair.encode_prompt(p, 4) for p in ("Sort a list in Python.", "What is DNS?"))
    first = cold.drafter(len(ids) + 2)
    a = first.prefill(ids)
    assert first.remembered is None and a.hidden is None
    again = cold.drafter(len(ids) + 2)
    b = again.prefill(ids, hidden=True)
    assert again.remembered is not None and torch.equal(a.logits, b.logits) and b.hidden is not None
    assert torch.equal(first.forward([220]).logits, again.forward([220]).logits)
    warm = cold.drafter(len(other) + 2)  # the head is kept now
    fresh = llamacpp.LlamaDraft(cold.path, pair.template_head).drafter(len(other) + 2)
    assert torch.equal(warm.prefill(other).logits, fresh.prefill(other).logits)
    assert torch.equal(warm.forward([220]).logits, fresh.forward([220]).logits)
    reading = cold.drafter(len(ids) + 2, weights=True)  # flash attention off: a read of its own kind, kept apart
    reading.prefill(ids)
    again = cold.drafter(len(ids) + 2, weights=True)
    again.prefill(ids)
    assert reading.remembered is None and again.remembered is not None
