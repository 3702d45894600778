"""Estimators and their decision rule (hlm/estimators.py, hlm/features.py) on the tiny pair and on hand-made stats."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import cfg

from hlm.config import ConfigError, PolicyConfig
from hlm.estimators import (
    LOG_FLOOR,
    NAMES,
    REGISTRY,
    UNIFORM,
    WINDOW,
    DraftStats,
    Judge,
    Probe,
    ScoreScale,
    SelectionCalibration,
    feature,
    prompt_key,
)
from hlm.features import default_heads, draft_stats, prev_attention
from hlm.models import PRESETS
from hlm.uncertainty import Uncertainty

SCORES = [n for n in NAMES if not REGISTRY[n].uses_u_th]


def stats(ubar=0.3, p=0.5, att=0.4, prev=0.9, semantic=0.5):
    return DraftStats(u=ubar, ubar=ubar, p_draft=p, p_top=max(p, 0.5), margin=0.1, entropy=1.0, semantic=semantic,
                      prev_attention=att, p_prev=prev)


@pytest.mark.parametrize("estimator", SCORES)
def test_score_estimators_on_the_tiny_pair(decoder, estimator):
    """Every draft carries a finite score in [0, 1] and its bar, and is uploaded iff score >= bar."""
    events = list(decoder.generate("abc", cfg("ours", n=32, estimator=estimator, k=8, gamma=0.0, u_th=0.0)))
    assert len(events) == 32
    for e in events:
        assert 0.0 <= e.score <= 1.0 and math.isfinite(e.score_threshold) and 0.0 <= e.ubar <= 1.0
        assert e.uploaded == (e.score >= e.score_threshold)
    assert 0 < sum(e.uploaded for e in events) < 32


@pytest.mark.parametrize("estimator", SCORES)
def test_upload_rate_is_monotone_in_k_and_gamma(decoder, estimator):
    """Replayed on one run's drafts (the decision is a pure function of the stats): more k, more uploads;
    more gamma, fewer; and every step of k moves the bar (no dead zone)."""
    from hlm.decoder import Draft  # noqa: F401 - the decoder's record: stats come from its events

    events = list(decoder.generate("abc", cfg("ours", n=48, estimator=estimator, k=8, gamma=0.0, u_th=0.0)))
    scores = np.array([e.score for e in events])
    cal = decoder.pair.selection
    scale = cal.scale(estimator)
    by_k = [(scores >= scale.threshold(k, 0.0)).mean() for k in range(1, WINDOW + 1)]
    by_gamma = [(scores >= scale.threshold(8, g)).mean() for g in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(a <= b for a, b in zip(by_k, by_k[1:], strict=False)) and by_k[0] < by_k[-1] == 1.0
    assert all(a >= b for a, b in zip(by_gamma, by_gamma[1:], strict=False)) and by_gamma[-1] < by_gamma[0]
    bars = [scale.threshold(k, 0.0) for k in range(1, WINDOW + 1)]
    assert all(a > b for a, b in zip(bars, bars[1:], strict=False))


def test_threshold_is_the_calibrated_quantile_plus_gamma_std():
    scale = ScoreScale(tuple(np.linspace(0.0, 0.64, WINDOW + 1)), std=0.1)
    assert scale.threshold(8, 0.0) == pytest.approx(0.64 * 24 / 32)  # top 8 of 32 on the calibration prompts
    assert scale.threshold(8, 2.0) == pytest.approx(0.64 * 24 / 32 + 0.2)
    assert scale.threshold(WINDOW, 0.0) == 0.0
    assert UNIFORM.threshold(16, 0.0) == pytest.approx(0.5)


def test_k_out_of_range_is_refused():
    for k in (0, WINDOW + 1):
        with pytest.raises(ConfigError, match="k must be"):
            PolicyConfig(k=k)
    with pytest.raises(ConfigError, match="unknown estimator"):
        PolicyConfig(estimator="lookahead")


def test_draft_stats_from_logits():
    valid = torch.ones(50, dtype=torch.bool)
    valid[45:] = False  # filler ids never count
    z = torch.zeros(50)
    z[3], z[45] = 5.0, 50.0
    emb = torch.randn(50, 8)
    s = draft_stats(z, 3, Uncertainty(0.1, 0.2), valid, emb, 0.5, 0.9)
    p3 = math.exp(5) / (math.exp(5) + 44)
    assert s.p_draft == pytest.approx(p3, rel=1e-5) and s.p_top == pytest.approx(p3, rel=1e-5)
    assert s.margin == pytest.approx(p3 - 1 / (math.exp(5) + 44), rel=1e-5)
    assert 0.0 <= s.semantic <= 2.0 and s.entropy > 0
    same = emb.clone()
    same[:] = emb[3]  # every alternative means the same as the draft: no semantic change
    assert draft_stats(z, 3, Uncertainty(0.1, 0.2), valid, same).semantic == pytest.approx(0.0, abs=1e-6)


def test_prev_attention_reads_the_previous_column():
    att = torch.zeros(1, 2, 1, 5)
    att[0, 0, 0, 3], att[0, 1, 0, 3] = 0.6, 0.2  # the query sits at key 4; its previous token is key 3
    assert prev_attention([att, att], [(0, 0), (1, 1)]) == pytest.approx(0.4)
    full = torch.zeros(1, 1, 5, 5)
    full[0, 0, 2, 1] = 0.7  # a teacher-forced prefill: query 2 looks back at 1
    assert prev_attention([full], [(0, 0)], query=2) == pytest.approx(0.7)
    assert default_heads(24, 14)[0] == (8, 0) and len(default_heads(24, 14)) == 8 * 14


def test_rauq_and_semantic_scores_move_the_right_way():
    cal = SelectionCalibration()
    rauq, sem = REGISTRY["rauq"], REGISTRY["semantic"]
    assert rauq.score(stats(att=0.1), cal) > rauq.score(stats(att=0.9), cal)  # the head lost the previous token
    assert rauq.score(stats(p=0.2), cal) > rauq.score(stats(p=0.9), cal)
    assert sem.score(stats(semantic=0.9), cal) > sem.score(stats(semantic=0.1), cal)


def test_probe_matches_a_logistic_model_and_round_trips(tmp_path):
    probe = Probe(("ubar", "one_minus_p", "prev_attention"), (0.2, 0.3, 0.5), (0.1, 0.2, 0.2), (1.5, 0.5, -0.7), -1.0)
    s = stats(ubar=0.4, p=0.6, att=0.3)
    z = -1.0 + 1.5 * (0.4 - 0.2) / 0.1 + 0.5 * (0.4 - 0.3) / 0.2 - 0.7 * (0.3 - 0.5) / 0.2
    assert probe(s) == pytest.approx(1 / (1 + math.exp(-z)))
    assert probe(stats(att=None)) == pytest.approx(probe(stats(att=0.5)))  # missing: the training mean
    cal = SelectionCalibration(heads=((3, 1),), probe=probe, scales={"probe": ScoreScale((0.0,) * 33, 0.1)},
                               note="test", tuned_on=(prompt_key("a"),))
    cal.save(tmp_path / "c.json")
    assert SelectionCalibration.load(tmp_path / "c.json") == cal
    assert cal.leaked(["a", "b"]) == ["a"]


def test_the_shipped_probe_tells_confident_drafts_apart():
    """Most drafts of a long code answer have p > 0.999. A probe that saw only 1 - p, the margin and the entropy gave
    them all about the same score (within 10 % from 1 - p = 1e-2 to 1e-5), so one step of k uploaded them all at
    once; the log-scale features rank them, so that each decade of doubt at least halves the score."""

    def confident(eps: float) -> DraftStats:
        p = 1.0 - eps
        return DraftStats(u=0.0, ubar=eps, p_draft=p, p_top=p, margin=p - eps,
                          entropy=-p * math.log(p) - eps * math.log(eps), semantic=0.7, p_prev=p)

    cal = PRESETS["embedded"].selection_calibration()
    scores = [REGISTRY["probe"].score(confident(eps), cal) for eps in (1e-2, 1e-3, 1e-4, 1e-5)]
    assert all(a >= 2 * b for a, b in zip(scores[:-1], scores[1:], strict=True)), scores
    assert feature(stats(p=1.0), "log_one_minus_p") == math.log(LOG_FLOOR)  # floored, not -inf
    assert feature(confident(1e-3), "log_entropy") == pytest.approx(math.log(confident(1e-3).entropy))


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_judge_matches_its_sklearn_model_and_round_trips_without_pickle(tmp_path, kind):
    """The judge scores a draft exactly as the sklearn model it was fitted as (standardised scalars + hidden state),
    imputes a missing scalar by its mean, and ships as plain numbers in the calibration's JSON."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    features, width = ("ubar", "one_minus_p", "p_prev"), 8
    x = rng.normal(size=(400, len(features) + width)).astype(np.float32)
    y = (x[:, 0] + x[:, 4] - x[:, 7] > 0).astype(int)
    mean, scale = x.mean(0), x.std(0)
    z = (x - mean) / scale
    if kind == "logistic":
        model = LogisticRegression().fit(z, y)
        weights, biases = (model.coef_.T,), (model.intercept_,)
    else:
        model = MLPClassifier((5,), max_iter=3000, random_state=0).fit(z, y)
        weights, biases = tuple(model.coefs_), tuple(model.intercepts_)
    judge = Judge(features, mean, scale, tuple(w.astype(np.float32) for w in weights),
                  tuple(b.astype(np.float32) for b in biases), note="test")
    for row in x[:20]:
        s = DraftStats(u=0, ubar=float(row[0]), p_draft=1 - float(row[1]), p_top=1, margin=0, entropy=0, semantic=0,
                       p_prev=float(row[2]), hidden=torch.tensor(row[3:]))
        assert judge(s) == pytest.approx(model.predict_proba((row[None] - mean) / scale)[0, 1], abs=1e-5)
    missing = DraftStats(u=0, ubar=0.1, p_draft=0.5, p_top=1, margin=0, entropy=0, semantic=0, p_prev=None,
                         hidden=x[0, 3:])
    assert judge(missing) == pytest.approx(judge(DraftStats(**{**missing.__dict__, "p_prev": float(mean[2])})))
    cal = SelectionCalibration(note="t", judge=judge)
    cal.save(tmp_path / "selection-x.json")
    assert json.loads((tmp_path / "selection-x.json").read_text())["judge"]["features"] == list(features)
    back = SelectionCalibration.load(tmp_path / "selection-x.json").judge
    assert back is not None and back.features == features and back.note == "test"
    assert back(missing) == pytest.approx(judge(missing))
    assert list(tmp_path.iterdir()) == [tmp_path / "selection-x.json"]  # no file beside it
    SelectionCalibration(note="t").save(tmp_path / "selection-x.json")
    assert SelectionCalibration.load(tmp_path / "selection-x.json").judge is None


def test_paper_literal_rule_needs_uncertainty_and_importance():
    from hlm.importance import Importance

    est = REGISTRY["paper-lookahead"]
    pol = PolicyConfig(estimator="paper-lookahead", u_th=0.2)
    cal = SelectionCalibration()
    yes, no = Importance(0.3, 0.1, 0, True), Importance(0.05, 0.1, 5, False)
    assert est.decide(stats(ubar=0.5), yes, pol, cal)
    assert not est.decide(stats(ubar=0.5), no, pol, cal)
    assert not est.decide(stats(ubar=0.1), yes, pol, cal)
    assert est.passes == 2 and REGISTRY["paper-self"].passes == 1


def test_horizon_decays_with_the_slms_doubt_and_the_position():
    """`Horizon`: floor + (1 - floor) exp(doubt * log_p_before - index / tokens). A confidently copied stretch keeps a
    late draft's weight where a doubted one loses it; tokens = 0 drops the position term; numbers and arrays agree."""
    from hlm.estimators import Horizon

    h = Horizon(tokens=0.0, floor=0.1, doubt=0.5)
    copied = DraftStats(**{**stats().__dict__, "index": 60, "log_p_before": 60 * math.log(0.99)})
    doubted = DraftStats(**{**stats().__dict__, "index": 60, "log_p_before": 60 * math.log(0.7)})
    assert h(copied) == pytest.approx(0.1 + 0.9 * 0.99 ** 30) and h(copied) > 0.6
    assert h(doubted) == pytest.approx(0.1 + 0.9 * 0.7 ** 30) and h(doubted) < 0.11
    assert Horizon(tokens=16.0, floor=0.05)(copied) == pytest.approx(0.05 + 0.95 * math.exp(-60 / 16))
    both = Horizon(tokens=16.0, floor=0.05, doubt=0.25)
    weights = both.weight(np.array([0, 60]), np.array([0.0, copied.log_p_before]))
    assert weights[0] == pytest.approx(1.0) and weights[1] == pytest.approx(both(copied))


def test_the_decoder_hands_each_draft_the_log_probability_of_the_drafts_before_it(decoder, monkeypatch):
    """`DraftStats.log_p_before` in a real run: 0 for the first draft, then the sum of log p_draft over the drafts
    decided before it (uploaded or not), which the study computes the same way from its rows. Each draft is scored
    once: the decision reuses the score its event carries."""
    from hlm.estimators import MIN_P, HorizonWeighted
    from hlm.experiments.study.score import log_p_before

    seen: list[DraftStats] = []
    score = HorizonWeighted.score
    monkeypatch.setattr(HorizonWeighted, "score", lambda self, s, cal: (seen.append(s), score(self, s, cal))[1])
    events = list(decoder.generate("abc", cfg("ours", n=24, estimator="probe-horizon", k=8, gamma=0.0)))
    assert len(seen) == len(events) == 24 and [s.index for s in seen] == list(range(24))
    assert any(e.source != "local" for e in events)
    expected = np.cumsum([0.0] + [math.log(max(s.p_draft, MIN_P)) for s in seen[:-1]])
    assert [s.log_p_before for s in seen] == pytest.approx(expected.tolist())
    assert log_p_before([{"p_draft": s.p_draft} for s in seen]) == pytest.approx(expected)
    assert seen[-1].log_p_before < 0
