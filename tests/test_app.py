"""The dashboard: `hlm.dashboard`'s pieces in process, then `app.py` launched on the tiny pair and driven through
its documented endpoints with gradio_client (the stream arrives, events are well formed, bad input is a clean
error)."""

from __future__ import annotations

import gc
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path

import httpx
import plotly.graph_objects as go
import pytest
from conftest import free_port

from hlm.config import KNOB_HELP, ConfigError
from hlm.dashboard import flows
from hlm.dashboard.charts import energy_figure, history_figure, upload_figure
from hlm.dashboard.evidence import HUMANEVAL, RESULTS, STUDY, evidence
from hlm.dashboard.flows import Dashboard, Frame, live_frames
from hlm.dashboard.render import error_notice, stats_html, token_rows, token_span, verdict
from hlm.dashboard.runs import Replay, RunView, add_history, replay, replay_rule
from hlm.dashboard.service import INTERVAL_S, Service
from hlm.dashboard.settings import KNOBS, REFERENCE_SAMPLES, Settings
from hlm.decoder import HybridDecoder
from hlm.events import SOURCES, TokenEvent
from hlm.metrics import summarize
from hlm.models import Calibration, PromptError, load_pair

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Say hello."


# ---------------------------------------------------------------------------------------------- a launched app


@contextmanager
def launched_app(models: str = "tiny", timeout_s: float = 240.0, **env_vars: str) -> Iterator[str]:
    """`python app.py --models MODELS` on a free port (with `env_vars` set); yields its URL once it answers, stops
    it afterwards."""
    with launched_process(models, timeout_s, **env_vars) as (url, _):
        yield url


@contextmanager
def launched_process(models: str = "tiny", timeout_s: float = 240.0, **env_vars: str
                     ) -> Iterator[tuple[str, subprocess.Popen]]:
    """`launched_app` with the app's process too (for what reads its /proc entry: RSS)."""
    port = free_port()
    cache = tempfile.TemporaryDirectory(prefix="hlm-cache-")
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1", "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", **env_vars}
    if models == "tiny":
        env["OMP_NUM_THREADS"] = "1"  # the tiny models are faster on one thread
        env["HLM_CACHE"] = cache.name  # the examples' references it builds stay out of the user's cache
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--models", models], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"app.py did not come up:\n{log.read().decode(errors='replace')[-3000:]}")
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
            cache.cleanup()


@pytest.fixture(scope="module")
def client():
    from gradio_client import Client

    with launched_app() as url:
        yield Client(url, verbose=False)


def test_generate_streams_well_formed_events(client):
    job = client.submit(prompt=PROMPT, k=4, gamma=0.5, max_new_tokens=24, api_name="/generate")
    messages = list(job)
    assert len(messages) >= 2, "the run should arrive in several messages, not one"
    assert messages[0]["status"] == "decoding" and messages[-1]["status"] == "done"
    sizes = [len(m["tokens"]) for m in messages]
    assert sizes == sorted(sizes) and sizes[-1] >= 1
    for m in messages:  # before any token: what the prefill is doing, or the first draft on its way to the cloud
        if not m["tokens"]:
            assert m["note"] and (m["pending"] is None or m["pending"]["index"] == 0)
    final = messages[-1]
    tokens = final["tokens"]
    assert final["text"] == "".join(t["text"] for t in tokens)
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    for t in tokens:
        assert t["source"] in SOURCES
        assert t["uploaded"] == (t["source"] in ("cloud_accepted", "cloud_resampled"))
        assert t["u"] is not None and 0.0 <= t["u"] <= 1.0
        assert set(t["energy_j"]) == {"device_compute", "radio", "device_idle", "cloud"}
    s = final["summary"]
    assert s["tokens"] == len(tokens) and s["uploads"] == sum(t["uploaded"] for t in tokens)
    assert final["config"]["policy"]["k"] == 4 and final["config"]["policy"]["gamma"] == 0.5
    assert 0.0 <= final["bertscore_f1"] <= 1.0 + 1e-6


def test_compare_runs_the_three_policies_against_the_reference(client):
    final = client.predict(prompt=PROMPT, max_new_tokens=12, api_name="/compare")
    runs = final["runs"]
    assert [r["config"]["policy"]["name"] for r in runs] == ["llm", "hlm", "uhlm", "ours", "random"]
    assert all(r["status"] == "done" and r["bertscore_f1"] is not None for r in runs)
    assert runs[1]["summary"]["upload_rate"] == 1.0  # hlm uploads every token
    # the coin is matched to ours' realised upload rate on this prompt
    assert runs[4]["config"]["policy"]["skip_rate"] == pytest.approx(1.0 - runs[3]["summary"]["upload_rate"])
    assert runs[0]["bertscore_f1"] == 1.0  # the reference against itself


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prompt": "   "}, "the prompt is empty"),
    ({"prompt": PROMPT, "k": 0}, "k must be an integer in [1, 32], got 0"),
    ({"prompt": PROMPT, "policy": "greedy"}, "unknown policy 'greedy'"),
    ({"prompt": PROMPT, "snr_db": 99.0}, "snr_db must be in [-30, 60]"),
    ({"prompt": PROMPT, "pair": "nonexistent"}, "model pair 'nonexistent' is not offered here"),
])
def test_bad_input_is_a_clean_error(client, kwargs, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as err:
        client.predict(api_name="/generate", **kwargs)
    assert message in str(err.value)
    assert "Traceback" not in str(err.value)


def test_hardware_says_how_energy_is_obtained(client):
    info = client.predict(api_name="/hardware")
    assert info["pair"]["pair"] == "tiny"
    assert set(info["energy_methods"]) == {"device_compute", "radio", "device_idle", "cloud"}
    assert all(m.startswith(("measured", "modelled")) for m in info["energy_methods"].values())


def test_page_serves_the_dashboard(client):
    page = httpx.get(client.src, timeout=10).text
    assert "Hybrid LM decoding" in page


# ---------------------------------------------------------------------------------------------- in process


@pytest.fixture()
def service(tiny, monkeypatch):
    svc = Service(lambda preset: HybridDecoder(load_pair(preset)), "tiny", ["tiny"])
    # the real scorer is tested above
    monkeypatch.setattr(svc, "score", lambda candidates, references: [0.5] * len(candidates))
    return svc


def test_settings_coerce_and_validate():
    config = Settings(k=8.0, max_new_tokens=16.0, bandwidth_mhz=20).run_config(None)
    assert config.policy.k == 8 and isinstance(config.policy.k, int)
    assert config.link.bandwidth_hz == 20e6 and config.policy.u_th == 0.08
    cal = Calibration(a=0.8, b=-0.1, delta=0.2, risk_averse=0.125, risk_prone=0.375, samples=10)
    assert Settings().run_config(cal).policy.u_th == 0.125
    assert Settings(u_th=0.3).run_config(cal).policy.u_th == 0.3
    for bad, message in (({"k": 2.5}, "k must be a whole number"), ({"temperature": None}, "temperature must be a "
                         "number"), ({"gamma": -1.0}, "gamma must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            Settings(**bad).run_config(None)


def test_the_api_signatures_are_the_knob_table_and_the_settings(service):
    """/generate and /compare take the knobs as `KNOBS` declares them and `Settings` defaults them: they cannot
    drift apart (names, order, defaults), and each knob's parameter carries the table's help."""
    sys.path.insert(0, str(ROOT))
    import app

    endpoints = {f.api_name: f.fn for f in app.build(Dashboard(service)).fns.values() if f.api_name}
    table = {knob.name: knob.default for knob in KNOBS}
    assert {f.name: f.default for f in fields(Settings)} == table
    for name, knobs, rest in (("generate", list(table), ["quality", "pair"]),
                              ("compare", list(app.COMPARE_KNOBS), ["pair"])):
        params = inspect.signature(endpoints[name]).parameters
        assert list(params) == ["prompt", *knobs, *rest]
        assert {n: params[n].default for n in knobs} == {n: table[n] for n in knobs}
        assert all(f"{n}: {KNOBS[n].help}" in endpoints[name].__doc__ for n in knobs)


def test_each_knob_is_described_once_for_the_cli_and_the_page():
    """The CLI's --help and the page's knob table (widgets, API docs) both read `KNOB_HELP`."""
    from hlm.cli.main import build_parser

    generate = next(a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                    if a.dest == "k").container
    cli = {a.dest: a.help or "" for a in generate._actions}
    for name, text in KNOB_HELP.items():
        assert KNOBS[name].help.startswith(text), name
        assert cli[name].startswith(text), name


def test_figures_are_valid_plotly(service):
    decoder = service.decoder("tiny")
    config = Settings(max_new_tokens=20, policy="hlm").run_config(None)
    run = RunView("hlm", config, decoder.pair.vocab_size, decoder.energy_methods(config.link))
    run.update(list(decoder.generate(PROMPT, config)))
    history = [{"label": "ours k=16 γ=0", "policy": "ours", "estimator": "probe", "energy_saving": 0.4,
                "bertscore_f1": 0.9, "upload_rate": 0.2, "prompt": PROMPT}]
    for fig in (energy_figure(run.points), upload_figure(run.points), history_figure(history), energy_figure([]),
                upload_figure([]), history_figure([])):
        go.Figure(data=fig["data"], layout=fig["layout"])  # raises on anything plotly does not know
        json.dumps(fig)
    assert run.points[-1].tokens == len(run.events) and run.points[-1].upload_rate == 1.0
    assert len(run.points) <= 8  # one update adds at most POINTS_PER_UPDATE points


def test_token_span_escapes_text_and_explains_the_decision():
    config = Settings(k=3).run_config(None)
    e = TokenEvent(index=4, position=30, token_id=7, text="<b>&", source="cloud_resampled", uploaded=True,
                   draft_id=9, u=0.5, importance=0.2, importance_threshold=0.1, importance_rank=0, important=True,
                   p_draft=0.6, q_draft=0.3, bits_up=1234, synced_ids=2)
    span = token_span(e, config.policy)
    assert "&lt;b&gt;&amp;</span>" in span and 'class="tok cloud_resampled"' in span
    for fact in ("u = 0.50", "above u_th = 0.08", "rank 1 (top-k 3): important", "accept prob min(1, q/p) 0.500",
                 "draft id 9 rejected", "uploaded 1,234 bits, including 2 synced ids"):
        assert fact in span


def test_token_span_leaves_leading_blanks_unmarked_and_is_focusable():
    e = TokenEvent(index=2, position=9, token_id=7, text="  world", source="local", uploaded=False,
                   energy_j={"device_compute": 0.02, "radio": 0.0, "device_idle": 0.0})
    span = token_span(e, Settings().run_config(None).policy)
    assert span.startswith('  <span class="tok local" tabindex="0" role="button" data-i="2" ') and span.endswith(
        ">world</span>")
    assert "device energy 20 mJ: SLM compute 20, radio 0, idle wait 0" in span
    blank = token_span(replace(e, text="  "), Settings().run_config(None).policy)
    assert blank.startswith("<span") and blank.endswith(">  </span>")  # a blank token keeps its span


def test_errors_become_titled_messages_without_tracebacks():
    notice = error_notice(PromptError("the prompt is <empty>"))
    assert notice == "<strong>Cannot run.</strong> the prompt is &lt;empty&gt;"
    text = error_notice(KeyError("x"))
    assert text.startswith("<strong>Unexpected error.</strong> Something went wrong on the server (KeyError)")
    assert "Traceback" not in text


def test_a_run_cut_by_the_length_limit_knows_it():
    config = Settings(max_new_tokens=2).run_config(None)
    run = RunView("x", config, 10, {})
    tokens = [TokenEvent(index=i, position=i, token_id=5, text="a", source="local", uploaded=False) for i in range(2)]
    run.events = tokens
    assert run.at_limit(frozenset({9}))
    assert not run.at_limit(frozenset({5}))  # the last token was a stop token: the answer ended by itself
    run.events = tokens[:1]
    assert not run.at_limit(frozenset({9}))


def test_history_points_are_numbered_and_the_coin_is_marked():
    point = {"label": "ours k=9 γ=0", "policy": "ours", "estimator": "probe", "energy_saving": 0.4,
             "bertscore_f1": 0.9, "upload_rate": 0.2, "prompt": PROMPT}
    history = add_history(add_history([], point, None, point), {**point, "policy": "random", "label": "random"})
    assert [h["n"] for h in history] == [1, 2, 3]
    fig = history_figure(history)
    assert [t["text"] for t in fig["data"]] == [["1", "2"], ["3"]]  # short labels: full ones overlapped
    assert fig["data"][1]["name"] == "random (coin)" and fig["data"][1]["marker"]["symbol"] == "x"


@pytest.mark.parametrize("policy", ["slm", "hlm"])
def test_stream_shows_the_first_token_at_once_then_throttles(service, monkeypatch, policy):
    """Tokens, and with `hlm` (every draft uploaded) a pending draft before each verdict as well: one clock for both,
    so a fast cloud cannot flood the page with a redraw per upload."""
    decoder = service.decoder("tiny")
    generate = decoder.generate

    def paced(*args, **kwargs):  # the tiny pair can finish 256 tokens inside one refresh period on a fast CPU
        for event in generate(*args, **kwargs):
            time.sleep(0.005)
            yield event

    monkeypatch.setattr(decoder, "generate", paced)
    config = Settings(max_new_tokens=256, policy=policy).run_config(None)
    config = replace(config, sampling=replace(config.sampling, stop_at_eos=False))
    cancel = threading.Event()
    start = time.monotonic()
    sizes, times, drafts = [], [], []
    for events in service.stream(decoder, PROMPT, config, cancel, pending=drafts.append):
        sizes.append(len(events))
        times.append(time.monotonic() - start)
    first = next(i for i, n in enumerate(sizes) if n)  # `hlm` first shows its first draft on its way, at once
    assert first == (1 if policy == "hlm" else 0)
    sizes, times = sizes[first:], times[first:]
    assert sizes[0] == 1 and sizes[-1] == 256 and len(sizes) >= 3
    gaps = [b - a for a, b in zip(times[:-2], times[1:-1], strict=True)]  # the last one comes when the run ends
    assert all(g >= INTERVAL_S * 0.9 for g in gaps)
    assert len(drafts) == (256 if policy == "hlm" else 0)  # every pending draft reached the view, drawn or not
    assert not cancel.is_set()


def test_the_status_line_tells_of_a_prompt_read_only_when_it_takes_chunks(service, monkeypatch):
    """A prompt read in one pass gets no "reading the prompt" notes: each note is a frame the page draws while the
    models work (on 2 cores the two notes delayed a short prompt's first draft ~0.8 s on the page)."""
    from hlm import prefix

    decoder = service.decoder("tiny")
    config = Settings(max_new_tokens=2, policy="hlm").run_config(None)
    notes: list[str] = []
    list(service.stream(decoder, PROMPT, config, threading.Event(), note=notes.append))
    assert notes == []
    monkeypatch.setattr(prefix, "CHUNK", 4)
    prefix._READS.clear()
    list(service.stream(decoder, PROMPT, config, threading.Event(), note=notes.append))
    assert notes[0].startswith("reading the prompt") and notes[-1].startswith("the cloud is reading the prompt")


def test_closing_the_stream_cancels_the_decode(service):
    decoder = service.decoder("tiny")
    config = Settings(max_new_tokens=512, policy="hlm").run_config(None)
    config = replace(config, sampling=replace(config.sampling, stop_at_eos=False))
    cancel = threading.Event()
    stream = service.stream(decoder, PROMPT, config, cancel)
    next(stream)
    stream.close()
    assert cancel.is_set()
    service.models.submit(lambda: None).result(timeout=10)  # the model thread is free: the decode stopped


def test_every_model_call_runs_on_the_model_thread(tiny):
    """Loads, decodes, references and scoring, asked for from other threads (as Gradio's handlers and the start-up
    build ask), all run on the service's one model thread: a second thread running torch kernels makes libgomp
    stop spinning, and every kernel slower (`hlm.worker`)."""
    from hlm.experiments.quality import get_scorer

    service = Service(lambda preset: HybridDecoder(load_pair(preset)), "tiny", ["tiny"])
    pair = service.decoder("tiny").pair
    callers: set[str] = set()
    modules = (pair.draft, pair.verifier, service.models.call(lambda: get_scorer().scorer._model))
    hooks = [m.register_forward_pre_hook(lambda *_: callers.add(threading.current_thread().name)) for m in modules]
    try:
        dashboard = Dashboard(service)
        list(dashboard.generate("s", "tiny", PROMPT, Settings(max_new_tokens=8), []))
        list(dashboard.compare("s", "tiny", PROMPT, Settings(max_new_tokens=8), []))
        service.precompute([PROMPT + " Again."], measured=True).join(timeout=120)
    finally:
        for hook in hooks:
            hook.remove()
    assert callers == {"hlm-models_0"}


def test_model_thread_runs_calls_in_order_and_calls_from_itself_at_once():
    from hlm.worker import ModelThread

    models, order = ModelThread(), []
    first = models.submit(lambda: (time.sleep(0.2), order.append(1)))
    assert models.call(lambda: order.append(2) or models.call(lambda: threading.current_thread().name)) == \
        "hlm-models_0"  # a nested call runs at once instead of waiting behind itself
    assert first.done() and order == [1, 2]
    with pytest.raises(ZeroDivisionError):
        models.call(lambda: 1 / 0)
    thread = models.call(threading.current_thread)
    models = first = None
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive(), "the thread (and its OpenMP team) ends with its owner"


def test_bad_prompt_fails_before_any_model_work(service):
    with pytest.raises(PromptError):
        next(Dashboard(service).generate("s", "tiny", "", Settings(), []))


def test_generate_frames_end_with_table_and_history(service):
    frames = list(Dashboard(service).generate("s", "tiny", PROMPT, Settings(max_new_tokens=16), []))
    assert frames[0].tokens == "" and frames[0].tab == "output"  # the previous run is cleared first
    last = frames[-1]
    assert len(last.history) == 1 and last.history[0]["bertscore_f1"] == 0.5
    assert len(last.table) == frames[-2].tokens.count('class="tok ')
    assert any(f.energy is not None for f in frames) and frames[1].energy is None  # first token without charts


def test_token_details_show_each_drafts_score_and_the_bar_it_was_held_against(service):
    frames = list(Dashboard(service).generate("s", "tiny", PROMPT, Settings(max_new_tokens=16), []))
    rows = [dict(zip(Frame.HEADERS, row, strict=True)) for row in frames[-1].table]
    assert rows and all(r["score"] and r["bar"] for r in rows)  # ours scores every draft
    for r in rows:  # uploaded iff score >= bar (both rounded alike, so the order survives)
        uploaded = r["source"] in ("cloud_accepted", "cloud_resampled")
        assert float(r["score"]) >= float(r["bar"]) if uploaded else float(r["score"]) <= float(r["bar"])
    e = TokenEvent(index=0, position=0, token_id=1, text="a", source="local", uploaded=False)
    row = dict(zip(Frame.HEADERS, token_rows([replace(e, score=0.25, score_threshold=0.5), e])[0], strict=True))
    assert (row["score"], row["bar"]) == ("0.250", "0.500")
    assert dict(zip(Frame.HEADERS, token_rows([e])[0], strict=True))["score"] == ""  # a policy that scores nothing


def test_stop_ends_the_run_with_a_final_frame(service):
    dash = Dashboard(service)
    frames = []

    def consume() -> None:
        frames.extend(dash.generate("viewer", "tiny", PROMPT, Settings(max_new_tokens=512, policy="hlm"),
                                    []))

    worker = threading.Thread(target=consume)
    worker.start()
    while not any(f.tokens for f in frames):
        time.sleep(0.01)
    service.stop("viewer")
    worker.join(10)
    assert not worker.is_alive()
    assert "stopped after" in frames[-2].stats and not frames[-1].history  # a stopped run adds no point


def test_compare_frames_fill_five_columns_a_table_and_the_verdict_then_show_ours(service):
    dash = Dashboard(service)
    frames = list(dash.compare("s", "tiny", PROMPT, Settings(max_new_tokens=8), []))
    assert frames[0].tab == "compare"
    last = frames[-1]
    rows = re.findall(r"<tr[^>]*><td>([^<]*)</td>", last.compare)
    assert rows[:4] == ["llm (reference)", "hlm", "uhlm u_th=0.08", f"ours k={Settings.k} γ={Settings.gamma:g}"]
    assert re.fullmatch(r"random skip=\d\.\d\d \(matched to ours\)", rows[4])
    assert '<tr class="ours"><td>ours k=' in last.compare  # the method's row stands out, not whichever ran last
    assert last.compare.count('class="col"') == 5 and len(last.history) == 4
    assert 'class="hlm-verdict"' in last.compare and "a coin sending as many" in last.compare
    # the cards followed the runs to the last one, the coin; the comparison ends on ours, everywhere
    assert '<div class="hlm-status done">random skip=' in frames[-2].stats
    tokens, rate = re.search(r'<tr class="ours"><td>[^<]*</td><td>(\d+)</td><td>([^<]*)</td>', last.compare).groups()
    assert f'<div class="hlm-status done">{rows[3]}: done' in last.stats
    assert re.search(r'<div class="value">([^<]*)</div><div class="name">upload rate', last.stats)[1] == rate
    assert len(last.table) == last.tokens.count('class="tok ') == int(tokens)
    assert last.uploads["data"][0]["x"][-1] == int(tokens)
    assert dash.replay("s", 32, 0.0).stats is not None  # the what-if replay re-decides ours


def test_charts_follow_a_decoding_run_on_their_own_clock_and_end_on_its_last_point(monkeypatch):
    """Text every update; the charts while decoding at most every CHART_INTERVAL_S (not with the first token),
    and the last points always drawn (a frame of their own when the interval held them back)."""
    config = Settings().run_config(None)
    run = RunView("ours", config, 10, {})
    run.phase = "decoding"
    events = [TokenEvent(index=i, position=i, token_id=1, text="a", source="local", uploaded=False,
                         energy_j={"device_compute": 1.0}) for i in range(6)]
    clock = iter([0.0, 0.5, 1.0, 2.5, 3.0, 3.2, 3.4, 3.6])  # the interval's start, then one reading a frame

    def updates():
        for i in range(1, 7):
            run.update(events[:i])
            yield

    monkeypatch.setattr(flows.time, "monotonic", lambda: next(clock))
    frames = list(live_frames(run, updates()))
    assert [f.tokens is not None for f in frames] == [True] * 6 + [False]
    drawn = [f.uploads["data"][0]["x"][-1] if f.uploads else None for f in frames]
    assert drawn == [None, None, 3, None, None, None, 6] and flows.CHART_INTERVAL_S == 2.0
    assert all(f.figures is None for f in frames)  # the run's first charts and its last are the charts' values


def test_a_decoding_runs_charts_after_its_first_are_drawn_into_the_page_s(monkeypatch):
    """While a run decodes, its charts after the first come as `Frame.figures` (drawn into the page's charts by
    `app.REDRAW`: a new chart value re-creates the chart and draws it twice); the last are the charts' values."""
    run = RunView("ours", Settings().run_config(None), 10, {})
    run.phase = "decoding"
    events = [TokenEvent(index=i, position=i, token_id=1, text="a", source="local", uploaded=False,
                         energy_j={"device_compute": 1.0}) for i in range(4)]
    clock = iter([0.0, 2.0, 4.0, 6.0, 8.0])  # the interval's start, then each update past the interval

    def updates():
        for i in range(1, 5):
            run.update(events[:i])
            if i == 4:
                run.phase = "done"
            yield

    monkeypatch.setattr(flows.time, "monotonic", lambda: next(clock))
    frames = list(live_frames(run, updates()))
    assert [f.uploads["data"][0]["x"][-1] if f.uploads else None for f in frames] == [1, None, None, 4]
    assert [f.figures["uploads"]["data"][0]["x"][-1] if f.figures else None for f in frames] == [None, 2, 3, None]
    assert frames[1].figures["energy"] == flows.energy_figure(run.points[:2])
    # the last points drawn in place while decoding: the run's end still sets them as the charts' values
    run.points, run.phase = [], "decoding"
    clock = iter([0.0, 2.0, 4.0, 4.5])

    def ending():
        for i in (1, 2):
            run.update(events[:i])
            yield
        run.phase = "done"
        yield

    frames = list(live_frames(run, ending()))
    assert [bool(f.figures) for f in frames] == [False, True, False, False]
    assert [f.uploads["data"][0]["x"][-1] if f.uploads else None for f in frames] == [1, None, None, 2]


def test_compare_frames_come_at_most_every_interval_and_end_on_the_run_as_it_is(monkeypatch):
    """With Compare's `every_s` and `chart_s` a decoding run's updates inside the interval send no frame and its
    charts wait for its end, however long it decodes; the last state is always sent, with its charts."""
    config = Settings().run_config(None)
    run = RunView("ours", config, 10, {})
    run.phase = "decoding"
    events = [TokenEvent(index=i, position=i, token_id=1, text="a", source="local", uploaded=False,
                         energy_j={"device_compute": 1.0}) for i in range(6)]
    clock = iter([0.0, 0.1, 0.3, 0.6, 1.2, 2.2, 2.5])  # the charts' interval start, then one per update

    def updates():
        for i in range(1, 7):
            run.update(events[:i])
            yield

    monkeypatch.setattr(flows.time, "monotonic", lambda: next(clock))
    frames = list(live_frames(run, updates(), tokens=False, every_s=flows.COMPARE_FRAME_S, chart_s=math.inf))
    assert flows.COMPARE_FRAME_S == 2.0 and len(frames) == 3  # updates at 0.1 and 2.2 s; the held 6th at the end
    assert [f.tokens for f in frames] == [None] * 3
    assert frames[-1].stats == flows.stats_html(run) and frames[-1].uploads["data"][0]["x"][-1] == 6
    assert frames[0].uploads is None and frames[1].uploads is None  # 2.2 s into the run: past CHART_INTERVAL_S


def test_show_me_fills_an_empty_prompt_and_runs_the_three(service):
    frames = list(Dashboard(service).show_me("s", "tiny", " ", Settings(max_new_tokens=8), []))
    assert frames[0].prompt and frames[0].prompt.strip()
    assert [h["policy"] for h in frames[-1].history] == ["hlm", "ours", "random"]


def test_the_verdict_is_built_from_the_runs_numbers():
    config = Settings().run_config(None)

    def run(name: str, uploads: int, radio: float, f1: float) -> RunView:
        r = RunView(name, config.with_policy(name=name), 10, {})
        r.points = [summarize([TokenEvent(index=i, position=i, token_id=1, text="a", source="local",
                                          uploaded=i < uploads, energy_j={"device_compute": 1.0, "radio": radio,
                                                                          "device_idle": 0.0})
                               for i in range(10)], config.with_policy(name=name), 10, {})]
        r.phase, r.f1 = "done", f1
        return r

    runs = [run("hlm", 10, 0.2, 0.9), run("ours", 3, 0.1, 0.8), run("random", 3, 0.1, 0.6)]
    assert verdict(runs) == ("On this prompt ours sent 30.0% of its tokens to the cloud, used 50.0% less link energy "
                             "(radio and waiting for the cloud) than HLM and scored BERTScore F1 0.800 against the "
                             "LLM's answer (HLM 0.900); a coin sending as many (30.0%) scored 0.600.")
    for r, faithful in zip(runs, ((10, 10), (9, 10), (4, 10)), strict=True):  # greedy: the share kept verbatim
        r.faithful = faithful
    assert verdict(runs).endswith("and kept the LLM's answer token for token for 90.0% of its length (BERTScore F1 "
                                  "0.800; HLM 100.0%, 0.900); a coin sending as many (30.0%) kept 40.0% (0.600).")
    for r in runs:  # T > 0: scored against several samples, whose spread is the noise band
        r.faithful, r.band = None, (0.7, 0.85)
    assert "F1 0.800 against the LLM's samples (HLM 0.900; LLM samples score 0.700–0.850 against each other)" in \
        verdict(runs)
    runs[2].f1 = None
    assert verdict(runs) is None  # not before every run is scored


def test_replay_at_the_runs_own_knobs_reproduces_its_decisions(service):
    decoder = service.decoder("tiny")
    config = Settings(max_new_tokens=40).run_config(None)
    run = RunView("ours", config, decoder.pair.vocab_size, decoder.energy_methods(config.link))
    run.update(list(decoder.generate(PROMPT, config)))
    run.phase = "done"
    scale, p = decoder.pair.selection.scale(config.policy.estimator), config.policy

    def at(k: int, gamma: float) -> Replay:
        return replay(run, *replay_rule(run, scale, k, gamma, p.u_th))

    same = at(p.k, p.gamma)
    assert list(same.uploads) == [e.uploaded for e in run.events]
    assert same.upload_rate == pytest.approx(run.summary.upload_rate)
    more, fewer = at(32, 0.0), at(1, 3.0)
    assert sum(fewer.uploads) <= sum(same.uploads) <= sum(more.uploads) and sum(more.uploads) > sum(fewer.uploads)
    assert (more.link_j > fewer.link_j) and more.energy_j[-1] > fewer.energy_j[-1]


def test_dashboard_replays_the_sessions_last_run_of_ours(service):
    dash = Dashboard(service)
    assert dash.replay("viewer", 32, 0.0) == Frame()  # no run yet: nothing changes
    list(dash.generate("viewer", "tiny", PROMPT, Settings(max_new_tokens=24), []))
    frame = dash.replay("viewer", 32, 0.0)
    assert "would-upload" in frame.tokens and "what-if replay at k=32, γ=0" in frame.stats
    assert frame.energy is None and frame.uploads is None  # drawn into the page's charts (`app.REDRAW`)
    assert any(t["name"].startswith("replay k=32,") for t in frame.figures["uploads"]["data"])
    assert any(t["name"].startswith("replay k=32,") for t in frame.figures["energy"]["data"])
    assert dash.replay("viewer", "", 0.0) == Frame() and dash.replay("viewer", 99, 0.0) == Frame()
    list(dash.generate("viewer", "tiny", PROMPT, Settings(max_new_tokens=8, policy="hlm"), []))
    assert dash.replay("viewer", 32, 0.0) == Frame()  # hlm uploads everything: no knob to replay


def test_dashboard_replays_a_uhlm_run_on_u_th(service):
    dash = Dashboard(service)
    settings = Settings(max_new_tokens=24, policy="uhlm", u_th=0.3)
    list(dash.generate("viewer", "tiny", PROMPT, settings, []))
    run = dash._last["viewer"][1]
    assert replay(run, *replay_rule(run, None, 1, 0.0, 0.3)).uploads == tuple(e.uploaded for e in run.events)
    low, high = dash.replay("viewer", 9, 0.0, 0.0), dash.replay("viewer", 9, 0.0, 1.0)
    assert "what-if replay at u_th=0" in low.stats and "0 of 24 uploaded" in high.stats
    assert low.tokens.count("would-upload") > high.tokens.count("would-upload") == 0
    assert dash.replay("viewer", 9, 0.0, 1.5) == Frame()  # out of range: nothing changes


def test_page_prices_the_device_as_a_phone_and_links_follow_their_preset():
    """The page's default device profile is the phone (its energy label cites the source); a link preset sets the
    link, a typed field overrides it, and the run's summary says which."""
    config = Settings().run_config(None)
    assert config.device.name == "phone" and config.link_preset == "default"
    paper = Settings(link_preset="paper-like").run_config(None)
    assert paper.link.uplink_rate_bps == pytest.approx(0.105e6, rel=0.01)
    assert paper.link.bits_per_prob == Settings.bits_per_prob and paper.link.topk == Settings.topk
    changed = Settings(link_preset="paper-like", snr_db=0.0).run_config(None)
    assert changed.link.snr_db == 0.0 and changed.link.bandwidth_hz == paper.link.bandwidth_hz
    with pytest.raises(ConfigError, match="unknown device profile"):
        Settings(device_profile="toaster").run_config(None)
    decoder = HybridDecoder(load_pair("tiny"))
    run = RunView("ours", changed, decoder.pair.vocab_size, decoder.energy_methods(changed.link, changed.device))
    run.update(list(decoder.generate(PROMPT, changed)))
    s = run.summary
    assert s.link_preset == "paper-like + snr_db, topk" and s.device_profile == "phone"  # the page sends top-64
    assert s.energy_methods["device_compute"].startswith("modelled: phone")
    parts = s.device_energy_parts_j
    assert s.link_energy_j == pytest.approx(parts["radio"] + parts["device_idle"])
    assert "link" in stats_html(run)


def test_greedy_runs_show_the_faithful_prefix(service):
    """At temperature 0 HLM reproduces the LLM's greedy answer token for token: the page says so beside BERTScore;
    at T > 0 it shows no prefix (a sampled answer has no single reference)."""
    dash = Dashboard(service)
    greedy = list(dash.api_generate("tiny", PROMPT, Settings(policy="hlm", temperature=0.0, max_new_tokens=12),
                                    quality=True))[-1]
    assert tuple(greedy["faithful_prefix"]) == (12, 12)
    sampled = list(dash.api_generate("tiny", PROMPT, Settings(policy="hlm", temperature=0.7, max_new_tokens=12),
                                     quality=True))[-1]
    assert sampled["faithful_prefix"] is None


def test_sampled_runs_are_scored_against_several_llm_samples_with_a_noise_band(service):
    """At T > 0 a single LLM sample is a noisy reference: the run's F1 is the mean over REFERENCE_SAMPLES samples,
    and their F1 against each other is the band a viewer compares it with (in the card, Compare and the scatter)."""
    dash, settings = Dashboard(service), Settings(temperature=0.9, max_new_tokens=12)
    out = list(dash.api_generate("tiny", PROMPT, settings, quality=True))[-1]
    lo, hi = out["bertscore_band"]
    assert 0 <= lo <= hi <= 1 and out["bertscore_f1"] is not None and out["faithful_prefix"] is None
    texts = set()
    for seed in range(REFERENCE_SAMPLES):  # the samples are cached, one per seed, and differ
        config = replace(settings, seed=seed, policy="llm").run_config(None)
        texts.add("".join(e.text for e in next(service.reference("tiny", PROMPT, config, threading.Event()))))
    assert len(texts) == REFERENCE_SAMPLES
    frames = list(dash.compare("s", "tiny", PROMPT, settings, []))
    assert 'class="hlm-band"' in frames[-1].compare
    history = frames[-1].history
    assert all(h["band"] == history[0]["band"] for h in history)  # one prompt, one band
    assert frames[-1].quality["data"][0]["name"].startswith("LLM vs LLM samples")
    config = Settings(temperature=0.0, max_new_tokens=4).run_config(None)
    decoder = service.decoder("tiny")
    run = RunView("x", config, decoder.pair.vocab_size, decoder.energy_methods(config.link, config.device))
    run.update(list(decoder.generate(PROMPT, config)))
    run.faithful = (3, 4)
    assert "faithful prefix 3 of 4 tokens" in stats_html(run)


# ---------------------------------------------------------------------------------------------- the Evidence tab


def test_the_evidence_tab_reads_the_committed_study():
    e = evidence()
    rules = [t["name"] for t in e.recall["data"]]
    for rule in ("ours: probe-horizon", "uncertainty alone", "paper-literal", "coin", "oracle"):
        assert any(name.startswith(rule) for name in rules), (rule, rules)
    study = json.loads((RESULTS / STUDY).read_text(encoding="utf-8"))
    ours = next(r for r in study["rows"] if r["mode"] == "greedy" and r["rule"] == Settings.estimator
                and r["budget"] == 0.3)
    assert f"| 30.0% | {Settings.estimator} (ours) | {ours['first_divergence_recall']:.3f} [" in e.capture_table
    confirm = study["confirm"]["summary"]["prefix"]
    assert f"| faithful prefix | {confirm['ours']:.3f} | {confirm['coin']:.3f} | {confirm['delta']:+.3f} [" in \
        e.end_to_end
    ystar = study["confirm"]["summary"]["prefix_ystar"]  # the same runs against the study's batched y*
    assert f"| faithful prefix against the study's batched y* | {ystar['ours']:.3f} |" in e.end_to_end
    assert f"reproduces {study['confirm']['summary']['llm_prefix_ystar']:.3f} of y*" in e.end_to_end
    for section in (e.capture_table, e.end_to_end):  # each says which file and which command
        assert f"`docs/results/{STUDY}`, made by `python -m hlm study --prompts" in section
    assert "not measured yet" not in e.humaneval  # every HumanEval table named in HUMANEVAL is committed
    assert all(f"made by `{run.command}`" in e.humaneval for run in HUMANEVAL)
    for fig in (e.recall, e.prefix):
        go.Figure(data=fig["data"], layout=fig["layout"])
        json.dumps(fig)


def test_the_image_keeps_every_file_the_evidence_tab_reads():
    """`.dockerignore` leaves docs/ out of the image but for what the Evidence tab reads (the image's tab said "not
    measured yet" for HumanEval while its exception named a folder that no longer exists). Docker's rule: the last
    pattern that matches the path or one of its parents decides."""
    import fnmatch

    root = RESULTS.parents[1]
    patterns = [line.strip() for line in (root / ".dockerignore").read_text().splitlines() if line.strip()]

    def ignored(path: str) -> bool:
        parts, verdict = path.split("/"), False
        for pattern in patterns:
            if any(fnmatch.fnmatchcase("/".join(parts[:n]), pattern.lstrip("!")) for n in range(1, len(parts) + 1)):
                verdict = not pattern.startswith("!")
        return verdict

    read = [STUDY, *(name for run in HUMANEVAL for name in (run.table, run.results))]
    assert all((RESULTS / name).is_file() for name in read)
    assert [name for name in read if ignored(f"docs/results/{name}")] == []
    assert ignored("docs/speed.md") and ignored("docs/results/humaneval-gguf-curve/completions.jsonl")


def test_the_evidence_tab_says_what_is_not_measured_yet(tmp_path):
    e = evidence(tmp_path)  # no result files at all
    assert "not measured yet" in e.capture and "not measured yet" in e.end_to_end and e.recall["data"] == []
    assert e.humaneval.count("**HumanEval: not measured yet.**") == len(HUMANEVAL)
    assert all(f"`{run.command}` makes it" in e.humaneval for run in HUMANEVAL)
    first = HUMANEVAL[0]
    (tmp_path / first.table).parent.mkdir()
    (tmp_path / first.table).write_text("policy  pass@1\nours    0.600\n", encoding="utf-8")
    (tmp_path / first.results).write_text(json.dumps({"meta": {"command": "hlm eval --limit 2"}}))
    evidence.cache_clear()
    shown = evidence(tmp_path).humaneval
    assert f"**{first.caption}.**\n\n```\npolicy  pass@1\nours    0.600\n```" in shown
    assert "made by `hlm eval --limit 2`" in shown
    assert shown.count("not measured yet") == len(HUMANEVAL) - 1  # the other table still says so


def test_the_evidence_tab_is_filled_when_the_page_is_built(service):
    """Its values are in the page as built: no event (a page load included) computes or fills them."""
    sys.path.insert(0, str(ROOT))
    import app

    config = app.build(Dashboard(service)).get_config_file()
    plot = next(c for c in config["components"] if c["props"].get("elem_id") == "hlm-capture")
    assert json.loads(plot["props"]["value"]["plot"])["data"][0]["name"].startswith("ours: ")
    assert not any(plot["id"] in d["outputs"] for d in config["dependencies"])
    texts = [c["props"].get("value") for c in config["components"] if c["type"] == "markdown"]
    assert any(isinstance(t, str) and t.startswith("### End to end against the matched coin") for t in texts)
