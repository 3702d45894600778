"""The drafter's attention kernel (`hlm.drafter.KERNEL`): SDPA for every pass that reads no attention weights (each
prefill chunk, every step of an estimator or policy that reads none), eager only on the layers an estimator reads,
with the same numbers as the all-eager model it replaced."""

import pytest
import torch
from conftest import cfg
from transformers import DynamicCache
from transformers.models.qwen2 import modeling_qwen2

from hlm import drafter as drafter_module
from hlm import prefix
from hlm.decoder import HybridDecoder
from hlm.drafter import KERNEL, Drafter
from hlm.estimators import REGISTRY
from hlm.models.tiny import tiny_model

PROMPT = "abc"
QUIET = [name for name, e in REGISTRY.items() if not e.attention]


@pytest.fixture()
def kernels(tiny, monkeypatch):
    """(kernel, layer, new tokens) of every attention call of the tiny pair's drafter."""
    seen, mine = [], {id(layer.self_attn) for layer in tiny.draft.model.layers}

    def spy(kind, f):
        def wrapped(module, query, *args, **kwargs):
            if id(module) in mine:
                seen.append((kind, module.layer_idx, query.shape[2]))
            return f(module, query, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(drafter_module, "sdpa_attention_forward", spy("sdpa", drafter_module.sdpa_attention_forward))
    monkeypatch.setattr(modeling_qwen2, "eager_attention_forward",
                        spy("eager", modeling_qwen2.eager_attention_forward))
    return seen


class RecordingDrafter(Drafter):
    """Records the layers every pass asks weights for and what came back."""

    passes: list = []

    def forward(self, ids, layers=(), hidden=False):
        out = super().forward(ids, layers, hidden)
        RecordingDrafter.passes.append((frozenset(layers), out.attentions, self.length))
        return out


def run(tiny, estimator=None, policy="ours", **kw):
    RecordingDrafter.passes = []
    config = cfg(policy, n=12, u_th=0.0, k=16, estimator=estimator or "ubar", **kw)
    events = list(HybridDecoder(tiny, drafter_factory=RecordingDrafter).generate(PROMPT, config))
    assert len(events) == 12
    return RecordingDrafter.passes


def test_the_loaders_give_the_drafter_the_kernel_and_it_refuses_another(tiny):
    assert tiny.draft.config._attn_implementation == KERNEL
    with pytest.raises(ValueError, match="attention"):
        Drafter(tiny_model(seed=1))


def test_every_prefill_chunk_and_the_template_head_run_sdpa(tiny, kernels, monkeypatch):
    monkeypatch.setattr(prefix, "CHUNK", 4)
    prefix._HEADS.clear()
    ids = tiny.encode_prompt("a prompt of several chunks", 8)
    Drafter(tiny.draft, head=tiny.template_head).prefill(ids)
    assert kernels and {kind for kind, _, _ in kernels} == {"sdpa"}
    assert max(n for _, _, n in kernels) > 1  # multi-token passes, not only single steps


@pytest.mark.parametrize("policy,estimator", [("ours", name) for name in QUIET]
                         + [(p, None) for p in ("hlm", "uhlm", "random", "slm")])
def test_what_reads_no_attention_never_asks_for_it(tiny, kernels, policy, estimator):
    passes = run(tiny, estimator, policy)
    assert passes and all(not layers and attentions is None for layers, attentions, _ in passes)
    assert {kind for kind, _, _ in kernels} == {"sdpa"}


@pytest.mark.parametrize("estimator,last_layers,expected", [
    ("probe-horizon", 4, {0}),  # the default heads: the middle third of the 2 layers
    ("rauq", 4, {0}),
    ("paper-lookahead", 1, {1}),  # the row's last layer alone
    ("paper-self", 0, {0, 1}),  # every layer
])
def test_an_attention_estimator_gets_eager_rows_of_its_layers_alone(tiny, kernels, estimator, last_layers, expected):
    passes = run(tiny, estimator, last_layers=last_layers)
    n_layers, n_heads = tiny.draft.config.num_hidden_layers, tiny.draft.config.num_attention_heads
    assert passes and all(layers == expected for layers, _, _ in passes)
    for _, attentions, length in passes:
        assert len(attentions) == n_layers
        for i, a in enumerate(attentions):
            assert (a is None) == (i not in expected)
            if a is not None:  # one new token's row over the whole context, rows of probabilities
                assert a.shape == (1, n_heads, 1, length)
                torch.testing.assert_close(a.sum(-1), torch.ones(1, n_heads, 1))
    assert {(layer, n) for kind, layer, n in kernels if kind == "eager"} == {(layer, 1) for layer in expected}


def test_sdpa_matches_the_eager_model_it_replaced(tiny):
    """fp32: the prefill's logits and cache, then a step's logits and attention weights, against an all-eager copy
    of the same weights."""
    eager = tiny_model(seed=1, hidden=64, layers=2)
    ids = tiny.encode_prompt("compare the two kernels on one prompt", 4)
    drafter = Drafter(tiny.draft)
    logits = drafter.prefill(ids).logits
    cache = DynamicCache()
    with torch.inference_mode():
        reference = eager(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).logits[0, -1]
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
        for mine, theirs in zip(drafter.cache.layers, cache.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        step, attentions, _ = drafter.forward([65], layers={0, 1})
        out = eager(input_ids=torch.tensor([[65]]), cache=cache, use_cache=True, output_attentions=True)
    torch.testing.assert_close(step, out.logits[0, -1], rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(attentions, out.attentions, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_teacher_forced_passes_asking_for_weights_get_eager_on_every_layer(tiny):
    """The study's path (`output_attentions=True`, no layer list, several new tokens, from an empty cache and after
    one): causal rows and logits equal to the all-eager model's."""
    eager = tiny_model(seed=1, hidden=64, layers=2)
    ids = tiny.encode_prompt("a teacher-forced answer", 4)
    caches = DynamicCache(), DynamicCache()
    for part in (ids[:6], ids[6:]):
        with torch.inference_mode():
            mine, theirs = (m(input_ids=torch.tensor([part]), cache=c, use_cache=True, output_attentions=True)
                            for m, c in zip((tiny.draft, eager), caches, strict=True))
        assert len(mine.attentions) == 2
        for a, b in zip(mine.attentions, theirs.attentions, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.logits, theirs.logits, rtol=1e-5, atol=1e-5)
