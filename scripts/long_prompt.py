"""A prompt at the page's limit (99,000 characters): how soon the first token shows, the process's peak memory, and
how fast Stop ends a run in each model's prefill. Issue 19's long-prompt targets: first token <= 5 minutes, peak
RSS <= 10 GB, Stop <= 1 s.

    python scripts/long_prompt.py --models embedded            # about 20-30 minutes on 2 cores

The prompt is a synthetic build log (a line per build step, in words, with a few warnings and one error near the
start) under a question about it. Three runs in one process holding both models, as the app does:
1. `ours` (the page's defaults, `--tokens` new tokens): seconds until the device has read the prompt, until the first
   draft is shown (pending), until the first decided token, and to the end;
2. `ours` again, Stopped `--stop-after-s` into the device's prefill: seconds from Stop until the run has ended;
3. `llm` (the cloud alone), Stopped `--stop-after-s` after the cloud began reading the prompt: the same.
Then the peak RSS (`VmHWM` from /proc). Each figure is printed beside its target with "met" or "missed by".
Timings: run it alone on the machine (two torch jobs at once each run several times slower).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hlm.config import MAX_PROMPT_CHARS  # noqa: E402
from hlm.dashboard.settings import Settings  # noqa: E402
from hlm.events import PendingDraft  # noqa: E402
from hlm.policies import with_role  # noqa: E402
from hlm.session import open_decoder  # noqa: E402

QUESTION = "\n\nWhich file failed to compile in the build log above, and why? Answer in one sentence."
FIRST_TOKEN_S, RSS_GB, STOP_S = 300.0, 10.0, 1.0


PARTS = ("network", "storage", "parser", "render", "audio", "cache", "scheduler", "logging", "crypto", "index")
STEPS = ("compiling", "linking", "checking", "packaging", "testing")


def build_log(chars: int) -> str:
    """A build log of about `chars` characters (the question included), in words rather than numbers (about four
    characters a token, like prose): one line per step, a warning now and then, one error early on."""
    lines, i, size, budget = [], 0, 0, chars - len(QUESTION)
    while size < budget:
        part, step = PARTS[i % len(PARTS)], STEPS[(i // len(PARTS)) % len(STEPS)]
        line = f"step {i}: {step} the {part} library, source file {part} helpers part {i % 7}, finished cleanly"
        if i % 37 == 5:
            line += f"\nwarning: the {part} library declares a variable that is never used"
        if i == 50:
            line += "\nerror: the storage library refers to a field named capacity that the pool type does not have"
        lines.append(line)
        size += len(line) + 1
        i += 1
    return "\n".join(lines)[:budget] + QUESTION


def vm(field: str) -> float:
    """A /proc/self/status field in GB (10^9 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def verdict(value: float, limit: float) -> str:
    return "met" if value <= limit else f"missed by {value - limit:.1f}"


def timed_run(decoder, prompt: str, config, stop_after_s: float | None = None, cloud: bool = False) -> dict:
    """One run; the moments that matter in seconds from its start. With `stop_after_s`, Stop is pressed that long
    into the device's prefill (or, `cloud`, after the cloud began reading) and the seconds until the run ends are
    returned as `stop_s`."""
    cancel, marks, start = threading.Event(), {}, time.monotonic()
    timer: threading.Timer | None = None

    def stop() -> None:
        marks["stop_pressed"] = time.monotonic() - start
        cancel.set()

    def progress(who: str, done: int, total: int) -> None:
        nonlocal timer
        now = time.monotonic() - start
        if who == "device":
            marks.setdefault("device_prefill_begun", now)
            if done == total:
                marks["device_prefill_s"] = now
        else:
            marks.setdefault("cloud_prefill_begun", now)
        if stop_after_s is not None and timer is None and (who == "cloud") == cloud:
            timer = threading.Timer(stop_after_s, stop)
            timer.start()

    first_text = ""
    for event in decoder.generate(prompt, config, cancel, progress=progress, drafts=True):
        now = time.monotonic() - start
        if isinstance(event, PendingDraft):
            marks.setdefault("first_draft_shown_s", now)
        else:
            marks.setdefault("first_shown_s", now)
            marks.setdefault("first_token_s", now)
            first_text += event.text
    marks["end_s"] = time.monotonic() - start
    if timer is not None:
        timer.cancel()
    if "stop_pressed" in marks:
        marks["stop_s"] = marks["end_s"] - marks["stop_pressed"]
    marks["text"] = first_text
    return marks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="embedded")
    ap.add_argument("--chars", type=int, default=99_000)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--stop-after-s", type=float, default=10.0)
    args = ap.parse_args(argv)
    if args.chars > MAX_PROMPT_CHARS:
        ap.error(f"--chars is at most the page's limit, {MAX_PROMPT_CHARS:,}")
    decoder = open_decoder(args.models)
    prompt = build_log(args.chars)
    settings = Settings(max_new_tokens=args.tokens)
    ours = settings.run_config(decoder.pair.calibration)
    llm = ours.with_policy(name=with_role("reference"))
    print(f"prompt: {len(prompt):,} characters, {len(decoder.pair.encode_prompt(prompt, args.tokens)):,} tokens; "
          f"draft {decoder.pair.quant.get('draft')}, verifier {decoder.pair.quant.get('verifier')}", flush=True)
    full = timed_run(decoder, prompt, ours)
    print(f"ours, {args.tokens} tokens: device read the prompt in {full.get('device_prefill_s', float('nan')):.1f} s; "
          f"first draft shown (pending) {full.get('first_draft_shown_s', float('nan')):.1f} s; first decided token "
          f"{full.get('first_token_s', float('nan')):.1f} s; end {full['end_s']:.1f} s; answer {full['text']!r}",
          flush=True)
    shown = min(full.get("first_draft_shown_s", float("inf")), full.get("first_token_s", float("inf")))
    device_stop = timed_run(decoder, prompt, ours, args.stop_after_s)
    cloud_stop = timed_run(decoder, prompt, llm, args.stop_after_s, cloud=True)
    rss, hwm = vm("VmRSS"), vm("VmHWM")
    rows = [("first token shown (a pending draft or a decided token)", shown, FIRST_TOKEN_S, "s"),
            ("first decided token", full.get("first_token_s", float("inf")), FIRST_TOKEN_S, "s"),
            (f"Stop {args.stop_after_s:.0f} s into the device's prefill: until the run ended",
             device_stop.get("stop_s", float("inf")), STOP_S, "s"),
            (f"Stop {args.stop_after_s:.0f} s into the cloud's prefill (`llm`): until the run ended",
             cloud_stop.get("stop_s", float("inf")), STOP_S, "s"),
            ("peak RSS of the process (VmHWM)", hwm, RSS_GB, "GB")]
    for name, value, limit, unit in rows:
        if value == float("inf"):
            print(f"{name}: none (the run ended before it; a shorter --stop-after-s)")
        else:
            print(f"{name}: {value:.3f} {unit} (target <= {limit:g} {unit}: {verdict(value, limit)})")
    print(f"RSS now {rss:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
