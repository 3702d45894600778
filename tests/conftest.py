"""Fixtures and helpers shared by the test modules (import helpers with `from conftest import ...`)."""

import os
import socket

import pytest
import torch

from hlm.config import LinkConfig, PolicyConfig, RunConfig, SamplingConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny models are far faster on one thread (no cross-core sync); the slow tests raise it for real models.
torch.set_num_threads(1)

# For the CLI in a subprocess: offline, one thread, as here.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def cfg(policy: str = "hlm", n: int = 16, seed: int = 0, temperature: float = 1.0, bits: int = 16, topk: int = 0,
        **policy_kw) -> RunConfig:
    """A run of exactly `n` tokens (no stop at EOS), so token counts are what a test asks for."""
    return RunConfig(SamplingConfig(temperature=temperature, max_new_tokens=n, seed=seed, stop_at_eos=False),
                     PolicyConfig(name=policy, **policy_kw), LinkConfig(bits_per_prob=bits, topk=topk))


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
