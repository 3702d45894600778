"""`scripts/page_timing.py` end to end against `app.py` on the tiny pair: every figure is printed beside its target
and written to its JSON, and the script exits 0. No time is asserted: the targets are the script's to check, on
the embedded pair and a quiet machine (docs/speed.md, "The page, timed")."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_app import ROOT, launched_process
from test_browser import CHROMIUM


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs Debian chromium at {CHROMIUM}")
def test_page_timing_prints_every_figure_beside_its_target(tmp_path):
    written = tmp_path / "page.json"
    with launched_process() as (url, app):
        out = subprocess.run([sys.executable, "scripts/page_timing.py", "--url", url, "--pid", str(app.pid),
                              "--runs", "2", "--max-new-tokens", "8", "--timeout-s", "120", "--json", str(written)],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    figures = json.loads(written.read_text())
    for key, row in figures["rows"].items():  # Generate's four marks, Show me, Compare, the RSS and its peak
        assert figures["figures"][key] is not None, key
        unit = row["unit"]
        said = rf"<= {row['limit']:g} {unit} +(met|missed by \d+\.\d\d {unit})" if row["limit"] else "-"
        assert re.search(rf"^{re.escape(row['name'])} +\d+\.\d\d {unit} +{said}$", out.stdout, re.M), (row, out.stdout)
    assert len(figures["generate"]) == 2 and "(Generate: median of 2)" in out.stdout
    assert "greedy reference: decoded after the first run (--max-new-tokens" in out.stdout
