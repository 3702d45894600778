"""Several visitors at once on a running dashboard, each in its own headless Chromium (Debian's `chromium`) driven by
Playwright: what a public Space meets when people press Generate, Compare, Show me and Stop together.

    python app.py --models embedded &                        # or any running app (HLM_QUEUE_MAX caps its queue)
    python scripts/visitors.py --url http://127.0.0.1:7860 --visitors 3 --actions 5 --max-new-tokens 32

Each visitor asks for its own word ("Reply with the single word APPLE."...) and runs a shuffled mix of Generate,
Compare, Show me and Generate-then-Stop. Checked, per action: it ends done, or stopped by that visitor's own Stop
(a Stop pressed while queued cancels it before it starts), trying again when the page says the app is busy
(the queue's cap refused it); a visitor that had to wait saw its queue position; and
(on a real pair, `--words`) no visitor's output shows another visitor's word. Then one visitor closes its tab in
the middle of a Compare, and the time until the app holds no running request is measured. Prints one line per
action and a summary; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
WORDS = ("APPLE", "BANANA", "CHERRY", "DAMSON", "ELDER", "FIG")
ACTIONS = ("Generate", "Compare", "Show me", "Stop")
QUEUE = re.compile(r"queue: (\d+)/(\d+)")
BUSY = "currently busy"  # Gradio's toast for a request refused by the queue's cap ("... Please try again.")
RETRY_S = 1.0
POLL_S = 0.1


@dataclass
class Outcome:
    visitor: int
    action: str
    phase: str = "timeout"  # done | stopped | cancelled-in-queue | timeout
    seconds: float = 0.0
    waited: bool = False  # the visitor's request sat in the queue behind others
    saw_queue: str = ""  # the first queue position the page showed, e.g. "queue: 2/3"
    refused: int = 0  # times the page said the app was busy (the queue's cap), after which the visitor tried again
    output: str = ""
    problems: list[str] = field(default_factory=list)


def connect(url: str, wait_s: float = 600.0) -> Any:
    """A `gradio_client.Client` of the app at `url`, waiting up to `wait_s` for it: an app just started (`python
    app.py &`) refuses connections while it loads its models."""
    import httpx
    from gradio_client import Client

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return Client(url, verbose=False)
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def status(page: Any) -> tuple[str, str]:
    """The page's status line: (phase class, text); the phase is 'cleared' until the action's first frame."""
    return page.evaluate("() => { const e = document.querySelector('.hlm-status');"
                         " return e ? [e.className.replace('hlm-status', '').trim(), e.innerText] : ['', ''] }")


def clear_status(page: Any) -> None:
    """Mark the status line and the Compare table so the action's first frame and its end (which replace them)
    are seen, however fast the run is."""
    page.evaluate("() => { const e = document.querySelector('.hlm-status');"
                  " if (e) { e.className = 'hlm-status cleared'; e.innerText = '' }"
                  " document.querySelectorAll('.hlm-compare-summary').forEach(t => t.classList.remove('done')) }")


def finished(page: Any, action: str) -> str | None:
    """'done' or 'stopped' once the action has ended: a single run by its status line, Compare and Show me by their
    table (every run in it ended)."""
    phase, line = status(page)
    if action in ("Compare", "Show me"):
        if page.locator(".hlm-compare-summary.done").count():
            return "stopped" if phase == "stopped" else "done"
        return None
    return phase if phase in ("done", "stopped") and line else None


def set_max_new_tokens(page: Any, n: int) -> None:
    """Open "Advanced settings" and type `n` into Max new tokens (shorter runs than the page's default)."""
    page.locator("#hlm-advanced").click()
    box = page.locator("#hlm-max-new-tokens input[type=number]")
    box.fill(str(n))
    box.press("Enter")


def busy_toasts(page: Any) -> int:
    return page.get_by_text(BUSY).count()


def act(page: Any, visitor: int, action: str, rng: random.Random, timeout_s: float) -> Outcome:
    """One action on the page until its end, watching for a queue position while it waits. Refused because the
    queue was full (several visitors pressed at once: Gradio counts a request as waiting until its worker takes it),
    the visitor does what the page says: tries again a moment later."""
    out, start = Outcome(visitor, action), time.monotonic()
    clear_status(page)
    button = page.get_by_role("button", name="Generate" if action == "Stop" else action, exact=True)
    busy = busy_toasts(page)
    button.click()
    stopping = action == "Stop"  # pressed once the run has started, or (one time in two) while it is queued
    stop_queued = stopping and rng.random() < 0.5
    stopped_at = 0.0
    while time.monotonic() - start < timeout_s:
        queued = QUEUE.search(page.evaluate("() => document.body.innerText"))
        phase = status(page)[0]
        if queued and phase == "cleared":
            out.waited, out.saw_queue = True, out.saw_queue or queued.group(0)
        if stopping and (phase not in ("", "cleared") or (queued and stop_queued)):
            page.get_by_role("button", name="Stop", exact=True).click()
            stopping, stopped_at = False, time.monotonic()
        ended = finished(page, action)
        if ended:
            out.phase = ended
            break
        if phase == "cleared" and busy_toasts(page) > busy:
            out.refused += 1
            time.sleep(RETRY_S)
            busy = busy_toasts(page)
            button.click()
            continue
        if stopped_at and phase == "cleared" and not queued and time.monotonic() - stopped_at > 3.0:
            out.phase = "cancelled-in-queue"  # Stop removed it from the queue: no frame ever came
            break
        time.sleep(POLL_S)
    out.seconds = time.monotonic() - start
    out.output = " | ".join(page.locator(".hlm-tokens, .hlm-col-tokens").all_inner_texts())
    return out


def visit(url: str, visitor: int, actions: list[str], max_new_tokens: int, seed: int, timeout_s: float,
          results: list[Outcome], ready: threading.Barrier) -> None:
    """One visitor: its own browser, its own session, its word, its actions in order."""
    from playwright.sync_api import sync_playwright

    rng = random.Random(seed * 100 + visitor)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.goto(url)
        page.get_by_label("Prompt").fill(f"Reply with the single word {WORDS[visitor % len(WORDS)]}.")
        set_max_new_tokens(page, max_new_tokens)
        ready.wait()
        for action in actions:
            results.append(act(page, visitor, action, rng, timeout_s))
            time.sleep(rng.uniform(0.0, 1.0))
        browser.close()


def closed_tab_frees_the_worker(url: str, max_new_tokens: int, timeout_s: float) -> float | None:
    """Seconds from closing a tab in the middle of its Compare until the app runs no request (None: never)."""
    from playwright.sync_api import sync_playwright

    api = connect(url)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context()
        page = context.new_page()
        page.goto(url)
        page.get_by_label("Prompt").fill("Explain in detail how a hash table works.")
        clear_status(page)
        page.get_by_role("button", name="Compare", exact=True).click()
        deadline = time.monotonic() + timeout_s
        while status(page)[0] == "cleared" and time.monotonic() < deadline:
            time.sleep(POLL_S)
        context.close()  # the visitor closes the tab mid-run
        closed = time.monotonic()
        while time.monotonic() - closed < 60:
            if api.predict(api_name="/status")["running_requests"] == 0:
                return time.monotonic() - closed
            time.sleep(POLL_S / 2)
        browser.close()
    return None


def check(outcomes: list[Outcome], words: bool, visitors: int) -> list[str]:
    problems = []
    for o in outcomes:
        if o.phase == "timeout":
            problems.append(f"visitor {o.visitor} {o.action}: did not end")
        elif o.phase in ("stopped", "cancelled-in-queue") and o.action != "Stop":
            problems.append(f"visitor {o.visitor} {o.action}: stopped without pressing Stop")
        if o.waited and not o.saw_queue:
            problems.append(f"visitor {o.visitor} {o.action}: waited without seeing a queue position")
        others = [w for i, w in enumerate(WORDS[:visitors]) if i != o.visitor]
        if words and any(w in o.output.upper() for w in others):
            problems.append(f"visitor {o.visitor} {o.action}: its view shows another visitor's word: {o.output[:80]!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="a running dashboard, e.g. http://127.0.0.1:7860")
    ap.add_argument("--visitors", type=int, default=3)
    ap.add_argument("--actions", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per action")
    ap.add_argument("--words", action="store_true", help="check that no view shows another visitor's word "
                    "(only meaningful on a real pair, which answers with the word it is asked for)")
    args = ap.parse_args(argv)
    plans = []
    for v in range(args.visitors):
        plan = [ACTIONS[i % len(ACTIONS)] for i in range(args.actions)]
        random.Random(args.seed * 100 + v).shuffle(plan)
        plans.append(plan)
    results: list[Outcome] = []
    ready = threading.Barrier(args.visitors)
    threads = [threading.Thread(target=visit, args=(args.url, v, plans[v], args.max_new_tokens, args.seed,
                                                    args.timeout_s, results, ready)) for v in range(args.visitors)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in sorted(results, key=lambda o: o.visitor):  # each visitor's actions in the order it took them
        print(f"visitor {o.visitor} {o.action:<8} {o.phase:<18} {o.seconds:6.1f} s  "
              f"{o.saw_queue or ('waited' if o.waited else '-'):<14} {f'busy x{o.refused}' if o.refused else '-':<8} "
              f"{o.output[:50]!r}")
    freed = closed_tab_frees_the_worker(args.url, args.max_new_tokens, args.timeout_s)
    problems = check(results, args.words, args.visitors)
    if len(results) != args.visitors * args.actions:
        problems.append(f"{len(results)} of {args.visitors * args.actions} actions reported")
    if freed is None:
        problems.append("a closed tab's run never ended")
    waited = [o for o in results if o.waited]
    print(f"{len(results)} actions by {args.visitors} visitors in {time.monotonic() - start:.0f} s: "
          f"{sum(o.phase == 'done' for o in results)} done, "
          f"{sum(o.phase in ('stopped', 'cancelled-in-queue') for o in results)} stopped by their own visitor, "
          f"{len(waited)} waited in the queue ({sum(bool(o.saw_queue) for o in waited)} saw their position), "
          f"{sum(o.refused for o in results)} refusals as busy (retried); "
          f"a closed tab freed the worker in {freed if freed is None else f'{freed:.2f} s'}")
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
