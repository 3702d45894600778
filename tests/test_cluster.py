"""Experiments on Ray (`--ray`): the same rows as serial, a node lost mid-sweep, a failing job, loopback only.

One local Ray instance serves the module (started by the first `RayWorkers`); the node-loss test builds its own
two-node `ray.cluster_utils.Cluster` after it. Traffic stays on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from hlm import cluster  # noqa: E402
from hlm.config import RunConfig, SamplingConfig  # noqa: E402
from hlm.experiments.sweep import TIMED, Grid, SweepSpec, sweep  # noqa: E402
from hlm.experiments.workers import LocalWorkers, PairSpec, RayWorkers  # noqa: E402

PROMPTS = [{"id": f"p{i}", "category": "code", "prompt": p} for i, p in enumerate(
    ["def add(a, b):", "Why is the sky blue?", "Sort a list in Python.", "What is 2 + 2?"])]
GRID = Grid(policies=("ours", "hlm", "slm", "random"), ks=(4,), gammas=(0.0,), estimators=("ubar",))
BASE = RunConfig(SamplingConfig(max_new_tokens=12))
JOBS = 4 * 5  # per prompt: llm, hlm, slm, ours, and the coin matched to ours


@pytest.fixture(scope="module")
def scorer():
    from hlm.experiments.quality import get_scorer

    return get_scorer()


@pytest.fixture(scope="module")
def serial(scorer, tmp_path_factory):
    from hlm.decoder import HybridDecoder
    from hlm.models import load_pair

    out = tmp_path_factory.mktemp("serial")
    return out, sweep(LocalWorkers(HybridDecoder(load_pair("tiny"))), scorer, spec(out))


@pytest.fixture(scope="module")
def local_ray():
    """Two workers on a local instance (loopback only); stopped when the module's other tests are done."""
    workers = RayWorkers(PairSpec("tiny"), n=2, cpus=0.5, address="local")  # leaves a CPU for the CLI's
    yield workers
    workers.close()


def spec(out: Path, prompts: list[dict[str, str]] = PROMPTS) -> SweepSpec:
    return SweepSpec("tiny", prompts, GRID, BASE, out, png=False, progress=False)


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMED} for r in rows]


def run_files(out: Path) -> dict[str, dict]:
    """Run files by name, without the timed summary fields."""
    files = {}
    for path in sorted((out / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        record["summary"] = {k: v for k, v in record["summary"].items() if k not in TIMED and not k.endswith("_s")}
        files[path.name] = record
    return files


def test_ray_sweep_equals_the_serial_sweep(serial, local_ray, scorer, tmp_path):
    result = sweep(local_ray, scorer, spec(tmp_path))
    assert len(result.rows) == JOBS and not result.failed
    assert untimed(result.rows) == untimed(serial[1].rows)
    assert run_files(tmp_path).keys() == run_files(serial[0]).keys()
    for name, record in run_files(tmp_path).items():
        theirs = run_files(serial[0])[name]
        assert record["tokens"] == theirs["tokens"] and record["text"] == theirs["text"], name
    assert set(local_ray.done) == {"w0", "w1"}  # both actors took jobs


def test_a_failing_job_is_reported_and_the_rest_complete(local_ray, scorer, tmp_path):
    bad = {"id": "empty", "category": "code", "prompt": "   "}
    result = sweep(local_ray, scorer, spec(tmp_path, [PROMPTS[0], bad, PROMPTS[1]]))
    assert {f["prompt_id"] for f in result.failed} == {"empty"}
    assert all("PromptError" in f["error"] for f in result.failed)
    assert sorted({r["prompt_id"] for r in result.rows}) == ["p0", "p1"] and len(result.rows) == 10
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["failed_jobs"] == result.failed


def test_a_local_instance_stays_on_loopback(local_ray):
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}


def test_the_commands_take_ray_flags(local_ray, tmp_path, capsys):
    """`--ray local` on the CLI joins the instance this process already runs; a bad address is one line, exit 2."""
    from hlm.cli import main

    argv = ["sweep", "--models", "tiny", "--limit", "2", "--max-new-tokens", "4", "--policies", "ours,hlm",
            "--k", "4", "--gamma", "0", "--estimators", "ubar", "--no-png", "--out", str(tmp_path)]
    assert main([*argv, "--ray", "local", "--workers", "2", "--worker-cpus", "0.5"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["workers"] == 2
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--ray", "10.0.0.1:6379"])
    assert exc.value.code == 2 and "give local, auto or ray://HOST:PORT" in capsys.readouterr().err


def test_every_worker_multiplies_in_one_block_of_rows(local_ray, monkeypatch):
    """The verifier's block is timed at load, and two actors timing at once came out 1 and 4 (an AMX machine): one
    actor measures it, every actor takes it; one pinned on the driver ($HLM_BLOCK_ROWS) reaches every actor."""
    from hlm import rows

    assert local_ray.facts.block_rows in (1, rows.BLOCK)
    monkeypatch.setenv(rows.BLOCK_ENV, "3")  # never measured: only the pin gives it
    pinned = RayWorkers(PairSpec("tiny"), n=2, cpus=0.5, address="local")
    try:
        assert pinned.facts.block_rows == 3 and pinned.facts.numerics.endswith("3-row blocks")
    finally:
        pinned.close()


def test_humaneval_runs_its_jobs_on_ray(local_ray, tmp_path):
    """The decoding goes to the actors; the tests of each completion run here, on the driver."""
    from hlm.cli import main

    argv = ["eval", "humaneval", "--models", "tiny", "--limit", "1", "--max-new-tokens", "4", "--policies",
            "slm,ours,random", "--ks", "4", "--estimators", "ubar", "--no-png", "--out", str(tmp_path)]
    assert main([*argv, "--ray", "local", "--workers", "2", "--worker-cpus", "0.5"]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["meta"]["workers"] == 2 and len(saved["rows"]) == 3
    assert len(list((tmp_path / "checks").glob("*.json"))) >= 1


def test_the_study_replay_on_ray_equals_serial(local_ray, tmp_path):
    from hlm.decoder import HybridDecoder
    from hlm.experiments.study import collect
    from hlm.models import load_pair

    args = (PROMPTS[:3], 6, [0], 0.7, 2)  # prompts, tokens, sampled seeds, temperature, batch
    serial = collect(LocalWorkers(HybridDecoder(load_pair("tiny"))), "tiny", args[0], tmp_path / "a", *args[1:],
                     progress=False)
    on_ray = collect(local_ray, "tiny", args[0], tmp_path / "b", *args[1:], progress=False)
    assert len(serial) == 6
    for a, b in zip(on_ray, serial, strict=True):  # the rows equal; the hidden states (the judge's input) too
        assert {k: v for k, v in a.items() if k != "hidden"} == {k: v for k, v in b.items() if k != "hidden"}
        np.testing.assert_array_equal(a["hidden"], b["hidden"])


def test_a_node_lost_mid_sweep_loses_and_duplicates_no_job(serial, scorer, tmp_path, local_ray):
    """Two nodes of one CPU, one worker on each; the second node is removed after a few runs. Its job runs again
    on the first node: every job is written exactly once and the table equals the serial one."""
    from ray.cluster_utils import Cluster

    local_ray.close()  # this test needs its own cluster
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    second = nodes.add_node(num_cpus=1)
    try:
        ray.init(address=nodes.address, runtime_env=cluster.runtime_env(), log_to_driver=False)
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        workers = RayWorkers(PairSpec("tiny"), n=2, address="auto", patience_s=60)
        written = []

        def remove_after_three(job, record):
            written.append((job.prompt["id"], job.config.to_dict()))
            if len(written) == 3:
                nodes.remove_node(second)

        result = sweep(workers, scorer, spec(tmp_path), after_run=remove_after_three)
        workers.close()
    finally:
        ray.shutdown()
        nodes.shutdown()
    assert len(written) == JOBS and len({json.dumps(w, sort_keys=True) for w in written}) == JOBS
    assert len(list((tmp_path / "runs").glob("*.json"))) == JOBS
    assert untimed(result.rows) == untimed(serial[1].rows)
    assert workers.requeued >= 1  # the removed node held a job, and it ran again elsewhere
