"""The draft's compiled step (`hlm.compiled`, `--quant compiled`): what the eager pass computes, in one graph per set
of attention layers however the cache grows or rolls back."""

import pytest
import torch
from torch._dynamo.utils import counters

from hlm.compiled import CompiledStep, compile_step
from hlm.drafter import KERNEL, Drafter
from hlm.models import load_pair
from hlm.models.tiny import tiny_role
from hlm.quant import QuantError, step_seconds


def test_the_compiled_step_matches_the_eager_pass_through_growth_and_rollback():
    """Two copies of the tiny draft (same seed, same weights), one with the step compiled for layer 1's weights:
    logits, the final hidden state and the attention rows asked for agree (fp32; the compiled sums run in another
    order), through a rollback, in one graph whether a pass asks for layer 1 or for nothing; a pass asking for
    layer 0 compiles one more graph (layers 0 and 1) and gets layer 0 alone."""
    eager, compiled = Drafter(tiny_role("draft", KERNEL)), Drafter(tiny_role("draft", KERNEL))
    compiled.model.hlm_step = CompiledStep(compiled.model, {1})
    ids = list(range(40, 60))
    graphs = counters["stats"]["unique_graphs"]
    step_seconds(compiled.model, steps=2)  # as `compile_step` times it at load: a slice of a longer row each step
    for drafter in (eager, compiled):
        drafter.prefill(ids)
    for i, token in enumerate([65, 66, 67, 68, 69, 70, 71, 72, 73, 74]):
        if i == 5:
            for drafter in (eager, compiled):
                drafter.rollback(3)
        if i == 8:
            assert counters["stats"]["unique_graphs"] - graphs == 1
        layers = {0} if i >= 8 else {1} if i % 2 else set()
        mine, theirs = (d.forward([token], layers=layers, hidden=True) for d in (compiled, eager))
        torch.testing.assert_close(mine.logits, theirs.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mine.hidden, theirs.hidden, rtol=1e-4, atol=1e-4)
        assert (mine.attentions is None) == (theirs.attentions is None) == (not layers)
        for layer in range(2) if layers else ():
            if layer in layers:
                torch.testing.assert_close(mine.attentions[layer], theirs.attentions[layer], rtol=1e-4, atol=1e-4)
            else:
                assert mine.attentions[layer] is None and theirs.attentions[layer] is None
        assert compiled.length == eager.length
    assert counters["stats"]["unique_graphs"] - graphs == 2
    assert compiled.model.hlm_step.sets == [(1,), (0, 1)]


def test_the_compiled_pair_says_so_in_its_numerics():
    """`--quant compiled` is a path of its own: cached results keyed by the numerics are not reused across it."""
    pair = load_pair("tiny", quant="compiled")
    assert hasattr(pair.draft, "hlm_step") and not hasattr(pair.verifier, "hlm_step")
    assert pair.quant["draft"].startswith("none+compiled (") and "+compiled" in pair.numerics
    assert "+compiled" not in load_pair("tiny").numerics


def test_without_a_cxx_compiler_it_says_so_before_compiling(monkeypatch):
    import hlm.compiled

    monkeypatch.setattr(hlm.compiled.shutil, "which", lambda _name: None)
    with pytest.raises(QuantError, match="C\\+\\+ compiler"):
        compile_step(tiny_role("draft", KERNEL), "none")
