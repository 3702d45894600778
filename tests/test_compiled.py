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
    """Two copies of the tiny draft (same seed, same weights), one with the step: logits, the final hidden state and
    the attention rows asked for agree (fp32; the compiled sums run in another order), through a rollback."""
    eager, compiled = Drafter(tiny_role("draft", KERNEL)), Drafter(tiny_role("draft", KERNEL))
    compiled.model.hlm_step = CompiledStep(compiled.model)
    ids = list(range(40, 60))
    graphs = counters["stats"]["unique_graphs"]
    step_seconds(compiled.model, steps=2)  # as `compile_step` times it at load: a slice of a longer row each step
    for drafter in (eager, compiled):
        drafter.prefill(ids)
    for i, token in enumerate([65, 66, 67, 68, 69, 70, 71, 72]):
        if i == 5:
            for drafter in (eager, compiled):
                drafter.rollback(3)
        layers = {1} if i % 2 else set()
        mine, theirs = (d.forward([token], layers=layers, hidden=True) for d in (compiled, eager))
        torch.testing.assert_close(mine.logits, theirs.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mine.hidden, theirs.hidden, rtol=1e-4, atol=1e-4)
        if layers:
            assert mine.attentions[0] is None and theirs.attentions[0] is None
            torch.testing.assert_close(mine.attentions[1], theirs.attentions[1], rtol=1e-4, atol=1e-4)
        assert compiled.length == eager.length
    assert counters["stats"]["unique_graphs"] - graphs == 2  # one per layer set: none, {1}


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
