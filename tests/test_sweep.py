"""The sweep machinery on the tiny pair: columns, figures, resume after interruption, presets, decisions.
(BERTScore of tiny-model garbage means nothing, but it must run.)"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import Interrupted, interrupt_after, other_numerics

from hlm.cli.sweep import apply_preset, register
from hlm.config import ConfigError, RunConfig, SamplingConfig
from hlm.experiments.sweep import FULL, QUICK, TIMED, Grid, SweepSpec, choose_defaults, pick_setting, sweep

PROMPTS = [{"id": f"p{i}", "category": c, "prompt": p} for i, (c, p) in enumerate(
    [("code", "def add(a, b):"), ("knowledge", "What is the capital of France?"),
     ("explanation", "Why is the sky blue?")])]
GRID = Grid(policies=("ours", "uhlm", "hlm", "slm", "random"), ks=(2, 8), gammas=(0.0,), estimators=("ubar",))
BASE = RunConfig(SamplingConfig(max_new_tokens=4))
FIGURES = ("pareto", "upload_heatmap", "throughput", "energy_breakdown")
RUNS = 3 * (4 + 2 + 2)  # per prompt: llm, hlm, slm, uhlm, two ours settings, their two random controls


@pytest.fixture(scope="module")
def tools():
    from hlm.decoder import HybridDecoder
    from hlm.experiments.quality import get_scorer
    from hlm.experiments.workers import LocalWorkers
    from hlm.models import load_pair

    return LocalWorkers(HybridDecoder(load_pair("tiny"))), get_scorer()


@pytest.fixture(scope="module")
def full(tools, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    workers, scorer = tools
    return out, sweep(workers, scorer, SweepSpec("tiny", PROMPTS, GRID, BASE, out, progress=False))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def untimed(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMED} for r in rows]


def test_outputs_and_columns(full):
    out, result = full
    rows = read_csv(out / "results.csv")
    assert len(rows) == RUNS == len(list((out / "runs").glob("*.json")))
    for column in ("prompt_id", "category", "seed", "policy", "estimator", "k", "gamma", "u_th", "skip_rate",
                   "tokens", "uploads", "upload_rate", "energy_saving", "device_energy_j", "tokens_per_s",
                   "tokens_per_s_modelled_link", "device_energy_radio_j", "bertscore_f1"):
        assert column in rows[0], column
    scored = [r for r in rows if r["policy"] != "llm"]
    assert all(0.0 <= float(r["bertscore_f1"]) <= 1.0 for r in scored)
    assert {r["policy"] for r in rows} == {"llm", "hlm", "slm", "uhlm", "ours", "random"}
    assert all(float(r["upload_rate"]) == 1.0 for r in rows if r["policy"] == "hlm")
    summary = read_csv(out / "summary.csv")
    assert {"policy", "setting", "n_prompts", "bertscore_f1_mean", "bertscore_f1_ci95", "upload_rate_mean"} <= set(
        summary[0])
    assert all(int(r["n_prompts"]) == 3 for r in summary)
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == RUNS and saved["meta"]["link"]["bandwidth_hz"] > 0
    run = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert {"u", "importance", "important", "uploaded", "source"} == set(run["tokens"][0])
    assert json.loads((out / "decisions.json").read_text())["why"]


def test_random_control_matches_ours_upload_rate(full):
    _, result = full
    by = {(r["policy"], r["setting"], r["prompt_id"]): r for r in result.rows}
    for setting in ("ubar k=2 γ=0", "ubar k=8 γ=0"):
        ours = sum(by["ours", setting, p["id"]]["uploads"] for p in PROMPTS) / sum(
            by["ours", setting, p["id"]]["tokens"] for p in PROMPTS)
        skip = by["random", setting, PROMPTS[0]["id"]]["skip_rate"]
        assert skip == pytest.approx(1 - ours, abs=1e-4)


def test_figures_written(full):
    out, result = full
    for name in FIGURES:
        assert (out / "figures" / f"{name}.html").stat().st_size > 1000
    assert (out / "figures" / "plotly.min.js").is_file()  # the HTML works offline
    if shutil.which("chromium") or shutil.which("google-chrome"):
        assert result.figures["png_error"] is None, result.figures["png_error"]
        for name in FIGURES:
            assert (out / "figures" / f"{name}.png").stat().st_size > 1000


def test_resume_after_interruption_gives_the_same_table(tools, full, tmp_path):
    workers, scorer = tools
    seen = []
    with pytest.raises(Interrupted):
        sweep(workers, scorer, SweepSpec("tiny", PROMPTS, GRID, BASE, tmp_path, png=False, progress=False),
              after_run=interrupt_after(5, seen))
    assert len(list((tmp_path / "runs").glob("*.json"))) == 5
    assert not list((tmp_path / "runs").glob("*.tmp"))
    seen.clear()
    sweep(workers, scorer, SweepSpec("tiny", PROMPTS, GRID, BASE, tmp_path, png=False, progress=False),
          after_run=lambda job, record: seen.append(job))
    assert len(seen) == RUNS - 5  # the five finished runs were not redone
    assert untimed(read_csv(tmp_path / "results.csv")) == untimed(read_csv(full[0] / "results.csv"))


def test_runs_that_ask_an_estimator_are_cached_per_selection_calibration(tools, tmp_path):
    """A refit must not be served the runs of the fit before it; runs that ask no estimator keep their cache."""
    from hlm.estimators import Horizon
    from hlm.experiments.sweep import Job, Runner

    workers = tools[0]
    refit = replace(workers.facts, selection=replace(workers.facts.selection, horizon=Horizon(tokens=4.0)))
    before, after = (Runner(SimpleNamespace(facts=f), "tiny", tmp_path, None) for f in (workers.facts, refit))
    for policy, keyed in (("ours", True), ("slm", False), ("random", False)):
        job = Job(PROMPTS[0], replace(BASE, policy=GRID.config(policy, k=8, gamma=0.0, estimator="ubar")
                                      if policy == "ours" else GRID.config(policy)))
        assert (before.path(job) != after.path(job)) is keyed, policy


def test_runs_whose_estimator_reads_attention_are_keyed_by_the_path_that_computes_it(tools, tmp_path):
    """Where llama.cpp's graph gives the attention weights (`ModelPair.attention_path`), the runs of estimators that
    read them are decoded again; runs of estimators that read none, and of policies without one, keep their cache."""
    from hlm.experiments.sweep import Job, Runner

    facts = tools[0].facts
    assert facts.attention_path == ""  # the tiny pair drafts on transformers
    llama = replace(facts, attention_path="attention weights: llama.cpp, flash attention off")
    before, after = (Runner(SimpleNamespace(facts=f), "tiny", tmp_path, None) for f in (facts, llama))
    for policy, estimator, keyed in (("ours", "probe-horizon", True), ("ours", "paper-self", True),
                                     ("ours", "ubar", False), ("slm", "", False), ("random", "", False)):
        config = GRID.config(policy, k=8, gamma=0.0, estimator=estimator) if estimator else GRID.config(policy)
        job = Job(PROMPTS[0], replace(BASE, policy=config))
        assert (before.path(job) != after.path(job)) is keyed, (policy, estimator)


def test_the_llm_alone_keeps_its_cache_when_only_the_draft_changes(tools, tmp_path):
    """The LLM alone never runs the draft, so another draft path is served its cached runs; a change of the
    verifier's numerics, or any policy that drafts, is not."""
    from hlm.experiments.sweep import Job, Runner
    from hlm.models.numerics import without_draft

    facts = tools[0].facts
    other_draft, other_verifier = other_numerics(facts.numerics)
    assert without_draft(other_draft) == without_draft(facts.numerics) != without_draft(other_verifier)
    assert without_draft("an older key") == "an older key"  # another shape is compared whole
    runners = [Runner(SimpleNamespace(facts=replace(facts, numerics=n)), "tiny", tmp_path, None)
               for n in (facts.numerics, other_draft, other_verifier)]
    for policy in ("llm", "slm", "hlm"):
        job = Job(PROMPTS[0], replace(BASE, policy=GRID.config(policy)))
        same_verifier, other_verifier = (runners[0].path(job) == r.path(job) for r in runners[1:])
        assert same_verifier is (policy == "llm") and not other_verifier, policy


def test_a_newly_registered_policy_runs(tools, tmp_path, monkeypatch):
    """The sweep runs policies by their role, so a policy added to the registry is run (a baseline: once per prompt
    and seed), uploading as its own rule says."""
    from hlm.policies import REGISTRY, Policy

    monkeypatch.setitem(REGISTRY, "unsure", Policy("unsure", "if u > 0.8", "baseline",
                                                   lambda config, u, coin: u > 0.8, uses_uncertainty=True))
    workers, scorer = tools
    result = sweep(workers, scorer, SweepSpec("tiny", PROMPTS, Grid(policies=("unsure",)), BASE, tmp_path,
                                              png=False, progress=False))
    rows = [r for r in result.rows if r["policy"] == "unsure"]
    assert sorted(r["prompt_id"] for r in rows) == [p["id"] for p in PROMPTS]
    assert all(r["setting"] == "-" and r["u_th"] is None and r["bertscore_f1"] is not None for r in rows)
    runs = [json.loads(path.read_text()) for path in (tmp_path / "runs").glob("*.json")]
    tokens = [t for run in runs if run["identity"]["config"]["policy"]["name"] == "unsure" for t in run["tokens"]]
    assert [t["uploaded"] for t in tokens] == [t["u"] > 0.8 for t in tokens]
    assert any(t["uploaded"] for t in tokens) and not all(t["uploaded"] for t in tokens)  # its rule, not hlm's or slm's


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return apply_preset(parser.parse_args(["sweep", "--out", "x", *argv]))


def test_quick_preset_and_overrides():
    args = parse(["--quick"])
    assert (args.limit, args.max_new_tokens, args.k, args.gamma, args.seeds) == (
        QUICK["limit"], QUICK["max_new_tokens"], QUICK["k"], QUICK["gamma"], QUICK["seeds"])
    args = parse(["--quick", "--k", "3", "--gamma", "0.5,2", "--max-new-tokens", "10", "--policies", "ours,random"])
    assert (args.k, args.gamma, args.max_new_tokens, args.limit) == ((3,), (0.5, 2.0), 10, QUICK["limit"])
    assert args.policies == ("ours", "random")
    args = parse([])
    assert (args.k, args.gamma, args.limit) == (FULL["k"], FULL["gamma"], None)


@pytest.mark.parametrize("argv", [["--policies", "ours,nope"], ["--k", "two"], ["--estimators", "magic"]])
def test_bad_lists_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2


def test_bad_grid_fails_before_any_model_work():
    with pytest.raises(ConfigError, match="include ours"):
        Grid(policies=("random", "uhlm"))
    with pytest.raises(ConfigError, match="k must be"):
        Grid(ks=(0,))


def summary_row(policy, setting, quality, saving, estimator="lookahead"):
    return {"policy": policy, "setting": setting, "estimator": estimator if policy == "ours" else None,
            "bertscore_f1_mean": quality, "energy_saving_mean": saving, "upload_rate_mean": 1 - saving}


def test_pick_setting_and_decisions():
    summary = [summary_row("hlm", "-", 0.90, 0.0), summary_row("uhlm", "-", 0.86, 0.3),
               summary_row("ours", "a", 0.895, 0.35), summary_row("ours", "b", 0.87, 0.5),
               summary_row("ours", "c", 0.80, 0.7, "self")]
    assert pick_setting(summary, 0.89)["setting"] == "a"
    assert pick_setting(summary, 0.86)["setting"] == "b"
    assert pick_setting(summary, 0.0, estimator="self")["setting"] == "c"
    assert pick_setting(summary, 0.99) is None
    d = choose_defaults([{"policy": "hlm"}], summary, tolerance=0.01)
    assert (d["accuracy_leaning"]["setting"], d["energy_leaning"]["setting"], d["estimator"]) == ("a", "b", "lookahead")
    d = choose_defaults([{"policy": "hlm"}], [summary_row("hlm", "-", 0.99, 0.0), *summary[1:]], tolerance=0.01)
    assert d["accuracy_leaning"]["setting"] == "a" and "none reaches" in d["why"]  # best BERTScore as fallback
