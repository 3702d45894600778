"""The policy registry (`hlm.policies`): every policy declared once, and the decoder and the sweep asking it."""

from dataclasses import replace

import pytest

from hlm.config import PolicyConfig, RunConfig, SamplingConfig
from hlm.policies import HYBRID, REGISTRY, should_upload
from hlm.policies import NAMES as POLICIES


def test_the_names_everyone_uses_come_from_the_registry():
    assert POLICIES == tuple(REGISTRY) == ("ours", "uhlm", "hlm", "slm", "llm", "random")
    tuned = tuple(n for n, p in REGISTRY.items() if p.tuned)  # runs with an importance setting
    gated = tuple(n for n, p in REGISTRY.items() if p.uses_u_th)  # runs with u_th
    assert (HYBRID, tuned, gated) == (("ours", "uhlm", "hlm", "slm", "random"), ("ours", "random"),
                                      ("ours", "uhlm", "random"))
    for p in REGISTRY.values():
        assert p.description
        assert (p.decide is None) == (p.uses_estimator or not p.drafts), p.name  # exactly one way to decide


def test_the_decoder_asks_the_registry_not_the_name(decoder, monkeypatch):
    config = RunConfig(SamplingConfig(max_new_tokens=8, stop_at_eos=False), PolicyConfig(name="hlm"))
    assert all(e.uploaded for e in decoder.generate("hi", config))
    monkeypatch.setitem(REGISTRY, "hlm", replace(REGISTRY["hlm"], decide=lambda config, u, coin: False))
    assert not any(e.uploaded for e in decoder.generate("hi", config))


def test_one_label_per_setting_names_the_knobs_the_decision_reads():
    label = {name: p.label(PolicyConfig(name=name, k=9, gamma=1.0, u_th=0.3, skip_rate=0.625))
             for name, p in REGISTRY.items()}
    assert label == {"ours": "ours k=9 γ=1", "uhlm": "uhlm u_th=0.3", "hlm": "hlm", "slm": "slm", "llm": "llm",
                     "random": "random skip=0.62"}
    assert REGISTRY["ours"].label(PolicyConfig(estimator="ubar")).endswith(" ubar")  # not the default: named
    assert len({p.colour for p in REGISTRY.values()}) == len(REGISTRY)  # every chart tells them apart


def test_policies_are_pure_functions_of_the_statistics():
    assert not should_upload(PolicyConfig(name="slm"), 1.0, 0.5)
    assert should_upload(PolicyConfig(name="hlm"), 0.0, 0.5)
    assert should_upload(PolicyConfig(name="uhlm", u_th=0.2), 0.3, 0.5)
    assert not should_upload(PolicyConfig(name="uhlm", u_th=0.2), 0.2, 0.5)
    assert should_upload(PolicyConfig(name="random", skip_rate=0.25), None, 0.5)  # the coin alone decides
    assert not should_upload(PolicyConfig(name="random", skip_rate=0.75), None, 0.5)
    with pytest.raises(ValueError):
        should_upload(PolicyConfig(name="ours"), 0.5, 0.5)  # ours asks its estimator (tests/test_estimators.py)


def test_the_loops_one_decision_hands_ours_to_its_estimator(monkeypatch):
    from types import SimpleNamespace

    import hlm.estimators
    from hlm.policies import decide

    draft = SimpleNamespace(u=0.5, stats="stats", importance="importance", score=0.25)
    assert decide(PolicyConfig(name="hlm"), draft, 0.5, None)
    assert not decide(PolicyConfig(name="slm"), draft, 0.5, None)
    assert decide(PolicyConfig(name="random", skip_rate=0.25), draft, 0.5, None)  # the policy's own rule
    asked = []

    class Judge:
        def decide(self, stats, importance, config, selection, score):
            asked.append((stats, importance, config.estimator, selection, score))
            return True

    monkeypatch.setitem(hlm.estimators.REGISTRY, "ubar", Judge())
    assert decide(PolicyConfig(name="ours", estimator="ubar"), draft, 0.0, "cal")
    assert asked == [("stats", "importance", "ubar", "cal", 0.25)]  # the estimator, not the policy, decided
