"""The selection study (hlm/experiments/study/): its metrics on hand-made cases with known answers, the command on
the tiny pair, and the tuning/report split of the shipped calibration."""

import json

import numpy as np
import pytest

from hlm.estimators import SelectionCalibration
from hlm.experiments.prompts import load_prompts
from hlm.experiments.study import capture, coin_outcome, faithful, greedy_outcome, paired_summary
from hlm.models import ASSETS, PRESETS


def test_greedy_outcome_stops_at_the_first_missed_divergence():
    g = np.array([0, 1, 0, 1, 0, 0, 1, 0])
    selected = np.array([0, 1, 0, 0, 1, 1, 1, 0], dtype=bool)  # catches the first divergence, misses the second
    prefix, first, caught, total = greedy_outcome(selected, g)
    assert (prefix, first, caught, total) == (3 / 8, 1.0, 2, 3)
    assert greedy_outcome(np.ones(8, dtype=bool), g)[0] == 1.0  # every divergence verified: the LLM's answer
    assert greedy_outcome(np.zeros(4, dtype=bool), np.zeros(4))[:2] == (1.0, None)  # nothing to catch


def test_coin_outcome_is_the_expectation_of_coin_flips():
    g = np.array([0, 0, 1, 0, 1, 1, 0, 0, 0, 1])
    rng = np.random.default_rng(0)
    sims = [greedy_outcome(rng.random(10) < 0.3, g) for _ in range(40000)]
    prefix, first, caught, total = coin_outcome(0.3, g)
    assert prefix == pytest.approx(np.mean([s[0] for s in sims]), abs=0.005)
    assert first == pytest.approx(np.mean([s[1] for s in sims]), abs=0.01)
    assert caught == pytest.approx(np.mean([s[2] for s in sims]), abs=0.02) and total == 4


def test_captured_rejection_mass():
    beta = [np.array([0.9, 0.0, 0.1]), np.array([0.0, 1.0])]
    scores = [np.array([0.8, 0.1, 0.3]), np.array([0.2, 0.9])]
    out = capture(scores, beta, 0.4, 0.5, np.random.default_rng(0))
    assert out["crm"] == pytest.approx(1.9 / 2.0)
    assert out["crm_lo"] <= out["crm"] <= out["crm_hi"]


def test_faithful_prefix_and_paired_summary():
    assert faithful([1, 2, 3, 9], [1, 2, 3, 4]) == 0.75
    assert faithful([1, 2], [1, 2, 3, 4]) == 0.5
    per = [{"ours_upload_rate": 0.3, "coin_upload_rate": 0.3, "ours_prefix": 0.9, "coin_prefix": 0.5,
            "ours_prefix_ystar": 0.8, "coin_prefix_ystar": 0.5, "ours_f1": 0.95, "coin_f1": 0.85 + 0.01 * i}
           for i in range(10)]
    s = paired_summary(per)
    assert s["prefix"]["delta"] == pytest.approx(0.4) and s["prefix"]["delta_lo"] == pytest.approx(0.4)
    assert 0 < s["f1"]["delta_lo"] < s["f1"]["delta"] < s["f1"]["delta_hi"] and s["f1"]["wilcoxon_p"] < 0.01


def test_study_command_on_the_tiny_pair_resumes_from_its_cache(tmp_path, capsys):
    from hlm.cli import main

    argv = ["study", "--models", "tiny", "--limit", "3", "--max-new-tokens", "8", "--out", str(tmp_path),
            "--confirm", "6", "--coin-seeds", "0,1", "--quality", "6", "--references", "2"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    rules = {r["rule"] for r in summary["rows"]}
    assert {"probe", "ubar", "semantic", "rauq", "paper-lookahead", "paper-self", "coin", "oracle"} <= rules
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "capture.html").stat().st_size > 1000
    confirm = summary["confirm"]["summary"]
    assert confirm["prompts"] == 3 and 0 <= confirm["llm_prefix_ystar"] <= 1
    assert {"prefix", "prefix_ystar", "f1"} <= set(confirm)  # against the LLM alone, and against the batched y*
    assert len(list((tmp_path / "confirm").glob("*.json"))) == 3 * 4  # per prompt: ours, two coins, the LLM alone
    q = summary["quality"]["summary"]
    assert q["prompts"] == 3 and 0 <= q["hlm_f1"] <= 1 and q["delta_lo"] <= q["delta"] <= q["delta_hi"]
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    assert len(cached) == 12  # greedy + one sampled seed per prompt, rows (JSON) and hidden states (.npy)
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == cached
    printed = capsys.readouterr().out
    assert "end to end on 3 prompts" in printed and "against 2 LLM samples each" in printed


def test_reports_never_use_the_prompts_the_calibration_was_fitted_on():
    """The shipped calibration was fitted on exactly the tuning prompts (both files); the held-back set shares none of
    them."""
    tune = [p["prompt"] for f in ("prompts.jsonl", "prompts-tune-more.jsonl") for p in load_prompts(ASSETS / f)]
    held = [p["prompt"] for p in load_prompts(ASSETS / "prompts-heldout.jsonl")]
    assert len(held) >= 64 and not set(tune) & set(held)
    cal = PRESETS["embedded"].selection_calibration()
    assert cal.probe is not None and cal.judge is not None and len(cal.tuned_on) == len(tune)  # the judge ships too
    assert cal.leaked(tune) == tune and cal.leaked(held) == []


def test_study_refuses_to_report_on_tuned_prompts(tmp_path, monkeypatch, tiny):
    from hlm.cli import main
    from hlm.estimators import prompt_key
    from hlm.models import presets

    prompts = load_prompts(ASSETS / "prompts.jsonl", 2)
    monkeypatch.setattr(tiny, "selection", SelectionCalibration(tuned_on=(prompt_key(prompts[0]["prompt"]),)))
    monkeypatch.setattr(presets, "load_pair", lambda *a, **k: tiny)
    assert main(["study", "--models", "tiny", "--limit", "2", "--out", str(tmp_path)]) == 2


NOISE = 0.05


def test_fit_ships_a_judge_that_the_decoder_scores_with(tmp_path, monkeypatch, tiny):
    """--fit writes the judge into the calibration (plain JSON, out-of-fold scores in the report); the decoder,
    given that calibration, scores each draft with the judge on the hidden state of the pass that drafted it."""
    import copy

    import torch
    from conftest import cfg

    from hlm.cli import main
    from hlm.decoder import HybridDecoder
    from hlm.models import presets

    # The tiny pair's two random models disagree on nearly every token: a verifier that is the drafter slightly
    # perturbed gives both labels, as a real pair does.
    verifier = copy.deepcopy(tiny.draft)
    with torch.no_grad():
        for w in verifier.parameters():
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * NOISE)
    monkeypatch.setattr(tiny, "verifier", verifier)
    monkeypatch.setattr(tiny, "selection", SelectionCalibration())
    monkeypatch.setattr(presets, "load_pair", lambda *a, **k: tiny)
    fit = tmp_path / "selection-tiny.json"
    assert main(["study", "--models", "tiny", "--limit", "8", "--max-new-tokens", "12", "--out", str(tmp_path),
                 "--fit", str(fit)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["judge"].startswith("out-of-fold")
    assert {"judge", "judge-horizon"} <= {r["rule"] for r in summary["rows"]}
    cal = SelectionCalibration.load(fit)
    assert cal.judge is not None and fit.stat().st_size < 2 * 2**20 and list(tmp_path.glob("*.safetensors")) == []
    assert cal.judge.mean.shape[0] == len(cal.judge.features) + tiny.draft.config.hidden_size
    monkeypatch.setattr(tiny, "selection", cal)
    events = list(HybridDecoder(tiny).generate("abc", cfg("ours", n=16, estimator="judge", k=8, gamma=0.0)))
    assert all(0.0 <= e.score <= 1.0 for e in events) and len({e.score for e in events}) > 1
    assert any(e.score != pytest.approx(e.ubar) for e in events)  # the judge's, not the unfitted fallback (ubar)
