"""Front-end parity against a recorded tiny-pair run: the CLI (`--json`), the dashboard's API path and the CLI over
the HTTP cloud give the same tokens, sources and counts as when `tests/fixtures/tiny_parity.json` was recorded.

It pins outputs across restructurings of the front ends (issue 9): a change that moves code must not move a token.
Timings and energies are measured, so only deterministic fields are compared. Re-record (after a change that is
meant to change outputs) with `PYTHONPATH=. python tests/test_parity.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ENV

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_parity.json"
PROMPT = "Say hello."
SUMMARY_FIELDS = ("policy", "tokens", "uploads", "llm_calls", "accepted", "resampled", "unverified", "uplink_bits",
                  "downlink_bits", "device_profile", "link_preset")
# (name, CLI flags); the dashboard runs the same settings through `Settings` (the temperature explicit: the page
# decodes greedily by default, the CLI samples)
CASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ours-seed3", {"policy": "ours", "seed": 3, "temperature": 0.7, "max_new_tokens": 24}),
    ("uhlm-seed7-T1", {"policy": "uhlm", "seed": 7, "temperature": 1.0, "max_new_tokens": 24}),
    ("hlm-seed0-given-u_th", {"policy": "hlm", "seed": 0, "temperature": 0.7, "max_new_tokens": 16, "u_th": 0.3}),
    ("random-seed5", {"policy": "random", "seed": 5, "temperature": 0.7, "max_new_tokens": 16}),
)


def record(tokens: list[dict[str, Any]], summary: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The deterministic part of one run."""
    return {"ids": [t["token_id"] for t in tokens], "sources": [t["source"] for t in tokens],
            "text": "".join(t["text"] for t in tokens), "summary": {f: summary[f] for f in SUMMARY_FIELDS},
            "policy": config["policy"], "sampling": config["sampling"]}


def cli_flags(case: dict[str, Any]) -> list[str]:
    return [f"--{key.replace('_', '-')}={value}" for key, value in case.items()]


def cli_run(case: dict[str, Any], *extra: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "hlm", "generate", "--models", "tiny", "--prompt", PROMPT, "--json",
                          *cli_flags(case), *extra], capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    return record(data["tokens"], data["summary"], data["config"])


def dashboard_run(case: dict[str, Any]) -> dict[str, Any]:
    from hlm.dashboard import Dashboard, Settings
    from hlm.dashboard.service import Service
    from hlm.decoder import HybridDecoder
    from hlm.models import load_pair

    service = Service(lambda preset: HybridDecoder(load_pair(preset)), "tiny", ["tiny"])
    *_, last = Dashboard(service).api_generate("tiny", PROMPT, Settings(**case), quality=False)
    return record(last["tokens"], last["summary"], last["config"])


@contextmanager
def cloud_in_process() -> Iterator[str]:
    """The verifier service (`serve-cloud`'s app) on a thread of this process; yields its URL."""
    from hlm.cloud.server import Limits, create_app, serve_in_thread
    from hlm.models import load_pair

    with serve_in_thread(create_app(load_pair("tiny"), Limits())) as url:
        yield url


def run_all() -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.__version__, "prompt": PROMPT, "cli": {}, "dashboard": {}, "http": {}}
    for name, case in CASES:
        out["cli"][name] = cli_run(case)
        out["dashboard"][name] = dashboard_run(case)
    with cloud_in_process() as url:
        for name, case in CASES[:2]:
            out["http"][name] = cli_run(case, f"--cloud={url}")
    return out


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    data = json.loads(FIXTURE.read_text(encoding="utf-8"))
    if data["torch"].split("+")[0] != torch.__version__.split("+")[0]:
        pytest.skip(f"recorded under torch {data['torch']}: random init and kernels differ between releases")
    return data


@pytest.mark.parametrize("name,case", CASES, ids=[n for n, _ in CASES])
def test_cli_reproduces_the_recorded_run(recorded, name, case):
    assert cli_run(case) == recorded["cli"][name]


@pytest.mark.parametrize("name,case", CASES, ids=[n for n, _ in CASES])
def test_dashboard_reproduces_the_recorded_run(tiny, recorded, name, case):
    assert dashboard_run(case) == recorded["dashboard"][name]


def test_http_cloud_reproduces_the_recorded_runs(tiny, recorded):
    with cloud_in_process() as url:
        for name, case in CASES[:2]:
            run = cli_run(case, f"--cloud={url}")
            assert run == recorded["http"][name]
            assert run["ids"] == recorded["cli"][name]["ids"], "the HTTP path must give the in-process tokens"


if __name__ == "__main__":
    torch.set_num_threads(1)
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(run_all(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE}")
