"""The LLM-only reference without the wait: the plain LLM decode, reused from memory and from the store on disk (a
corrupt file is ignored, a stored answer read back token for token), the page's examples built in the background
without holding up a viewer, and Compare's reference row a run with its figures."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ENV

from hlm.config import PolicyConfig, RunConfig, SamplingConfig
from hlm.dashboard.flows import Dashboard
from hlm.dashboard.references import Store
from hlm.dashboard.service import Request, Service
from hlm.dashboard.settings import Settings
from hlm.decoder import HybridDecoder
from hlm.models import load_pair
from hlm.policies import with_role

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Say hello.", "Write a function that adds two numbers.", "Why is the sky blue?"]


def plain(decoder: HybridDecoder, prompt: str, sampling: SamplingConfig) -> list:
    """The verifier decoding alone, one token a pass."""
    return list(decoder.generate(prompt, RunConfig(sampling, PolicyConfig(name=with_role("reference")))))


@pytest.fixture()
def store(tmp_path):
    return Store(tmp_path / "references")


def make_service(store: Store | None) -> Service:
    svc = Service(lambda preset: HybridDecoder(load_pair(preset)), "tiny", ["tiny"], store=store)
    svc.score = lambda candidates, references: [0.5] * len(candidates)
    return svc


GREEDY = Settings(temperature=0.0, max_new_tokens=16)


def reference_ids(svc: Service, prompt: str, settings: Settings = GREEDY) -> list[int]:
    events = list(svc.reference("tiny", prompt, settings.run_config(None), threading.Event()))[-1]
    return [e.token_id for e in events]


def forbid_decoding(monkeypatch, svc: Service) -> None:
    def decode(*args, **kwargs):
        raise AssertionError("the reference was decoded, not reused")

    monkeypatch.setattr(svc.decoder("tiny"), "generate", decode)


def test_a_stored_answer_is_reused_without_decoding(store, monkeypatch):
    first = reference_ids(make_service(store), PROMPTS[1])
    assert len(list(store.folder.glob("*.json"))) == 1
    again = make_service(store)  # a restarted app: nothing in memory
    forbid_decoding(monkeypatch, again)
    assert reference_ids(again, PROMPTS[1]) == first
    assert reference_ids(again, PROMPTS[1], Settings(temperature=0.0, max_new_tokens=16, seed=7)) == first


def test_a_corrupt_or_foreign_store_file_is_ignored_and_rewritten(store, decoder):
    svc = make_service(store)
    sampling = GREEDY.run_config(None).sampling
    key = Store.key(svc.decoder("tiny").pair, "tiny", PROMPTS[2], sampling)
    path = store.path(key)
    expected = [e.token_id for e in plain(decoder, PROMPTS[2], sampling)]
    for bad in (b"\x80not json", b"[1, 2]", json.dumps({"key": {**key, "prompt": "other"}, "ids": [1]}).encode(),
                json.dumps({"key": key, "ids": [10**9]}).encode(), json.dumps({"key": key, "ids": [True]}).encode()):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bad)
        assert store.load(key, decoder.pair.vocab_size) is None
        assert reference_ids(make_service(store), PROMPTS[2]) == expected
        assert store.load(key, decoder.pair.vocab_size) == expected  # rewritten, valid


def test_the_store_keeps_its_most_recently_used_answers(tmp_path, tiny):
    store = Store(tmp_path, limit=2)
    keys = [Store.key(tiny, "tiny", prompt, SamplingConfig(temperature=0.0)) for prompt in PROMPTS]
    store.save(keys[0], [1])
    store.save(keys[1], [2])
    assert store.load(keys[0], tiny.vocab_size) == [1]  # used: kept over the second
    store.save(keys[2], [3])
    assert [store.load(k, tiny.vocab_size) for k in keys] == [[1], None, [3]] and len(store.files()) == 2


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("stop_at_eos", [True, False])
def test_the_reference_is_the_plain_llm_decode_and_reads_back_from_the_store(store, decoder, prompt, stop_at_eos):
    """Greedy: the same tokens and text as the verifier decoding alone, a run with its figures; a restarted app reads
    the same events back from the store (without figures: its link is None)."""
    config = GREEDY.run_config(None)
    config = dataclasses.replace(config, sampling=dataclasses.replace(config.sampling, stop_at_eos=stop_at_eos))
    svc = make_service(store)
    events = list(svc.reference("tiny", prompt, config, threading.Event()))[-1]
    expected = plain(decoder, prompt, config.sampling)
    assert [(e.token_id, e.text, e.position) for e in events] == [(e.token_id, e.text, e.position) for e in expected]
    assert svc._cached("tiny", prompt, config.sampling)[0] == config.link and sum(e.verify_s for e in events) > 0
    link, stored = make_service(store)._cached("tiny", prompt, config.sampling)
    assert link is None and [(e.token_id, e.text, e.position) for e in stored] == \
        [(e.token_id, e.text, e.position) for e in expected]
    assert all(e.source == "cloud_sampled" and not e.uploaded and not e.energy_j for e in stored)  # no costs


def test_a_sampled_reference_is_kept_in_memory_only(store):
    svc = make_service(store)
    assert len(reference_ids(svc, PROMPTS[0], Settings(temperature=0.9, max_new_tokens=8))) == 8
    assert not list(store.folder.glob("*.json"))


def test_the_background_build_gives_way_to_a_viewer(store, monkeypatch):
    """The build runs while no request does; a viewer's request stops it at once (the viewer's decode gets the
    models), and once the viewer is done the build resumes and stores every prompt."""
    svc = make_service(store)
    real, started = svc._build_one, threading.Event()

    def slow_first(prompt, llm, page, cancel):
        if not started.is_set():  # the first build holds the models until a viewer stops it
            started.set()
            assert cancel.wait(30), "a viewer's request should stop the build"
            return []
        return real(prompt, llm, page, cancel)

    monkeypatch.setattr(svc, "_build_one", slow_first)
    config = GREEDY.run_config(None)
    thread = svc.precompute(PROMPTS[:2], config)
    assert started.wait(30)
    request = svc.begin("viewer")
    try:
        viewer = list(svc.stream(svc.decoder("tiny"), PROMPTS[0], Settings(max_new_tokens=8).run_config(None),
                                 request.cancel))
        assert len(viewer[-1]) == 8
        assert svc._cached("tiny", PROMPTS[0], config.sampling) is None  # stopped, not kept
    finally:
        svc.end("viewer", request)
    thread.join(60)
    assert not thread.is_alive() and len(list(store.folder.glob("*.json"))) == 2
    status = svc.status()  # what `/status` says, and `scripts/page_timing.py` waits for
    assert status["example_references_ready"] == PROMPTS[:2] and not status["examples_building"]
    assert svc.build_references(PROMPTS[:2], config) == []  # nothing left to build


def test_generates_reference_is_the_run_compare_shows(monkeypatch):
    """Generate decodes the LLM alone after the run (the status line says so) and keeps it with its figures, so
    Compare shows that run as its reference row without decoding it again."""
    svc = make_service(None)
    dash = Dashboard(svc)
    frames = list(dash.generate("s", "tiny", PROMPTS[0], GREEDY, []))
    assert any("BERTScore on its way" in (f.stats or "") for f in frames)  # the status line
    config = GREEDY.run_config(None)
    kept = svc._cached("tiny", PROMPTS[0], config.sampling)
    assert kept is not None and kept[0] == config.link
    decoded = decoded_policies(svc, monkeypatch)
    runs = list(dash.api_compare("tiny", PROMPTS[0], GREEDY))[-1]["runs"]
    s = runs[0]["summary"]
    assert with_role("reference") not in decoded and s["llm_calls"] == s["tokens"] == len(kept[1])
    assert s["cloud_compute_s"] > 0 and s["cloud_energy_j"] > 0


def decoded_policies(svc: Service, monkeypatch) -> list[str]:
    """The policies `svc` decodes from now on (every run on the page goes through `Service.stream`)."""
    names, real = [], svc.stream

    def stream(decoder, prompt, config, *args, **kwargs):
        names.append(config.policy.name)
        return real(decoder, prompt, config, *args, **kwargs)

    monkeypatch.setattr(svc, "stream", stream)
    return names


def test_show_me_takes_a_stored_answer_without_decoding_the_llm_alone(store, monkeypatch):
    """Show me's verdict needs the LLM's answer, not its figures: a stored answer (a restarted app) is shown without
    figures and no LLM-alone run is decoded, where Compare decodes the LLM alone as a run with its own. With nothing
    cached, at greedy, HLM's tokens are the answer (the LLM's own, token for token: kept and stored as such); sampled,
    Show me decodes the LLM's samples first and shows their row."""
    reference_ids(make_service(store), PROMPTS[0])  # an earlier start stored the answer
    svc = make_service(store)
    dash = Dashboard(svc)
    decoded = decoded_policies(svc, monkeypatch)
    last = list(dash.show_me("s", "tiny", PROMPTS[0], GREEDY, []))[-1]
    assert with_role("reference") not in decoded and len(decoded) == 3  # HLM, ours and the coin
    assert "no time or energy figures" in last.compare and "hlm-verdict" in last.compare
    assert "(reference)</td>" not in last.compare  # no row of figures for the LLM alone
    decoded.clear()
    last = list(dash.compare("s", "tiny", PROMPTS[0], GREEDY, []))[-1]
    assert decoded[0] == with_role("reference") and "(reference)</td>" in last.compare
    decoded.clear()
    last = list(dash.show_me("s", "tiny", PROMPTS[1], GREEDY, []))[-1]  # nothing cached: HLM gives the answer
    assert decoded == ["hlm", "ours", "random"] and "hlm-verdict" in last.compare
    assert "the answer only (HLM's tokens: at greedy, the LLM's own)" in last.compare
    link, stored = make_service(store)._cached("tiny", PROMPTS[1], GREEDY.run_config(None).sampling)  # on disk
    assert link is None and [e.token_id for e in stored] == reference_ids(make_service(None), PROMPTS[1])
    decoded.clear()
    sampled = dataclasses.replace(GREEDY, temperature=0.9)
    last = list(dash.show_me("s", "tiny", PROMPTS[2], sampled, []))[-1]
    assert decoded[0] == with_role("reference") and "(reference)</td>" in last.compare


def test_the_app_start_up_build_keeps_measured_llm_runs_for_compare(monkeypatch):
    """`measured`: the examples' LLM-alone runs with their figures, so Compare on an example decodes only the
    policies it compares."""
    svc = make_service(None)
    config = GREEDY.run_config(None)
    assert svc.build_references(PROMPTS[:1], config, measured=True) == PROMPTS[:1]
    link, events = svc._cached("tiny", PROMPTS[0], config.sampling)
    assert link == config.link and len(events) == 16 and all(e.source == "cloud_sampled" for e in events)
    assert [e.token_id for e in events] == reference_ids(make_service(None), PROMPTS[0])
    decoded = decoded_policies(svc, monkeypatch)
    runs = list(Dashboard(svc).api_compare("tiny", PROMPTS[0], GREEDY))[-1]["runs"]
    assert with_role("reference") not in decoded and runs[0]["summary"]["llm_calls"] == 16


def test_the_references_command_builds_the_examples_into_the_cache(tmp_path):
    env = {**ENV, "HLM_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "hlm", "references", "--models", "tiny"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    examples = json.loads((ROOT / "hlm" / "assets" / "examples.json").read_text())
    assert len(list((tmp_path / "references").glob("*.json"))) == len(examples)
    again = subprocess.run([sys.executable, "-m", "hlm", "references", "--models", "tiny"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert "0 reference(s) decoded" in again.stderr


def test_a_comparison_shows_a_run_already_made_with_the_same_settings_again(monkeypatch):
    """Generate's run, and Show me's three, come again in Show me and Compare with their measured figures instead
    of a second decode of the same tokens, marked with when they ran; other settings, or a stopped run, decode."""
    svc = make_service(None)
    dash = Dashboard(svc)
    decoded = decoded_policies(svc, monkeypatch)
    generated = list(dash.api_generate("tiny", PROMPTS[0], GREEDY, quality=False))[-1]
    assert decoded == ["ours"] and generated["shown_again"] is None
    decoded.clear()
    last = list(dash.show_me("s", "tiny", PROMPTS[0], GREEDY, []))[-1]
    assert decoded == ["hlm", "random"]  # ours is Generate's run, and HLM's tokens are the LLM's answer
    assert last.compare.count("shown again (same prompt and settings)") == 1 and "hlm-verdict" in last.compare
    decoded.clear()
    runs = list(dash.api_compare("tiny", PROMPTS[0], GREEDY))[-1]["runs"]
    assert decoded == [with_role("reference"), "uhlm"]  # HLM, ours and the coin are Show me's; the LLM alone is
    # decoded for its figures, which Show me's answer (HLM's tokens) has not
    again = {r["policy"].split()[0]: r for r in runs if r["shown_again"]}
    assert sorted(again) == ["hlm", "ours", "random"] and all(r["status"] == "done" for r in runs)
    assert again["ours"]["summary"] == generated["summary"] and again["ours"]["text"] == generated["text"]
    assert again["ours"]["note"].startswith(f"done: the run of {again['ours']['shown_again']}")
    decoded.clear()
    list(dash.api_compare("tiny", PROMPTS[0], dataclasses.replace(GREEDY, k=GREEDY.k + 1)))
    assert decoded == ["hlm", "uhlm", "ours", "random"]  # another k: ours and its coin differ, and all decode
    stopped = Request()
    stopped.cancel.set()  # a run stopped at once is not kept
    list(dash._decode("tiny", PROMPTS[1], dash._new_run("tiny", "ours", GREEDY.run_config(None)), stopped, False))
    assert svc.finished("tiny", PROMPTS[1], GREEDY.run_config(None)) is None


def test_the_start_up_build_makes_the_examples_compared_runs(monkeypatch):
    """After the references, the app's start-up build decodes every run Compare shows on each example at the page's
    settings (`Dashboard.prepare_examples`, on the model thread while no request runs): Compare and Show me on it
    then decode nothing and show those runs, each with when it ran; a second build finds them all kept."""
    svc = make_service(None)
    dash = Dashboard(svc)
    config = GREEDY.run_config(None)
    svc.precompute(PROMPTS[:1], config, measured=True,
                   then=lambda: dash.prepare_examples(PROMPTS[:1], GREEDY)).join(timeout=120)
    assert dash.status()["example_runs_ready"] == PROMPTS[:1] and not dash.status()["examples_building"]
    decoded = decoded_policies(svc, monkeypatch)
    runs = list(dash.api_compare("tiny", PROMPTS[0], GREEDY))[-1]["runs"]
    assert decoded == [] and all(r["shown_again"] for r in runs[1:]) and len(runs) == 5
    assert all(r["status"] == "done" and r["summary"]["tokens"] for r in runs)
    last = list(dash.show_me("s", "tiny", PROMPTS[0], GREEDY, []))[-1]
    assert decoded == [] and last.compare.count("shown again (same prompt and settings)") == 3
    assert dash.prepare_examples(PROMPTS[:1], GREEDY) == []
    assert dash.prepare_examples(PROMPTS[1:2], GREEDY) == PROMPTS[1:2] and decoded == []  # not through `stream`
