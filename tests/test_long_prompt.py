"""`scripts/long_prompt.py` end to end on the tiny pair (a prompt that fits its 1,024-token context): every figure is
printed beside its target. No time is asserted: the targets are the script's to check, on the embedded pair and a
quiet machine (docs/speed.md, "Long prompts")."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ENV
from test_app import ROOT


def test_long_prompt_prints_every_figure_beside_its_target():
    out = subprocess.run([sys.executable, "scripts/long_prompt.py", "--models", "tiny", "--chars", "900",
                          "--tokens", "4", "--stop-after-s", "0.001"], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"prompt: 900 characters, [\d,]+ tokens", out.stdout)
    for row in ("first token shown", "first decided token", "into the device's prefill", "into the cloud's prefill",
                "peak RSS"):
        line = next(line for line in out.stdout.splitlines() if row in line and "(target <=" in line)
        assert re.search(r"\(target <= [\d.]+ (s|GB): (met|missed by [\d.]+ (s|GB)|not measured)\)$", line), line


def test_the_prompt_is_a_build_log_of_the_asked_length(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from long_prompt import QUESTION, build_log

    text = build_log(5_000)
    assert len(text) == 5_000 and text.endswith(QUESTION) and "error:" in text
