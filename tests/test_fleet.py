"""The cloud as a fleet: `serve-cloud --replicas` (a pool of Ray actors behind the one FastAPI front) and
`python -m hlm fleet`, on the tiny pair and one local Ray instance for the whole module (loopback only).

Parity and strict affinity over 2 replicas, a replica killed mid-run, the fleet experiment's accounting."""

import csv
import json
import threading
import time

import pytest
from conftest import TOKEN, cfg

from hlm.cli import main as cli_main
from hlm.cloud.client import HttpVerifier
from hlm.decoder import HybridDecoder

PROMPT = "abc"
CLOUD_SOURCES = {"cloud_accepted", "cloud_resampled"}


@pytest.fixture(scope="module")
def ray_local():
    from hlm import cluster

    started = cluster.connect(cluster.LOCAL, num_cpus=4)
    yield
    cluster.shutdown(started)


@pytest.fixture(scope="module")
def pool(ray_local):
    """Two tiny replicas (one CPU, one torch thread each) behind the front, on a free loopback port."""
    from hlm.cloud.pool import PoolSpec, pool_app
    from hlm.cloud.server import Limits, serve_in_thread

    app, backend = pool_app(PoolSpec("tiny", replicas=2, cpus=1, threads=1), Limits(), TOKEN)
    with serve_in_thread(app) as url:
        yield url, backend


def verifier(url: str, vocab_size: int, **kwargs) -> HttpVerifier:
    return HttpVerifier(url, vocab_size, token=TOKEN, **kwargs)


def metrics(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {TOKEN}"}, timeout=30).json()


def run_all(pair, jobs, make, n: int, paused: threading.Barrier | None = None, go: threading.Event | None = None,
            at: int = 0) -> list:
    """Each (policy, seed) of `jobs` on a thread of its own through `make()`'s verifier; with `paused` and `go`,
    every run stops after `at` tokens, says so at the barrier and goes on when `go` is set."""
    results: list = [None] * len(jobs)

    def run(i: int) -> None:
        policy, seed = jobs[i]
        events = []
        for e in HybridDecoder(pair, make()).generate(PROMPT, cfg(policy, n=n, seed=seed, u_th=0.2)):
            events.append(e)
            if paused is not None and len(events) == at:
                paused.wait(timeout=120)
                go.wait(timeout=120)
        results[i] = events

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def test_local_ray_listens_on_loopback_only(ray_local):
    import ray

    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}


def test_eight_sessions_over_two_replicas_match_in_process_and_stay_on_their_replica(tiny, pool):
    url, backend = pool
    jobs = [(["hlm", "ours", "uhlm"][i % 3], 200 + i) for i in range(8)]
    expected = [[(e.token_id, e.source) for e in HybridDecoder(tiny).generate(PROMPT, cfg(p, n=20, seed=s, u_th=0.2))]
                for p, s in jobs]
    before = metrics(url)
    runs = run_all(tiny, jobs, lambda: verifier(url, tiny.vocab_size), 20)
    assert [[(e.token_id, e.source) for e in events] for events in runs] == expected
    after = metrics(url)
    uploads = sum(e.source in CLOUD_SOURCES for events in runs for e in events)
    assert after["uploads"] - before["uploads"] == uploads
    # Every request reached the replica holding its session: a request anywhere else is answered 404 and the
    # client re-opens (a resync); none happened, and the replicas' model calls add up to every prefill and verify.
    assert after["resyncs"] == before["resyncs"] and after["pool"]["lost_sessions"] == 0
    assert after["responses"].get("404", 0) == before["responses"].get("404", 0)
    calls = [r["calls"] - b["calls"] for r, b in zip(after["replicas"], before["replicas"], strict=True)]
    assert sum(calls) == uploads + len(jobs) and min(calls) > 0  # both replicas worked
    opened = after["sessions"]["opened"] - before["sessions"]["opened"]
    assert opened == len(jobs) and after["sessions"]["active"] == 0 and not backend.routes


def test_a_replica_killed_mid_run(tiny, pool):
    """Every run completes with each position decided once; tokens of the outage are `unverified`; the sessions
    of the dead replica are rebuilt on a live one (counted as resyncs)."""
    import ray

    url, backend = pool
    jobs = [("hlm", 300 + i) for i in range(4)]
    expected = [[e.token_id for e in HybridDecoder(tiny).generate(PROMPT, cfg(p, n=40, seed=s, u_th=0.2))]
                for p, s in jobs]
    before = metrics(url)
    paused, go, done = threading.Barrier(len(jobs) + 1), threading.Event(), []
    # A backoff far shorter than the rest of a run: the next draft after the outage retries at once, however fast
    # the tiny pair decodes (a backoff longer than the remaining run would leave every later token unverified).
    make = lambda: verifier(url, tiny.vocab_size, backoff_s=1e-4, max_backoff_s=1e-3)  # noqa: E731
    runner = threading.Thread(target=lambda: done.append(run_all(tiny, jobs, make, 40, paused, go, 10)))
    runner.start()
    paused.wait(timeout=120)  # every run has 10 tokens
    ray.kill(backend.actors[0], no_restart=False)  # Ray restarts it, empty
    go.set()
    runner.join(timeout=300)
    for events, ids in zip(done[0], expected, strict=True):
        assert [e.index for e in events] == list(range(40))  # every position decided, once
        assert [e.position for e in events] == list(range(events[0].position, events[0].position + 40))
        assert {e.source for e in events} <= CLOUD_SOURCES | {"unverified"}
        assert [e.token_id for e in events[:10]] == ids[:10]
    after = metrics(url)
    assert after["pool"]["lost_sessions"] >= 1 and after["resyncs"] > before["resyncs"]
    assert all(e.source in CLOUD_SOURCES for events in done[0] for e in events[-3:])  # the cloud came back


def test_fleet_replays_every_upload(tiny, pool, tmp_path, monkeypatch, capsys):
    url, _ = pool
    deadline = time.monotonic() + 120  # a replica killed by an earlier test is back before the load starts
    while not all(r.get("alive") for r in metrics(url)["replicas"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    monkeypatch.setenv("HLM_CLOUD_TOKEN", TOKEN)
    out = tmp_path / "fleet"
    args = ["fleet", "--models", "tiny", "--cloud", url, "--out", str(out), "--limit", "2", "--max-new-tokens", "12",
            "--devices", "1,3", "--duration-s", "0", "--no-png", "--link-preset", "default"]
    assert cli_main(args) == 0
    rows = list(csv.DictReader((out / "fleet.csv").open()))
    data = json.loads((out / "fleet.json").read_text())
    assert {r["policy"] for r in rows} == {"ours", "uhlm", "hlm", "random"}
    for r in rows:
        assert int(r["errors"]) == 0 and int(r["calls"]) == int(r["uploads"]), r
        n = int(r["devices"])
        assert int(r["traces"]) == n  # duration 0: one trace per device
        if int(r["calls"]):
            assert float(r["p50_ms"]) <= float(r["p95_ms"]) <= float(r["p99_ms"])
            assert float(r["cloud_ms_per_token"]) > 0  # the replicas' busy time over the tokens replayed
    assert data["meta"]["traces"] == dict.fromkeys(["ours", "uhlm", "hlm", "random"], 2)
    assert {c["policy"] for c in data["capacity"]} == set(data["meta"]["traces"])
    assert all(c["tokens_per_replica_s"] > 0 for c in data["capacity"])
    assert (out / "figures" / "fleet_p95.html").is_file()
    assert "devices within p95" in capsys.readouterr().out
    assert cli_main(args) == 0  # the traces come from the cache the second time
