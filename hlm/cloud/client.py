"""The cloud over HTTP, client side: `HttpVerifier` implements `hlm.verifier.Verifier` against
`python -m hlm serve-cloud`, speaking the binary format of `hlm.cloud.wire`.

The transport tracks what the server's session holds (`held`: the prompt, the ids sent since and the verdict
tokens the server produced itself), so each verify carries only the ids the server lacks. Failures never stop
generation: a network error, timeout or 5xx raises `CloudUnavailable` (the decoder keeps the draft as
`unverified`) and starts an exponential backoff during which `verify` fails at once, without touching the
network, so local generation runs at full speed. When the server has lost the session (restart, idle expiry:
404) or holds another context (it decided a verify whose answer was lost: 409), the transport opens a new
session, has it read the prompt and re-sends the rest of the committed context: the decoder needs no resync logic
of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from hlm.cloud import RESYNC_HEADER, TOKEN_ENV
from hlm.cloud.wire import WireError, pack_request, unpack_verdict
from hlm.config import ConfigError, LinkConfig, SamplingConfig
from hlm.link import upload_cost
from hlm.verifier import CloudUnavailable, Verdict


class CloudRejected(ConfigError):
    """The cloud refused a request for a reason retrying cannot fix (bad token, another vocabulary, not an
    hlm server): a configuration error, so the CLI reports it as bad input instead of degrading silently."""


@dataclass(frozen=True)
class RemoteMeter:
    """The server's energy counter, as far as the decoder's labels need it (`method`)."""

    method: str


def verify_body(held: Sequence[int], context: Sequence[int], draft: int | None, payload: bytes | None) -> bytes:
    """The body of a verify when the server's session holds `held`: the ids it lacks, the draft and its payload
    (what a recorded trace keeps per call, `hlm.experiments.fleet`)."""
    return pack_request(len(held), list(context[len(held):]), draft, payload)


def _http_bytes(start_line: str, headers: httpx.Headers, body_len: int) -> int:
    """Bytes of an HTTP/1.1 message as h11 writes it: start line, `name: value` lines, blank line, body."""
    return len(start_line) + 2 + sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2 + body_len


class HttpVerifier:
    """`Verifier` over HTTP. `wire_bytes_up/down` of each verdict count the HTTP/1.1 messages of that verify
    (request/status line, headers and body, a re-open included); TCP/IP and TLS framing are not counted."""

    def __init__(self, url: str, vocab_size: int, token: str | None = None, emulate_link: LinkConfig | None = None,
                 timeout_s: float = 30.0, connect_timeout_s: float = 3.0, backoff_s: float = 0.5,
                 max_backoff_s: float = 8.0, retries: int = 1) -> None:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(f"cloud URL must look like http://HOST:PORT, got {url!r}")
        if timeout_s <= 0 or connect_timeout_s <= 0 or backoff_s <= 0 or max_backoff_s < backoff_s or retries < 0:
            raise ConfigError("timeouts and backoff must be > 0, max_backoff_s >= backoff_s, retries >= 0")
        self.url, self.vocab_size, self.emulate_link = url, vocab_size, emulate_link
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        headers = {"user-agent": "hlm", "accept": "*/*", "accept-encoding": "identity"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        # HTTPTransport(retries=) retries failed connection attempts only, never a request the server may have run.
        self.client = httpx.Client(base_url=url, headers=headers, transport=httpx.HTTPTransport(retries=retries),
                                   timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s))
        self.meter: RemoteMeter | None = None
        self.sampling: SamplingConfig | None = None
        self.session: str | None = None
        self.held: list[int] = []  # the ids the server's session holds (its verifier's `held`)
        self.prompt: list[int] = []  # from `open`: a new session reads it alone first (`_read_prompt`)
        self.failures, self.retry_at = 0, 0.0
        self.resync: str | None = None  # why the last session was dropped mid-run: said on the next open
        self._reader: threading.Thread | None = None  # the early prefill (`open`)
        self._early_bytes = (0, 0)  # its HTTP bytes up and down, counted with the first verify

    def open(self, sampling: SamplingConfig, prompt: Sequence[int] = ()) -> None:
        """Never fails: with the prompt, a thread opens the session and has the server read the prompt while the
        device drafts (best effort: if that fails, the first verify opens the session and sends the prompt)."""
        self._join()
        self.sampling, self.session, self.held, self._early_bytes = sampling, None, [], (0, 0)
        self.prompt, self.resync = list(prompt), None
        if prompt and time.monotonic() >= self.retry_at:
            self._reader = threading.Thread(target=self._prefill, args=(list(prompt),), name="hlm-cloud-prefill",
                                            daemon=True)
            self._reader.start()

    def _prefill(self, prompt: list[int]) -> None:
        try:
            self._early_bytes = self._read_prompt(prompt, *self._open(0, 0))
        except (CloudUnavailable, CloudRejected, ValueError, AttributeError):
            self.session, self.held = None, []  # the first verify opens its own (the server expires an idle one)

    def _read_prompt(self, prompt: list[int], up: int, down: int) -> tuple[int, int]:
        """Have a new session read the prompt alone, as the in-process verifier reads it before the drafts after it:
        the server then reads those in passes of at most `hlm.rows.EXACT_ROWS`, each row as a one-token pass
        computes it (read in one pass with the prompt, their logits would differ from the LLM alone's)."""
        body = pack_request(0, prompt, None, None)
        if self.emulate_link is not None:
            time.sleep(upload_cost(self.emulate_link, 8 * len(body), 0.0).uplink_s)
        response, up, down = self._send("POST", f"/v1/sessions/{self.session}/prefill", up, down, content=body,
                                        headers={"content-type": "application/octet-stream"})
        self._check(response)
        if response.json().get("held") != len(prompt):
            raise CloudUnavailable("the cloud read a different prompt length")
        self.held = prompt
        return up, down

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join()
            self._reader = None

    def verify(self, context: list[int], draft: int | None, payload: bytes | None) -> Verdict:
        if self.sampling is None:
            raise RuntimeError("verify() before open()")
        self._join()
        if context[: len(self.held)] != self.held:
            raise ValueError("context does not extend what the verifier holds")
        wait = self.retry_at - time.monotonic()
        if wait > 0:
            raise CloudUnavailable(f"cloud at {self.url} unavailable; next try in {wait:.1f} s")
        try:
            verdict = self._verify(context, draft, payload)
        except CloudUnavailable:
            self.failures += 1
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** min(self.failures - 1, 30))
            self.retry_at = time.monotonic() + delay
            raise
        self.failures = 0
        return verdict

    def close(self) -> None:
        self._join()
        if time.monotonic() >= self.retry_at:  # a server that is down (in backoff) is not waited for
            self._delete_session()
        self.sampling, self.session, self.held = None, None, []

    def _delete_session(self) -> None:
        """Best effort: the server expires idle sessions anyway, this only frees their KV cache sooner."""
        if self.session is not None:
            try:
                self.client.delete(f"/v1/sessions/{self.session}", timeout=2.0)
            except httpx.HTTPError:
                pass

    def _verify(self, context: list[int], draft: int | None, payload: bytes | None) -> Verdict:
        (up, down), self._early_bytes = self._early_bytes, (0, 0)
        response, up, down = self._post_verify(context, draft, payload, up, down)
        if response.status_code in (404, 409):  # session lost or out of step: start over with the full context
            if response.status_code == 409:
                self._delete_session()
            self._drop("lost" if response.status_code == 404 else "out-of-step")
            response, up, down = self._post_verify(context, draft, payload, up, down)
            if response.status_code in (404, 409):
                self._drop("lost" if response.status_code == 404 else "out-of-step")
                raise CloudUnavailable(f"cloud lost the session twice in a row ({response.status_code})")
        self._check(response)
        try:
            verdict, n_held = unpack_verdict(response.content)
        except WireError as exc:
            self._drop("garbled")
            raise CloudUnavailable(f"garbled verdict from {self.url}: {exc}") from exc
        if n_held != len(context) + 1:
            self._drop("out-of-step")
            raise CloudUnavailable(f"cloud session holds {n_held} ids, expected {len(context) + 1}")
        self.held = [*context, verdict.token]
        verdict.wire_bytes_up, verdict.wire_bytes_down = up, down
        verdict.energy_method = self.meter.method if self.meter and verdict.energy_j is not None else None
        return verdict

    def _drop(self, reason: str) -> None:
        """Forget a session the server lost or holds out of step; the next open says why (a resync)."""
        self.session, self.held, self.resync = None, [], reason

    def _post_verify(self, context: list[int], draft: int | None, payload: bytes | None, up: int,
                     down: int) -> tuple[httpx.Response, int, int]:
        """One verify request (opening the session first if there is none) carrying the ids it lacks."""
        if self.session is None:
            up, down = self._open(up, down)
            if self.prompt and context[:len(self.prompt)] == self.prompt:
                up, down = self._read_prompt(self.prompt, up, down)
        body = verify_body(self.held, context, draft, payload)
        if self.emulate_link is not None:
            time.sleep(upload_cost(self.emulate_link, 8 * len(body), 0.0).uplink_s)
        return self._send("POST", f"/v1/sessions/{self.session}/verify", up, down, content=body,
                          headers={"content-type": "application/octet-stream"})

    def _open(self, up: int, down: int) -> tuple[int, int]:
        s = self.sampling
        resync = {RESYNC_HEADER: self.resync} if self.resync else {}
        response, up, down = self._send("POST", "/v1/sessions", up, down, headers=resync,
                                        json={"temperature": s.temperature, "top_p": s.top_p, "seed": s.seed})
        self._check(response)
        self.resync = None
        try:
            info = response.json()
            session, vocab, model, method = info["session"], info["vocab_size"], info["model"], info["energy_method"]
        except (ValueError, KeyError, TypeError) as exc:
            raise self._not_hlm(response) from exc
        if vocab != self.vocab_size:
            raise CloudRejected(f"the cloud verifier {model} has a vocabulary of {vocab}, this pair {self.vocab_size}")
        self.session, self.held = session, []
        self.meter = RemoteMeter(f"{method} (on the cloud server)") if method else None
        return up, down

    def _send(self, method: str, path: str, up: int, down: int,
              **kwargs: Any) -> tuple[httpx.Response, int, int]:
        request = self.client.build_request(method, path, **kwargs)
        try:
            response = self.client.send(request)
        except httpx.TransportError as exc:  # refused, reset, timed out; the session may still live: keep its id
            raise CloudUnavailable(f"cloud at {self.url} unreachable: {type(exc).__name__}: {exc}") from exc
        up += _http_bytes(f"{method} {request.url.raw_path.decode()} HTTP/1.1", request.headers, len(request.content))
        down += _http_bytes(f"HTTP/1.1 {response.status_code} {response.reason_phrase}", response.headers,
                            len(response.content))
        return response, up, down

    def _check(self, response: httpx.Response) -> None:
        """2xx passes; 401/403 and other 4xx are configuration errors; 429 and 5xx are outages (retry later)."""
        status = response.status_code
        if status < 300:
            return
        try:
            message = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            if status < 500:  # a web page or another service: no retry will help
                raise self._not_hlm(response) from None
            message = response.text[:200]
        if status in (401, 403):
            raise CloudRejected(f"the cloud refused the bearer token (set {TOKEN_ENV}): {message}")
        if status == 429 or status >= 500:
            raise CloudUnavailable(f"cloud answered {status}: {message}")
        raise CloudRejected(f"the cloud rejected the request ({status}): {message}")

    def _not_hlm(self, response: httpx.Response) -> CloudRejected:
        """Something else answers at the URL (a web page, the dashboard, another API): say what, and what to check."""
        kind = response.headers.get("content-type", "no content type").split(";")[0]
        return CloudRejected(f"{self.url} answered {response.status_code} with {kind}, not like `python -m hlm "
                             "serve-cloud`: check the cloud URL's host and port (the dashboard's own port is not the "
                             "cloud's)")
