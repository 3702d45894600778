"""The page's own figures (issue 19), timed in a real browser: one headless Chromium (Debian's `chromium`, driven by
Playwright as `scripts/visitors.py` drives it) with the page's defaults, on the page's first example prompt.

    GRADIO_SERVER_PORT=7862 python app.py --models embedded &
    python scripts/page_timing.py --url http://127.0.0.1:7862 --pid $!

Each action runs on a fresh page load: click the first example (as a visitor would; `--prompt` types another
text), press the button, and time in the page's own clock, from the click event to the first animation frame that
shows each state:

- Generate (`--runs` times): the first token shown (a pending draft, dashed), the first coloured token (a decided
  one), the decode done (the last frame that added a token) and every card final (the status line is `done`, which
  `Dashboard._decode` sets only after `judge`, and the BERTScore card shows its F1 and the faithful prefix);
- the what-if replay, on each Generate run's page once it is final: from the input event that types k = `REPLAY_K`
  to the first frame with the replay's outline on the tokens and its line on the chart (no model runs; the page
  asks the app for the redraw without the queue);
- Show me, then Compare: the final frame (the one-sentence verdict is out, which needs every run scored, and the
  cards are back on ours, which only the comparison's last frame does). A comparison shows a run already made with
  the same prompt and settings again instead of decoding it (`Dashboard._shown_again`), and the app's start-up build
  makes every run Compare shows on each example at the page's settings (`Dashboard.prepare_examples`). So both are
  timed again on prompts of the script's own (`NEW_PROMPTS`, typed), where nothing was made before: Show me then
  decodes HLM (whose tokens are the LLM's greedy answer), ours and the coin, Compare the LLM alone and all four;
- the app's RSS (VmRSS) and peak (VmHWM) from /proc after the Compare (GB: 10^9 bytes; MiB printed too).

Before the first click it waits until the app's start-up build of the examples' LLM references and compared runs
is over (`/status`: `examples_building`), so the first run meets the page as a visitor would, and says whether the
prompt's reference was among those built (`example_references_ready`). Prints each figure beside its target ("met" or
"missed by"); the targets are checked here, by a benchmark, not asserted anywhere. Exits 1 only when a state never
came (an error on the page, a timeout); `--json OUT` writes the figures. `--max-new-tokens` shortens every run for a
quick check (the test's, on the tiny pair); the start-up references, made at the page's settings, then do not apply.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from visitors import ARGS, CHROMIUM, POLL_S, connect, set_max_new_tokens

TOKENS = ".prose.hlm-tokens .tok"
DECIDED = f"{TOKENS}[data-i]"  # a pending draft has no index: it is not a decided (coloured) token yet
FAILED = ("document.querySelector('[data-testid=\"toast-text\"]') !== null"  # an error message
          " || document.querySelector('.hlm-status.stopped') !== null")
# Every card final: the status line is `done` (set after the run is judged) and the BERTScore card has its F1 and,
# greedy, the faithful prefix (at T > 0: the band of the LLM's samples); `render.quality_note` writes that line
CARDS_FINAL = """document.querySelector('.hlm-status.done') !== null && (() => {
    const card = [...document.querySelectorAll('.hlm-stats .card')].find(c => c.querySelector('.name')?.innerText
                                                                          === 'BERTScore');
    return card !== undefined && /^\\d/.test(card.querySelector('.value').innerText)
        && /faithful prefix \\d+ of \\d+|mean F1 vs \\d+ LLM samples/.test(card.querySelector('.sub').innerText);
})()"""
# A comparison's final frame: the verdict (every run done and scored) and the cards back on ours (the subject's
# row is marked `ours` in the table); before that last frame the cards follow the run in progress, the coin last
COMPARISON_FINAL = """document.querySelector('.hlm-verdict') !== null
    && document.querySelector('.hlm-compare-summary.done') !== null && (() => {
    const ours = document.querySelector('.hlm-compare-summary tbody tr.ours td')?.innerText;
    const status = document.querySelector('.hlm-status.done')?.innerText;
    return ours !== undefined && status !== undefined && status.startsWith(ours + ':');
})()"""
GB = 1e9  # the RSS target's unit, decimal; MiB beside it
# Prompts of the script's own for the comparisons where nothing was made before: none of the page's examples (whose
# runs the app's start-up build makes), nor each other
NEW_PROMPTS = ("Write a Python function that returns True when a string is a palindrome, ignoring case and spaces.",
               "Write a Python function that counts the vowels in a string and returns the count.")
REPLAY_K = 32  # the what-if replay's k: another bar than the page's default, so the outline changes
# The what-if replay drawn: a draft outlined as one k = REPLAY_K would upload, and the replay's line on the chart
# (plotly sets a chart's data after its last DOM change, so the data is read, not the DOM)
REPLAYED = f"""() => document.querySelector('.prose.hlm-tokens .would-upload') !== null
    && [...document.querySelectorAll('.js-plotly-plot')].some(p => (p.data || []).some(
        d => String(d.name).startsWith('replay k={REPLAY_K}')))"""


@dataclass(frozen=True)
class Row:
    """A printed figure: its name, its target (None: shown for context) and unit."""

    name: str
    limit: float | None
    unit: str  # "s", "ms" or "GB"


ROWS = {"first_run_token_s": Row("Generate run 1: first coloured token", 1.0, "s"),
        "first_token_s": Row("Generate: first coloured token", 1.0, "s"),
        "first_shown_s": Row("Generate: first token shown (a pending draft)", None, "s"),
        "decoded_s": Row("Generate: decode done (last token shown)", None, "s"),
        "cards_final_s": Row("Generate: every card final", 25.0, "s"),
        "replay_ms": Row(f"What-if replay: k={REPLAY_K} to outline and chart", 200.0, "ms"),
        "show_me_s": Row("Show me on the prompt (runs made before)", 45.0, "s"),
        "compare_s": Row("Compare on the prompt (runs made before)", 60.0, "s"),
        "show_me_cold_s": Row("Show me, a new prompt (nothing made before)", 45.0, "s"),
        "compare_cold_s": Row("Compare, a new prompt (nothing made before)", 60.0, "s"),
        "rss_gb": Row("app RSS after Compare (VmRSS)", 4.0, "GB"),
        "hwm_gb": Row("app peak RSS (VmHWM)", None, "GB")}
GENERATE_MARKS = {"first_token_s": "first_token", "first_shown_s": "first_shown", "decoded_s": "decoded",
                  "cards_final_s": "final", "replay_ms": "replay_ms"}  # a row: the median over the runs of this mark


@dataclass
class Figures:
    """What one session of the script measured and where the prompt's reference came from (`--json` writes it)."""

    url: str
    prompt: str = ""
    example: str | None = None  # the example's label when one was clicked
    reference: str = ""  # where the prompt's greedy reference came from, in words
    generate: list[dict[str, float]] = field(default_factory=list)  # one per run: the marks, seconds (replay_ms: ms)
    show_me_s: float | None = None
    compare_s: float | None = None
    show_me_cold_s: float | None = None
    compare_cold_s: float | None = None
    rss_gb: float | None = None
    hwm_gb: float | None = None
    problems: list[str] = field(default_factory=list)

    def median(self, mark: str) -> float | None:
        values = [run[mark] for run in self.generate if mark in run]
        return statistics.median(values) if values else None

    def rows(self) -> dict[str, float | None]:
        """Every `ROWS` figure (Generate's: the median over the runs). The first run has a row of its own: the models
        remember a prompt they read (`hlm.prefix.read`), so later runs of the same prompt start sooner."""
        generate = {key: self.median(mark) for key, mark in GENERATE_MARKS.items()}
        generate["first_run_token_s"] = self.generate[0].get("first_token") if self.generate else None
        return {key: generate[key] if key in generate else getattr(self, key) for key in ROWS}


def watch(marks: dict[str, str]) -> str:
    """In-page script for a button: from its click, every animation frame records the first time (ms after the
    click) each of `marks` (JS expressions) holds, and when the count of decided tokens last changed ("decoded"),
    until "final" or "failed" holds. The page's clock: no polling delay, no Playwright round trip."""
    checks = ", ".join(f"{json.dumps(name)}: () => ({expr})" for name, expr in {**marks, "failed": FAILED}.items())
    return f"""button => {{
        const w = window.hlmTiming = {{t0: null, at: {{}}, tokens: 0}};
        const checks = {{{checks}}};
        button.addEventListener('click', () => {{ w.t0 = performance.now(); }}, {{capture: true, once: true}});
        const tick = () => {{
            if (w.t0 !== null) {{
                const now = performance.now() - w.t0;
                const n = document.querySelectorAll('{DECIDED}').length;
                if (n !== w.tokens) {{ w.tokens = n; w.at.decoded = now; }}
                for (const [name, holds] of Object.entries(checks)) if (!(name in w.at) && holds()) w.at[name] = now;
            }}
            if (!('final' in w.at) && !('failed' in w.at)) requestAnimationFrame(tick);
        }};
        requestAnimationFrame(tick);
    }}"""


# A typed prompt is left this long before the click, as a visitor takes to type it: a click within milliseconds of
# the page's load waited ~0.7 s for the page's own start (a remembered prompt's first token 0.87 s, 0.16 s after this)
TYPING_S = 1.5


def fill_prompt(page: Any, prompt: str | None, example: int = 0) -> tuple[str, str | None]:
    """The page's example number `example` (from 0) clicked (`prompt` None) or `prompt` typed; (the prompt in the
    box, the example's label)."""
    box = page.get_by_label("Prompt")
    if prompt is not None:
        box.fill(prompt)
        time.sleep(TYPING_S)
        return prompt, None
    button = page.locator("button.gallery-item").nth(example)  # the first (0) is also what Show me runs on its own
    label = button.inner_text().strip()
    button.click()
    deadline = time.monotonic() + 30
    while not box.input_value().strip() and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return box.input_value(), label


@dataclass(frozen=True)
class Visit:
    """What every action's fresh page gets: the app, the prompt (None: the example numbered `example`, from 0), Max
    new tokens (None: the page's) and how long an action may take."""

    url: str
    prompt: str | None
    max_new_tokens: int | None
    timeout_s: float
    example: int = 0


def replay_ms(page: Any) -> float:
    """On a page whose run of ours is final: milliseconds, in the page's clock, from the input event that types
    k = REPLAY_K (the event the page's replay answers) to the first animation frame with the replay drawn."""
    page.evaluate(f"""() => {{
        const w = window.hlmReplay = {{typed: null, drawn: null}};
        document.querySelector('#hlm-k input[type=number]').addEventListener('input', () => {{
            if (w.typed === null) w.typed = performance.now(); }}, true);
        const check = () => {{
            if (w.typed !== null && ({REPLAYED})()) w.drawn = performance.now();
            else requestAnimationFrame(check);
        }};
        requestAnimationFrame(check);
    }}""")
    page.locator("#hlm-k input[type=number]").fill(str(REPLAY_K))
    page.wait_for_function("() => window.hlmReplay.drawn !== null", timeout=10_000)
    return page.evaluate("window.hlmReplay.drawn - window.hlmReplay.typed")


def timed(browser: Any, visit: Visit, button: str, marks: dict[str, str],
          then: Callable[[Any], dict[str, float]] | None = None) -> tuple[dict[str, float], str, str | None]:
    """One action on a fresh page load: the marks' seconds after the click (with "decoded", and what `then` measures
    on the page once it is final), the prompt and the example's label. Raises RuntimeError when the page shows an
    error or "final" never comes."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(visit.url)
        text, label = fill_prompt(page, visit.prompt, visit.example)
        if visit.max_new_tokens is not None:
            set_max_new_tokens(page, visit.max_new_tokens)
        target = page.get_by_role("button", name=button, exact=True)
        target.evaluate(watch(marks))
        target.click()
        page.wait_for_function("() => 'final' in window.hlmTiming.at || 'failed' in window.hlmTiming.at",
                               timeout=visit.timeout_s * 1000, polling=POLL_S * 1000)
        at = page.evaluate("window.hlmTiming.at")
        if "failed" in at:
            said = page.locator('[data-testid="toast-text"], .hlm-status').first.inner_text()
            raise RuntimeError(f"{button}: the page said {said[:200]!r}")
        after = then(page) if then is not None else {}
        return {**{name: ms / 1000 for name, ms in at.items()}, **after}, text, label
    finally:
        page.close()


def references(url: str, wait_s: float) -> tuple[list[str] | None, bool]:
    """Wait (up to `wait_s`) until the app answers and its start-up build of the examples' references is over; (the
    prompts whose reference it prepared, None when the app does not say; whether it was still building when the
    wait ended)."""
    deadline = time.monotonic() + wait_s
    client = connect(url, wait_s)
    while True:
        status = client.predict(api_name="/status")
        if "example_references_ready" not in status:
            return None, False
        building = bool(status["examples_building"])
        if not building or time.monotonic() > deadline:
            return list(status["example_references_ready"]), building
        time.sleep(2.0)


def proc_status(pid: int) -> dict[str, int]:
    """The numeric fields of /proc/PID/status: sizes (VmRSS, VmHWM, RssFile, ...) in bytes, counts (Threads) as
    they are."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    out = {}
    for key, value in fields.items():
        words = value.split()
        if words and words[0].isdigit():
            out[key] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    return out


def memory(pid: int) -> tuple[int, int]:
    """The process's resident set and its peak (VmRSS, VmHWM), in bytes."""
    status = proc_status(pid)
    return status["VmRSS"], status["VmHWM"]


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def verdict(value: float | None, row: Row) -> str:
    if row.limit is None:
        return ""
    if value is None:
        return "not measured"
    return "met" if value <= row.limit else f"missed by {value - row.limit:.2f} {row.unit}"


def table(f: Figures) -> list[str]:
    """The figures beside their targets, "met" or "missed by" (Generate: the median over the runs)."""
    n = len(f.generate)
    out = [f"{'figure' + (f' (Generate: median of {n})' if n > 1 else ''):<50} {'measured':>10}  {'target':<10} "
           "verdict"]
    for key, value in f.rows().items():
        row = ROWS[key]
        measured = "-" if value is None else f"{value:.2f} {row.unit}"
        bound = "-" if row.limit is None else f"<= {row.limit:g} {row.unit}"
        out.append(f"{row.name:<50} {measured:>10}  {bound:<10} {verdict(value, row)}".rstrip())
    return out


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="a running dashboard, e.g. http://127.0.0.1:7862")
    ap.add_argument("--pid", type=int, default=None, help="the app's process id (its RSS after the Compare)")
    ap.add_argument("--runs", type=int, default=1, help="Generate runs, each on a fresh page load")
    ap.add_argument("--prompt", default=None, help="type this prompt instead of clicking the first example")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="set Max new tokens (default: the page's); shorter runs for a quick check, and then the "
                         "start-up build's references (made at the page's settings) do not apply")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per action")
    ap.add_argument("--wait-references-s", type=float, default=1800.0,
                    help="how long to wait for the app's start-up build of the examples' references")
    args = ap.parse_args(argv)
    f, visit = Figures(args.url), Visit(args.url, args.prompt, args.max_new_tokens, args.timeout_s)
    ready, building = references(args.url, args.wait_references_s)
    generate_marks = {"first_shown": f"document.querySelector('{TOKENS}') !== null",
                      "first_token": f"document.querySelector('{DECIDED}') !== null", "final": CARDS_FINAL}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for run in range(args.runs):
                marks, f.prompt, f.example = timed(browser, visit, "Generate", generate_marks,
                                                   then=lambda page: {"replay_ms": replay_ms(page)})
                f.generate.append(marks)
                print(f"Generate run {run + 1}: first token shown {seconds(marks.get('first_shown'))}, first "
                      f"coloured {seconds(marks.get('first_token'))}, decode done {seconds(marks.get('decoded'))}, "
                      f"every card final {seconds(marks['final'])}; what-if replay {marks['replay_ms']:.0f} ms",
                      flush=True)
            f.show_me_s = timed(browser, visit, "Show me", {"final": COMPARISON_FINAL})[0]["final"]
            print(f"Show me: final {seconds(f.show_me_s)}", flush=True)
            f.compare_s = timed(browser, visit, "Compare", {"final": COMPARISON_FINAL})[0]["final"]
            print(f"Compare: final {seconds(f.compare_s)}", flush=True)
            f.show_me_cold_s = timed(browser, replace(visit, prompt=NEW_PROMPTS[0]), "Show me",
                                     {"final": COMPARISON_FINAL})[0]["final"]
            print(f"Show me on a new prompt: final {seconds(f.show_me_cold_s)}", flush=True)
            f.compare_cold_s = timed(browser, replace(visit, prompt=NEW_PROMPTS[1]), "Compare",
                                     {"final": COMPARISON_FINAL})[0]["final"]
            print(f"Compare on another new prompt: final {seconds(f.compare_cold_s)}", flush=True)
        except (RuntimeError, PlaywrightError) as exc:  # a state that never came: reported, the rest still printed
            f.problems.append(str(exc).splitlines()[0])
        finally:
            browser.close()
    if args.pid is not None:
        rss, hwm = memory(args.pid)
        f.rss_gb, f.hwm_gb = rss / GB, hwm / GB
        print(f"app RSS after Compare: {rss / 2**20:,.0f} MiB (VmRSS), peak {hwm / 2**20:,.0f} MiB (VmHWM)")
    f.reference = reference_source(f.prompt, ready, building, args.runs, args.max_new_tokens is None)
    example = f' (the first example, "{f.example}", clicked)' if f.example else " (typed)"
    print(f"\npage timing at {args.url} on {f.prompt!r}{example}")
    print(f"greedy reference: {f.reference}")
    if f.show_me_s is not None:
        print("Show me and Compare take that run as their reference (Generate decoded it where nothing had; a stored "
              "answer has no figures, so Compare decodes the LLM alone again for them); they show again the runs "
              "made before with the same prompt and settings (Generate's ours, on an example the start-up build's "
              "runs, else Show me's); on the new prompts every run is decoded (Show me takes HLM's tokens as the "
              "LLM's answer; Compare decodes the LLM alone first)")
    print("\n".join(table(f)))
    for problem in f.problems:
        print(f"PROBLEM: {problem}")
    if args.json:
        out = {**asdict(f), "figures": f.rows(), "rows": {key: asdict(row) for key, row in ROWS.items()}}
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 1 if f.problems else 0


def reference_source(prompt: str, ready: list[str] | None, building: bool, runs: int, page_settings: bool) -> str:
    """Where Generate's first run got the prompt's greedy reference (the quality figures), from what /status said
    before the first click (the build makes them at the page's settings only)."""
    later = "; later runs reuse it from memory" if runs > 1 else ""
    if ready is None:
        return "unknown (this app's /status does not report its example references)"
    if not page_settings:
        return f"decoded after the first run (--max-new-tokens: not the settings the start-up build used){later}"
    if prompt in ready:
        return f"precomputed by the app's start-up build (/status example_references_ready){later}"
    why = "the start-up build was still running when the wait ended" if building else \
        "not among the references the app's start-up build prepared"
    return f"decoded after the first run ({why}){later}"


if __name__ == "__main__":
    sys.exit(main())
