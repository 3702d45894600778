"""Timings that choose a path at load are measured once a machine and kept (`hlm.timings`)."""

import json

import pytest
import torch

from hlm import timings
from hlm.quant import Busy


@pytest.fixture
def kept_in(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "timings.json"
    monkeypatch.setenv(timings.ENV, str(path))
    return path


def counting(value):
    calls = []

    def measure():
        calls.append(1)
        return value

    return measure, calls


def test_a_timing_is_measured_once_and_then_read_back(kept_in):
    measure, calls = counting([1.5e-3, 2.5e-3])
    assert timings.kept("dtype", measure, 8960, 1536) == ([1.5e-3, 2.5e-3], "at load")
    value, when = timings.kept("dtype", measure, 8960, 1536)
    assert value == [1.5e-3, 2.5e-3] and len(calls) == 1
    assert when.startswith("at a load on ") and str(kept_in) in when
    assert len(json.loads(kept_in.read_text())) == 1


def test_another_key_name_or_thread_count_measures_again(kept_in):
    measure, calls = counting(1.0)
    timings.kept("dtype", measure, 8960, 1536)
    timings.kept("dtype", measure, 1536, 8960)
    timings.kept("block rows", measure, 8960, 1536)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        timings.kept("dtype", measure, 8960, 1536)
    finally:
        torch.set_num_threads(threads)
    timings.kept("dtype", measure, 8960, 1536)  # back on the first thread count: kept
    assert len(calls) == 4 and len(json.loads(kept_in.read_text())) == 4


def test_off_measures_every_time_and_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(timings.ENV, "off")
    monkeypatch.setenv("HLM_CACHE", str(tmp_path))
    measure, calls = counting(2)
    assert [timings.kept("x", measure) for _ in range(2)] == [(2, "at load")] * 2
    assert len(calls) == 2 and not list(tmp_path.iterdir())


def test_the_default_file_is_in_the_model_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(timings.ENV)
    monkeypatch.setenv("HLM_CACHE", str(tmp_path))
    timings.kept("x", lambda: 3)
    assert timings.kept("x", lambda: 4)[0] == 3 and (tmp_path / "timings.json").is_file()


def test_a_busy_timing_is_not_kept(kept_in):
    def busy():
        raise Busy("the cores were busy")

    with pytest.raises(Busy):
        timings.kept("dtype", busy)
    assert timings.kept("dtype", lambda: 7) == (7, "at load")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_damaged_file_is_measured_over(kept_in, text):
    kept_in.parent.mkdir(parents=True)
    kept_in.write_text(text)
    assert timings.kept("dtype", lambda: 5) == (5, "at load")
    assert timings.kept("dtype", lambda: 6)[0] == 5  # written afresh, readable again


def test_a_file_that_cannot_be_written_costs_only_a_measurement(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(timings.ENV, str(blocker / "timings.json"))  # its folder is a file
    assert [timings.kept("x", lambda: 1) for _ in range(2)] == [(1, "at load")] * 2


@pytest.mark.parametrize(("fast", "taken"), [(2.0, False), (0.5, True)])
def test_a_kept_llama_timing_loads_the_gguf_only_where_it_is_taken(tiny, tmp_path, monkeypatch, fast, taken):
    """`_take_llama` with a kept timing: llama.cpp loads the GGUF where the timing takes it, and not at all where
    it says no (the load is a memory map and a context for nothing)."""
    from dataclasses import replace

    from hlm import llamacpp
    from hlm.models import presets

    loads = []
    monkeypatch.setattr(llamacpp, "LlamaDraft", lambda path, head: loads.append(path) or "the llama.cpp draft")
    monkeypatch.setattr(timings, "kept", lambda _name, _measure, *_key: ((fast, 1.0), "kept"))
    gguf = tmp_path / "draft.gguf"
    gguf.write_bytes(b"GGUF")
    pair = replace(tiny, quant={"draft": "none", "verifier": "none"}, llama=None)
    presets._take_llama(pair, gguf)
    assert (pair.llama == "the llama.cpp draft") is taken and loads == ([gguf] if taken else [])
    assert ("llama.cpp not taken" in pair.quant["draft"]) is not taken
