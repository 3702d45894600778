import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny models are far faster on one thread (no cross-core sync); the slow tests raise it for real models.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    from hlm.models import load_pair

    return load_pair("tiny")


@pytest.fixture()
def decoder(tiny):
    from hlm.decoder import HybridDecoder

    return HybridDecoder(tiny)
