"""The dashboard in a real browser: headless Debian chromium driven by Playwright against `app.py` on the tiny pair.

Load the page, enter a prompt, Generate, wait for coloured tokens and a chart; change k and γ, run again, then
the policy, and check that the displayed upload rate changed; Compare fills its table and ends on ours; the Evidence
tab draws the capture curve from the committed results. Screenshots at 1280x800 and phone width (390x844) go to
$HLM_SCREENSHOTS when set, else to the test's temporary folder. The shots in docs/screenshots come from
`HLM_SCREENSHOTS=docs/screenshots HLM_APP_MODELS=embedded`; HLM_APP_URL points the test at an app that is already
running.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from test_app import ROOT, launched_app

from hlm.dashboard import Settings

sys.path.insert(0, str(ROOT / "scripts"))
from page_timing import REPLAY_K, replay_ms  # noqa: E402  (the page benchmark's own replay, timed the same way)

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # Playwright adds --headless and a fresh profile itself
MODELS = os.environ.get("HLM_APP_MODELS", "tiny")
PROMPT = "Write a Python function that merges two sorted lists into one sorted list."
RUN_TIMEOUT_MS = 600_000 if MODELS != "tiny" else 60_000
DEFAULT_LABEL = f"ours k={Settings.k} γ={Settings.gamma:g}"


def fitted(scope: str = "") -> str:
    """Every plotly chart (under the CSS selector `scope`) laid out no wider than its box (a chart updated in a
    hidden tab keeps a stale width)."""
    return (f"() => [...document.querySelectorAll('{scope} .js-plotly-plot')].every("
            "e => e._fullLayout && e._fullLayout.width <= e.parentElement.clientWidth + 1)")


pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs Debian chromium at {CHROMIUM}")


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def url():
    if os.environ.get("HLM_APP_URL"):  # an app already running (e.g. on the embedded pair)
        yield os.environ["HLM_APP_URL"]
        return
    with launched_app(MODELS) as u:
        yield u


def shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("HLM_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def generate(page: Page, label: str) -> str:
    """Press Generate, wait for coloured tokens, a drawn chart and the end of the run labelled `label` (the
    status line names the policy and settings); the upload-rate figure."""
    page.get_by_role("button", name="Generate", exact=True).click()
    page.locator(".prose.hlm-tokens .tok").first.wait_for(state="attached", timeout=RUN_TIMEOUT_MS)
    page.locator(".hlm-status.done", has_text=re.compile(f"^{re.escape(label)}:")).wait_for(timeout=RUN_TIMEOUT_MS)
    page.locator(".js-plotly-plot .scatterlayer .trace").first.wait_for(state="attached", timeout=RUN_TIMEOUT_MS)
    return page.locator(".hlm-stats .card").first.locator(".value").inner_text()


def set_number(page: Page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")


def test_generate_change_knobs_and_run_again(browser, url, tmp_path):
    out = shots(tmp_path)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url)
    page.get_by_label("Prompt").fill(PROMPT)
    first = generate(page, DEFAULT_LABEL)
    assert re.fullmatch(r"\d+\.\d%", first)
    # the page decodes greedily by default, so the BERTScore card also counts the LLM's answer kept verbatim
    assert re.search(r"faithful prefix \d+ of \d+ tokens", page.locator(".hlm-stats").inner_text())
    token = page.locator(".prose.hlm-tokens .tok").first
    assert "uploaded" in token.get_attribute("title")  # the hover details are there
    assert page.locator(".hlm-legend .item").count() == 5
    page.evaluate("window.scrollTo(0, 0)")  # the shot shows the page's header, whatever kept focus during the run
    page.screenshot(path=str(out / "dashboard-1280.png"))

    set_number(page, "hlm-k", "32")
    set_number(page, "hlm-gamma", "0")
    generate(page, "ours k=32 γ=0")  # the knobs reach the run (its label names them)
    page.get_by_text("Advanced settings").click()
    page.locator("#hlm-policy input").click()
    page.get_by_role("option", name="hlm", exact=True).click()
    third = generate(page, "hlm")
    assert third == "100.0%" and third != first  # hlm uploads every token; ours did not
    page.screenshot(path=str(out / "dashboard-1280-full.png"), full_page=True)  # three points in the history
    page.close()


def test_phone_width_screenshot(browser, url, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                            has_touch=True)
    page.goto(url)
    page.get_by_label("Prompt").fill(PROMPT)
    generate(page, DEFAULT_LABEL)
    out = shots(tmp_path)
    page.screenshot(path=str(out / "dashboard-390-top.png"))
    page.locator(".hlm-stats").evaluate("e => e.scrollIntoView({block: 'start'})")  # the results, top of screen
    page.screenshot(path=str(out / "dashboard-390.png"))
    page.close()


def test_compare_fills_the_table(browser, url, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url)
    page.get_by_label("Prompt").fill(PROMPT)
    page.get_by_role("button", name="Compare", exact=True).click()
    page.locator(".hlm-compare-summary.done").wait_for(timeout=4 * RUN_TIMEOUT_MS)
    assert page.locator(".hlm-compare-summary tbody tr").count() == 5  # the coin matched to ours included
    assert page.locator(".hlm-compare .col").count() == 5
    assert "a coin sending as many" in page.locator(".hlm-verdict").inner_text()
    page.locator(".hlm-compare").scroll_into_view_if_needed()
    page.screenshot(path=str(shots(tmp_path) / "compare-1280.png"), full_page=True)
    # the comparison ends on ours: its row's upload rate on the card, its tokens on the charts
    ours = page.locator(".hlm-compare-summary tbody tr.ours td")
    ours_tokens, ours_rate = int(ours.nth(1).inner_text()), ours.nth(2).inner_text()
    assert page.locator(".hlm-stats .card").first.locator(".value").inner_text() == ours_rate
    assert page.locator(".hlm-status.done").inner_text().startswith(f"{DEFAULT_LABEL}:")
    # the live charts were drawn while their tab was hidden: back on Output they fit their boxes again
    page.get_by_role("tab", name="Output").click()
    page.wait_for_function(fitted(), timeout=5_000)
    # ... and end at ours' final token (they were cut off half way once)
    drawn = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')].filter(e => e.data.length)"
                          ".map(e => Math.max(...e.data.flatMap(t => t.x || []).filter(v => v !== null)))")
    assert drawn[:2] == [ours_tokens, ours_tokens]  # the energy and upload-rate charts
    page.close()


def test_length_limit_clamping_and_errors_are_said(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url)
    page.get_by_role("button", name="Generate", exact=True).click()  # no prompt: a titled message with its text
    toast = page.get_by_test_id("toast-text")
    toast.wait_for(timeout=10_000)
    assert toast.inner_text().startswith("Cannot run. the prompt is empty")
    page.get_by_test_id("toast-close").click()
    set_number(page, "hlm-k", "999")
    assert page.locator("#hlm-k .hlm-clamp").inner_text() == "999 is outside 1–32, so 32 is used"
    set_number(page, "hlm-k", "0")
    assert page.locator("#hlm-k .hlm-clamp").inner_text() == "0 is outside 1–32, so 1 is used"
    set_number(page, "hlm-k", str(Settings.k))
    assert page.locator("#hlm-k .hlm-clamp").count() == 0
    page.get_by_text("Advanced settings").click()
    set_number(page, "hlm-max-new-tokens", "8")
    page.get_by_label("Prompt").fill(PROMPT)
    generate(page, DEFAULT_LABEL)
    status = page.locator(".hlm-status").inner_text()
    assert "8 tokens decoded" not in status or "stopped at the 8-token limit" in status
    page.close()


def test_token_details_open_on_tap_and_keyboard(browser, url):
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.goto(url)
    page.get_by_label("Prompt").fill(PROMPT)
    generate(page, DEFAULT_LABEL)
    visible = page.locator(".prose.hlm-tokens .tok[data-i]").filter(has_text=re.compile(r"\S"))
    first, second = visible.nth(0), visible.nth(1)
    first.focus()
    page.keyboard.press("Enter")
    panel = page.locator(".hlm-token-panel")
    assert panel.locator(".head").inner_text().startswith(f"#{first.get_attribute('data-i')} ")
    assert "device energy" in panel.inner_text() and "uploaded" in panel.inner_text()
    page.keyboard.press("Escape")
    assert panel.count() == 0
    assert page.evaluate("document.activeElement.dataset.i") == first.get_attribute("data-i")
    second.tap()
    assert panel.locator(".head").inner_text().startswith(f"#{second.get_attribute('data-i')} ")
    page.close()


def test_show_me_states_the_comparison_in_one_sentence(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url)
    page.get_by_role("button", name="Show me", exact=True).click()  # no prompt typed: the first example runs
    said = page.locator(".hlm-verdict")
    said.wait_for(timeout=3 * RUN_TIMEOUT_MS)
    assert re.fullmatch(r"On this prompt ours sent [\d.]+% of its tokens to the cloud, used [\d.]+% (less|more) "
                        r"link energy \(radio and waiting for the cloud\) than HLM and kept the LLM's answer token "
                        r"for token for [\d.]+% of its length \(BERTScore F1 [\d.]+; HLM 100.0%, 1.000\); a coin "
                        r"sending as many \([\d.]+%\) kept [\d.]+% \([\d.]+\)\.",  # greedy, the page's default
                        said.inner_text())
    assert page.get_by_label("Prompt").input_value().strip()
    page.close()


def test_what_if_replay_answers_a_slider_move_without_a_run(browser, url):
    """The replay is drawn (outline and chart) and no run starts. Its latency is printed, not asserted: the 200 ms
    target is `scripts/page_timing.py`'s to check on the embedded pair (a busy machine's pause fails a timed test)."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url)
    page.get_by_label("Prompt").fill(PROMPT)
    generate(page, DEFAULT_LABEL)
    tokens = page.locator(".prose.hlm-tokens .tok").count()
    print(f"what-if replay: {replay_ms(page):.0f} ms from the slider move to the outline and the chart")
    assert f"what-if replay at k={REPLAY_K}" in page.locator(".hlm-status").inner_text()
    assert page.locator(".hlm-status.replay").count() == 1  # no run started: the status is the replay's
    assert page.locator(".prose.hlm-tokens .tok").count() == tokens  # the same drafts, re-decided
    page.close()


def test_evidence_tab_shows_the_capture_curve(browser, url, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url)
    page.get_by_role("tab", name="Evidence").click()
    page.locator("#hlm-capture .js-plotly-plot .scatterlayer .trace").first.wait_for(state="attached",
                                                                                     timeout=10_000)
    names = page.evaluate("() => document.querySelector('#hlm-capture .js-plotly-plot').data.map(t => t.name)")
    for rule in ("ours: ", "uncertainty alone", "paper-literal", "coin", "oracle"):
        assert any(n.startswith(rule) for n in names), (rule, names)
    page.wait_for_function(fitted("#hlm-evidence"), timeout=5_000)  # laid out in its own tab, at its own width
    text = page.locator("body").inner_text()
    assert "End to end against the matched coin" in text and "HumanEval pass@1" in text
    assert "python -m hlm study --prompts" in text  # each result says how it was made
    page.screenshot(path=str(shots(tmp_path) / "evidence-1280.png"), full_page=True)
    page.close()
