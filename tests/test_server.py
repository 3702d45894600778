"""The networked cloud: `serve-cloud` in a subprocess on loopback, `HttpVerifier` as the decoder's verifier.

Parity with the in-process path, kill-and-restart mid-run, malformed and oversized requests, 8 concurrent
sessions, auth; the session limits and the wire format are checked in process."""

import http.server
import socket
import threading
import time

import httpx
import pytest
from conftest import CloudProcess, cfg, free_port

from hlm.cli import main as cli_main
from hlm.cloud.client import CloudRejected, HttpVerifier
from hlm.cloud.server import HttpError, Limits, SessionStore, kv_bytes_per_token
from hlm.cloud.wire import pack_request, unpack_request
from hlm.config import SamplingConfig
from hlm.decoder import HybridDecoder
from hlm.payload import encode
from hlm.verifier import CloudUnavailable, LocalVerifier

PROMPT = "abc"
CLOUD_SOURCES = {"cloud_accepted", "cloud_resampled", "cloud_sampled"}


@pytest.fixture(scope="module")
def cloud():
    server = CloudProcess()
    server.start()
    yield server
    server.stop()


def tokens(events) -> list[tuple[int, str]]:
    return [(e.token_id, e.source) for e in events]


@pytest.mark.parametrize("policy", ["hlm", "ours", "llm"])
def test_http_path_gives_the_in_process_tokens(tiny, cloud, policy):
    config = cfg(policy, n=32, seed=7, u_th=0.2)
    local = list(HybridDecoder(tiny).generate(PROMPT, config))
    remote = list(HybridDecoder(tiny, cloud.verifier(tiny.vocab_size)).generate(PROMPT, config))
    assert tokens(remote) == tokens(local)
    assert any(e.source in CLOUD_SOURCES for e in remote)
    for e in remote:
        if e.source in CLOUD_SOURCES:  # measured bytes are the modelled payload plus framing and HTTP headers
            assert e.wire_bytes_up >= e.bits_up / 8 and e.wire_bytes_down >= e.bits_down / 8
        else:
            assert e.wire_bytes_up is None


def test_kill_and_restart_mid_run(tiny, cloud):
    verifier = cloud.verifier(tiny.vocab_size, backoff_s=0.1, max_backoff_s=0.3)
    stream = HybridDecoder(tiny, verifier).generate(PROMPT, cfg("hlm", n=60, seed=1, u_th=0.2))
    before = [next(stream) for _ in range(10)]
    cloud.kill()
    down = [next(stream) for _ in range(10)]
    cloud.start()
    time.sleep(0.4)  # past the longest backoff
    after = list(stream)
    assert {e.source for e in before} <= CLOUD_SOURCES
    assert {e.source for e in down} == {"unverified"}
    assert after[0].source in CLOUD_SOURCES and {e.source for e in after} <= CLOUD_SOURCES
    # The decoder models 10 synced ids (those since its last verdict); the transport really re-sent the whole
    # committed context to the new session, prompt included, and the measured bytes show it.
    assert after[0].synced_ids == 10
    resent = len(tiny.encode_prompt(PROMPT, 60)) + 20
    assert after[0].wire_bytes_up >= after[1].wire_bytes_up + 4 * (resent - 1)


def test_lost_answer_is_resynced(tiny, cloud, monkeypatch):
    """A verify whose answer times out may still have run on the server (its session moved on): the next
    verify is refused with 409 and the transport re-opens and re-sends the whole context."""
    verifier = cloud.verifier(tiny.vocab_size, backoff_s=0.05, max_backoff_s=0.05)
    verifier.open(SamplingConfig(seed=3))
    context = tiny.encode_prompt(PROMPT, 4)
    verifier.verify(context, None, None)
    context = verifier.held + [65]
    send = verifier.client.send

    def answer_lost(request: httpx.Request, **kwargs) -> httpx.Response:
        send(request, **kwargs)  # the server runs the verify; its answer is lost on the way back
        raise httpx.ReadTimeout("answer lost", request=request)

    monkeypatch.setattr(verifier.client, "send", answer_lost)
    with pytest.raises(CloudUnavailable, match="Timeout"):
        verifier.verify(context, None, None)
    monkeypatch.undo()
    time.sleep(0.3)  # past the backoff
    verdict = verifier.verify(context, None, None)
    assert verifier.held == [*context, verdict.token]
    assert verdict.wire_bytes_up > 4 * len(context)  # the whole context went again
    verifier.close()
    assert cloud.request("GET", "/metrics").json()["sessions"]["active"] == 0  # the stale session was deleted too


def test_backoff_fails_fast_without_touching_the_network(tiny):
    verifier = HttpVerifier(f"http://127.0.0.1:{free_port()}", tiny.vocab_size, backoff_s=5.0, max_backoff_s=5.0)
    verifier.open(SamplingConfig())
    with pytest.raises(CloudUnavailable, match="unreachable"):
        verifier.verify([1, 2], None, None)
    t0 = time.perf_counter()
    with pytest.raises(CloudUnavailable, match="next try"):
        verifier.verify([1, 2], None, None)
    assert time.perf_counter() - t0 < 0.05
    verifier.close()


def test_malformed_and_oversized_requests_get_4xx(tiny, cloud):
    def check(response: httpx.Response, status: int, words: str) -> None:
        assert response.status_code == status, response.text
        assert words in response.json()["error"]

    check(cloud.request("POST", "/v1/sessions", content=b"{not json"), 400, "not JSON")
    check(cloud.request("POST", "/v1/sessions", json={"temperature": 9, "top_p": 1, "seed": 0}), 400, "temperature")
    check(cloud.request("POST", "/v1/sessions", json={"temperature": 1, "top_p": 1, "seed": "0"}), 400, "integer")
    check(cloud.request("POST", "/v1/sessions", json={"temperature": 1, "top_p": 1, "seed": 0, "x": 1}), 400, "exactly")
    sid = cloud.request("POST", "/v1/sessions", json={"temperature": 1.0, "top_p": 1.0, "seed": 0}).json()["session"]
    path = f"/v1/sessions/{sid}/verify"
    prompt = tiny.encode_prompt(PROMPT, 4)
    good = pack_request(0, prompt, 65, encode(tiny.valid.float() / tiny.valid.sum(), 16))
    check(cloud.request("POST", path, content=b""), 400, "shorter than")
    check(cloud.request("POST", path, content=b"GET / HTTP/1.1\r\n" * 4), 400, "bad magic")
    check(cloud.request("POST", path, content=pack_request(0, [tiny.vocab_size], None, None)), 400, "outside")
    check(cloud.request("POST", path, content=good[:-3]), 400, "payload body")
    check(cloud.request("POST", path, content=pack_request(0, prompt, 65, b"junk")), 400, "payload")
    check(cloud.request("POST", path, content=pack_request(0, prompt, None, b"HLMP")), 400, "without the draft")
    check(cloud.request("POST", path, content=pack_request(0, [], None, None)), 400, "prompt")
    check(cloud.request("POST", path, content=good[:12] + (10**8).to_bytes(4, "little") + good[16:]), 400, "limit")
    check(cloud.request("POST", path, content=pack_request(5, prompt, None, None)), 409, "holds 0")
    check(cloud.request("POST", "/v1/sessions/nope/verify", content=good), 404, "unknown")
    check(cloud.request("POST", path, content=b"\0" * (5 << 20)), 413, "limit")
    check(cloud.request("POST", path, content=iter([b"\0" * (1 << 20)] * 5)), 413, "limit")  # chunked: no length
    check(cloud.request("GET", "/no/such/path"), 404, "Not Found")
    ok = cloud.request("POST", path, content=good)  # the session survived every bad request
    assert ok.status_code == 200 and len(ok.content) == 32
    check(cloud.request("POST", path, content=good), 409, "holds")  # replaying a decided request
    assert cloud.request("DELETE", f"/v1/sessions/{sid}").status_code == 200
    assert cloud.request("GET", "/health").json()["status"] == "ok"
    counts = cloud.request("GET", "/metrics").json()["responses"]
    assert counts["400"] >= 11 and counts["413"] >= 2


def test_eight_concurrent_sessions_stay_isolated(tiny, cloud):
    jobs = [(["hlm", "ours", "llm"][i % 3], 100 + i) for i in range(8)]
    expected = [tokens(HybridDecoder(tiny).generate(PROMPT, cfg(p, n=24, seed=s, u_th=0.2))) for p, s in jobs]
    results: list = [None] * len(jobs)

    def run(i: int) -> None:
        policy, seed = jobs[i]
        decoder = HybridDecoder(tiny, cloud.verifier(tiny.vocab_size))
        results[i] = tokens(decoder.generate(PROMPT, cfg(policy, n=24, seed=seed, u_th=0.2)))

    active = cloud.request("GET", "/metrics").json()["sessions"]["active"]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == expected
    metrics = cloud.request("GET", "/metrics").json()
    assert metrics["sessions"]["active"] == active and metrics["latency_ms"]["p50"] is not None


def test_auth(tiny, cloud):
    assert cloud.request("GET", "/health", auth=False).status_code == 200
    assert cloud.request("GET", "/metrics", auth=False).status_code == 401
    opened = cloud.request("POST", "/v1/sessions", auth=False, json={"temperature": 1, "top_p": 1, "seed": 0})
    assert opened.status_code == 401
    wrong = HttpVerifier(cloud.url, tiny.vocab_size, token="wrong-token-wrong-token")
    with pytest.raises(CloudRejected, match="bearer token"):
        list(HybridDecoder(tiny, wrong).generate(PROMPT, cfg("hlm", n=2, u_th=0.2)))


def test_refuses_a_public_bind_without_token(monkeypatch, capsys):
    monkeypatch.delenv("HLM_CLOUD_TOKEN", raising=False)
    assert cli_main(["serve-cloud", "--models", "tiny", "--host", "0.0.0.0"]) == 2
    assert "bearer token" in capsys.readouterr().err
    monkeypatch.setenv("HLM_CLOUD_TOKEN", "short")
    assert cli_main(["serve-cloud", "--models", "tiny", "--host", "0.0.0.0"]) == 2


def test_session_limits(tiny):
    store = SessionStore(tiny, Limits(max_sessions=2, idle_s=60, max_kv_bytes=32 * kv_bytes_per_token(tiny.verifier)))
    a, _ = store.open(SamplingConfig()), store.open(SamplingConfig())
    with pytest.raises(HttpError, match="sessions are in use") as full:
        store.open(SamplingConfig())
    assert full.value.status == 503
    with pytest.raises(HttpError, match="memory cap"):
        store.verify(a, pack_request(0, list(range(40)), None, None))
    store.sessions[a].last_used -= 120
    store.expire()
    assert a not in store.sessions and store.counts["expired"] == 1


def test_wire_format_round_trip():
    body = pack_request(3, [1, 2, 271], 7, b"PAYLOAD")
    req = unpack_request(body, vocab_size=272, max_ids=10)
    assert (req.base, req.ids, req.draft, req.payload) == (3, [1, 2, 271], 7, b"PAYLOAD")
    assert unpack_request(pack_request(0, [5], None, None), 272, 10).draft is None


def test_the_cloud_reads_the_prompt_while_the_device_drafts(tiny, cloud):
    """`open` with the prompt: a thread opens the session and the server prefills it; the first verify then
    carries no prompt ids, and the token is the in-process one."""
    prompt = tiny.encode_prompt(PROMPT, 4)
    remote = cloud.verifier(tiny.vocab_size)
    remote.open(SamplingConfig(seed=5), prompt)
    remote._join()
    assert remote.held == prompt
    verdict = remote.verify(prompt, None, None)
    local = LocalVerifier(tiny.verifier, tiny.valid)
    local.open(SamplingConfig(seed=5))
    assert verdict.token == local.verify(prompt, None, None).token
    remote.close()
    # A prefill that carries a draft, or ids out of step, is refused without touching the session.
    sid = cloud.request("POST", "/v1/sessions", json={"temperature": 1.0, "top_p": 1.0, "seed": 0}).json()["session"]
    uniform = encode(tiny.valid.float() / tiny.valid.sum(), 16)
    bad = cloud.request("POST", f"/v1/sessions/{sid}/prefill", content=pack_request(0, prompt, 65, uniform))
    assert bad.status_code == 400 and "no draft" in bad.json()["error"]
    bad = cloud.request("POST", f"/v1/sessions/{sid}/prefill", content=pack_request(3, prompt, None, None))
    assert bad.status_code == 409
    good = cloud.request("POST", f"/v1/sessions/{sid}/prefill", content=pack_request(0, prompt, None, None))
    assert good.json() == {"held": len(prompt)}


def test_a_new_session_reads_the_prompt_alone_first(tiny, cloud):
    """When the server has lost the session (restart, idle expiry), the new one reads the prompt alone and the ids
    after it as the in-process verifier does, row for row: q(draft) is bitwise the local one (the ids read in one
    pass with the prompt move it by about 1e-5 on this pair)."""
    prompt = tiny.encode_prompt(PROMPT, 4)
    context = [*prompt, *range(65, 75)]
    uniform = encode(tiny.valid.float() / tiny.valid.sum(), 16)
    local = LocalVerifier(tiny.verifier, tiny.valid, head=tiny.template_head)
    local.open(SamplingConfig(seed=5), prompt)
    expected = local.verify(context, 66, uniform)
    remote = cloud.verifier(tiny.vocab_size)
    remote.open(SamplingConfig(seed=5), prompt)
    remote._join()
    assert cloud.request("DELETE", f"/v1/sessions/{remote.session}").status_code < 300  # the server loses it
    verdict = remote.verify(context, 66, uniform)
    assert (verdict.token, verdict.q_draft) == (expected.token, expected.q_draft)
    remote.close()


def test_a_port_in_use_is_one_line_before_any_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_main(["serve-cloud", "--models", "tiny", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err and "--port" in err, err


@pytest.mark.parametrize("status", [200, 404])
def test_a_cloud_url_that_answers_a_web_page_is_one_line(status, capsys):
    """Pointing --cloud at the dashboard or any web server: the CLI says what answered, and what to check."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's handler naming)
            self.rfile.read(int(self.headers.get("content-length", 0)))
            body = b"<!doctype html><title>Gradio</title>"
            self.send_response(status)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page) as page:
        threading.Thread(target=page.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{page.server_address[1]}"
        code = cli_main(["generate", "--models", "tiny", "--prompt", "hi", "--max-new-tokens", "2", "--policy", "hlm",
                         "--cloud", url])
        page.shutdown()
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{url} answered {status} with text/html" in err and "serve-cloud" in err, err
