"""Fixtures and helpers shared by the test modules (import helpers with `from conftest import ...`)."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace

import httpx
import pytest
import torch

from hlm.cloud.client import HttpVerifier
from hlm.config import LinkConfig, PolicyConfig, RunConfig, SamplingConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray reads this when it is imported: a local instance or a test cluster then binds to 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Each load measures its own timings, as the tests that steer them expect: none kept from another load (hlm.timings).
os.environ["HLM_TIMINGS"] = "off"
# The tiny models are far faster on one thread (no cross-core sync); the slow tests raise it for real models.
torch.set_num_threads(1)

# For the CLI in a subprocess: offline, one thread, as here.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def cfg(policy: str = "hlm", n: int = 16, seed: int = 0, temperature: float = 1.0, bits: int = 16, topk: int = 0,
        **policy_kw) -> RunConfig:
    """A run of exactly `n` tokens (no stop at EOS), so token counts are what a test asks for."""
    return RunConfig(SamplingConfig(temperature=temperature, max_new_tokens=n, seed=seed, stop_at_eos=False),
                     PolicyConfig(name=policy, **policy_kw), LinkConfig(bits_per_prob=bits, topk=topk))


class Interrupted(Exception):
    """What `interrupt_after`'s callback raises: a long command stopped part-way, as Ctrl-C would stop it."""


def interrupt_after(n: int, seen: list) -> Callable[..., None]:
    """An `after_run(job, record)` callback that records each job in `seen` and raises Interrupted after the n-th."""
    def after_run(job, record) -> None:  # noqa: ARG001 - the after_run signature
        seen.append(job)
        if len(seen) == n:
            raise Interrupted
    return after_run


def other_numerics(numerics: str) -> tuple[str, str]:
    """`ModelPair.numerics` keys that differ from `numerics` in the draft alone, and in the verifier alone: what the
    LLM alone's cache and `eval merge --reference-from` must tell apart."""
    from hlm.models.numerics import Numerics

    parts = Numerics.parse(numerics)
    assert parts is not None, numerics
    other_draft = replace(parts, recipes=(("draft", "int8"), *parts.without_draft().recipes))
    return str(other_draft), str(replace(parts, verifier_attention="eager"))


def write_gguf(path, tensors) -> None:
    """A qwen2 GGUF at `path` holding `tensors`: name -> (raw blocks, their GGML type) or a float array."""
    import gguf

    writer = gguf.GGUFWriter(path, "qwen2")
    for name, tensor in tensors.items():
        if isinstance(tensor, tuple):
            writer.add_tensor(name, tensor[0], raw_dtype=tensor[1])
        else:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny():
    from hlm.models import load_pair

    return load_pair("tiny")


@pytest.fixture()
def decoder(tiny):
    from hlm.decoder import HybridDecoder

    return HybridDecoder(tiny)


TOKEN = "test-token-0123456789abcdef"


class CloudProcess:
    """`python -m hlm serve-cloud --models tiny` in a subprocess on a fixed loopback port, restartable on it."""

    def __init__(self, *args: str) -> None:
        self.args = args  # more serve-cloud flags
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="hlm-cloud-", suffix=".log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from hlm.models import load_pair
        from hlm.rows import BLOCK_ENV

        # the server's verifier multiplies in this process's block of rows: each timing its own, fp32's came out 1
        # in one and 4 in the other on an AMX machine, and a q(draft) moved by one ulp (`hlm.rows.pinned_block`)
        env = {**os.environ, "HLM_CLOUD_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1",
               BLOCK_ENV: str(load_pair("tiny").verifier_block_rows)}  # $HLM_BLOCK_ROWS where set
        self.proc = subprocess.Popen([sys.executable, "-m", "hlm", "serve-cloud", "--models", "tiny", "--threads", "1",
                                      "--port", str(self.port), *self.args], env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {open(self.log.name).read()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise TimeoutError("server did not come up")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()

    def verifier(self, vocab_size: int, **kwargs) -> HttpVerifier:
        return HttpVerifier(self.url, vocab_size=vocab_size, token=TOKEN, **kwargs)

    def request(self, method: str, path: str, auth: bool = True, **kwargs) -> httpx.Response:
        headers = {"authorization": f"Bearer {TOKEN}"} if auth else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=10, **kwargs)


@pytest.fixture(autouse=True)
def fresh_prompt_reads():
    """Each test reads its prompts itself: `hlm.prefix.read` remembers them for the process, which would let one
    test's read stand in for the pass another test means to run."""
    from hlm import prefix

    prefix._READS.clear()
