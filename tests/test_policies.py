"""The policy registry (`hlm.policies`): every policy declared once, and the decoder and the sweep asking it."""

from dataclasses import replace

from hlm.config import POLICIES, PolicyConfig, RunConfig, SamplingConfig
from hlm.experiments.sweep import GATED, HYBRID, TUNED
from hlm.policies import REGISTRY


def test_the_names_everyone_uses_come_from_the_registry():
    assert POLICIES == tuple(REGISTRY) == ("ours", "uhlm", "hlm", "slm", "llm", "random")
    assert (HYBRID, TUNED, GATED) == (("ours", "uhlm", "hlm", "slm", "random"), ("ours", "random"),
                                      ("ours", "uhlm", "random"))
    for p in REGISTRY.values():
        assert p.description
        assert (p.decide is None) == (p.uses_estimator or not p.drafts), p.name  # exactly one way to decide


def test_the_decoder_asks_the_registry_not_the_name(decoder, monkeypatch):
    config = RunConfig(SamplingConfig(max_new_tokens=8, stop_at_eos=False), PolicyConfig(name="hlm"))
    assert all(e.uploaded for e in decoder.generate("hi", config))
    monkeypatch.setitem(REGISTRY, "hlm", replace(REGISTRY["hlm"], decide=lambda config, u, coin: False))
    assert not any(e.uploaded for e in decoder.generate("hi", config))
