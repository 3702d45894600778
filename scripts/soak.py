"""Hours of use: drive a running dashboard through its API with a mix of Generate, Compare, Stop (a cancelled
stream) and bad input, and watch the process: RSS, threads, open files and the app's own caches (`/status`).

    python app.py --models tiny & python scripts/soak.py --url http://127.0.0.1:7860 --pid $! --runs 2000
    python app.py --models embedded & python scripts/soak.py --url http://127.0.0.1:7860 --pid $! --runs 100

Prints a line every `--every` runs and a verdict: the RSS after the last run within 5 % of the RSS after the
first tenth of the runs (the caches have filled by then), thread and open-file counts (as the process settles:
`sample`) flat from then on (no higher ceiling in the second half of the samples than in the first), and no
error but the bad inputs' own messages. Exits 1 when a criterion fails. Visitors come and go: a new API client (a
new session) every 25 runs (`--visitor-every`).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

PROMPTS = ("Write a Python function that reverses a string.", "What is a hash table?",
           "Explain recursion to a child.", "Merge two sorted lists in Python.", "Say hello.")
BAD = (({"prompt": "   "}, "the prompt is empty"), ({"k": 0}, "k must be"), ({"gamma": -1.0}, "gamma"),
       ({"u_th": 2.0}, "u_th"), ({"policy": "greedy"}, "unknown policy"), ({"pair": "nonexistent"}, "not offered"),
       ({"prompt": "x" * 100_001}, "characters"))
RSS_TOLERANCE = 0.05
SETTLE_READS, SETTLE_S = 5, 0.2
HEARTBEAT_S = 15  # Gradio's default heartbeat interval (GRADIO_HEARTBEAT_INTERVAL)
TCP_STATES = {"01": "established", "06": "time-wait", "08": "close-wait", "0A": "listen"}


@dataclass
class Sample:
    runs: int
    seconds: float
    rss_mib: float
    file_mib: float  # of which pages of mapped files (libraries, weights): clean, bounded by the files' sizes
    threads: int
    caches: dict[str, Any]
    open_files: Counter[str] = field(default_factory=Counter)  # at the reading with the fewest: what each one is

    @property
    def files(self) -> int:
        return self.open_files.total()


def sample(pid: int, runs: int, start: float, client: Any, gone: list[Any]) -> Sample:
    """The process as it settles after a run: threads and open files are the fewest of SETTLE_READS readings
    SETTLE_S apart, since a stopped run's decode thread and a client's connection close a moment after the run
    returns (a leaked thread or file never does, so it still raises the count). First the visitors that left since the
    last sample are let go: a closed gradio_client ends its heartbeat stream, and with it its connection, only at the
    server's next heartbeat (every 15 s), where a closed browser tab drops it at once."""
    from page_timing import proc_status

    while gone:
        gone.pop().heartbeat.join(timeout=HEARTBEAT_S + 5)
    threads, files = [], []
    for i in range(SETTLE_READS):
        time.sleep(SETTLE_S if i else 0.0)
        fields = proc_status(pid)
        threads.append(fields["Threads"])
        files.append(open_files(pid))
    caches = {k: v["size"] for k, v in client.predict(api_name="/status").items() if isinstance(v, dict)
              and "size" in v}
    mib = {k: fields[k] / 2**20 for k in ("VmRSS", "RssFile")}
    return Sample(runs, time.monotonic() - start, mib["VmRSS"], mib["RssFile"], min(threads), caches,
                  min(files, key=lambda c: c.total()))


def open_files(pid: int) -> Counter[str]:
    """What the process has open, by kind: a path, or for a TCP socket its state and local/remote port (so a connection
    that outlives its client can be told from a listening socket or the app's own files)."""
    rows = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            rows += [row.split() for row in list(f)[1:]]
    port = {row[9]: [int(address.rsplit(":", 1)[1], 16) for address in row[1:3]] for row in rows}
    listening = {port[row[9]][0] for row in rows if row[3] == "0A"}
    tcp = {}
    for row in rows:
        (local, remote), state = port[row[9]], TCP_STATES.get(row[3], row[3])
        tcp[row[9]] = (f"tcp listen :{local}" if row[3] == "0A" else f"tcp {state}, a client of :{local}"
                       if local in listening else f"tcp {state} to :{remote}")
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed between listing and reading
            continue
        inode = target[len("socket:["):-1] if target.startswith("socket:[") else None
        kinds[tcp.get(inode, "socket (not TCP)") if inode else re.sub(r":\[\d+\]$", "", target)] += 1
    return kinds


def one_run(client: Any, rng: random.Random, max_new_tokens: int) -> str:
    """One visitor action; returns its kind. Raises on anything but a bad input's own message."""
    from gradio_client.exceptions import AppError

    knobs = {"prompt": rng.choice(PROMPTS), "max_new_tokens": rng.choice((8, max_new_tokens)),
             "k": rng.randint(1, 32), "gamma": rng.choice((0.0, 0.5, 2.0)), "temperature": rng.choice((0.0, 0.7)),
             "seed": rng.randint(0, 10_000)}
    roll = rng.random()
    if roll < 0.10:
        bad, message = rng.choice(BAD)
        try:
            client.predict(**{**knobs, **bad}, api_name="/generate")
        except AppError as exc:
            if message in str(exc) and "Traceback" not in str(exc):
                return "bad input (refused)"
            raise
        raise AssertionError(f"bad input {bad} was accepted")
    if roll < 0.25:
        job = client.submit(**knobs, api_name="/generate")
        time.sleep(rng.uniform(0.0, 0.5))
        job.cancel()  # the visitor's Stop, as an API client has it
        return "stop"
    if roll < 0.40:
        client.predict(**{k: knobs[k] for k in ("prompt", "k", "gamma", "temperature", "seed")}, max_new_tokens=8,
                       api_name="/compare")
        return "compare"
    final = client.predict(**knobs, quality=rng.random() < 0.5, api_name="/generate")
    if final["status"] != "done":
        raise AssertionError(f"a run ended {final['status']}")
    return "generate"


def verdict(first: Sample, samples: list[Sample], errors: list[str]) -> list[str]:
    """RSS: the last sample against `first` (the caches have filled by then). Threads and files: flat means no rising
    maximum, the second half's highest count no higher than the first half's (worker pools grow and shrink with the
    load from sample to sample; a leak raises the ceiling)."""
    last, problems = samples[-1], []
    if last.rss_mib > first.rss_mib * (1 + RSS_TOLERANCE):
        problems.append(f"RSS grew {first.rss_mib:.0f} -> {last.rss_mib:.0f} MiB (> {RSS_TOLERANCE:.0%})")
    half = len(samples) // 2
    for name in ("threads", "files"):
        early, late = (max(getattr(s, name) for s in part) for part in (samples[:max(half, 1)], samples[half:]))
        if late > early:
            problems.append(f"{name} grew: at most {early} in the first half of the samples, {late} in the second")
    problems += [f"unexpected error: {e}" for e in errors]
    return problems


def main(argv: list[str] | None = None) -> int:
    from visitors import connect

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--pid", type=int, required=True, help="the app's process id (its RSS, threads, files)")
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--minutes", type=float, default=None, help="stop after this long instead")
    ap.add_argument("--every", type=int, default=100, help="print a line every this many runs")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--visitor-every", type=int, default=25, help="a new API client (a new session) every N runs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng, start = random.Random(args.seed), time.monotonic()
    client, kinds, errors, gone = connect(args.url), {}, [], []  # waits for an app still loading
    baseline_at = max(1, args.runs // 10)
    first = last = sample(args.pid, 0, start, client, gone)
    samples: list[Sample] = []  # from the first tenth on
    print(f"{'runs':>6} {'s':>7} {'RSS MiB':>8} {'of it file':>10} {'threads':>7} {'files':>5}  caches")
    for n in range(1, args.runs + 1):
        if args.minutes is not None and time.monotonic() - start > args.minutes * 60:
            break
        if n % args.visitor_every == 0:
            client.close()  # the visitor leaves: its heartbeat stream ends (else its connection stays open)
            gone.append(client)
            client = connect(args.url)  # another visitor
        try:
            kind = one_run(client, rng, args.max_new_tokens)
            kinds[kind] = kinds.get(kind, 0) + 1
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
            errors.append(f"run {n}: {type(exc).__name__}: {str(exc)[:200]}")
        if n == baseline_at or n % args.every == 0 or n == args.runs:
            last = sample(args.pid, n, start, client, gone)
            first = last if n == baseline_at else first
            samples += [last] if n >= baseline_at else []
            print(f"{n:>6} {last.seconds:>7.0f} {last.rss_mib:>8.1f} {last.file_mib:>10.1f} {last.threads:>7} "
                  f"{last.files:>5}  {last.caches}", flush=True)
    client.close()
    problems = verdict(first, samples or [last], errors)
    print(f"{last.runs} runs in {last.seconds:.0f} s: {kinds}; after run {first.runs}: RSS {first.rss_mib:.1f} MiB, "
          f"{first.threads} threads, {first.files} files; after run {last.runs}: RSS {last.rss_mib:.1f} MiB "
          f"({last.rss_mib / first.rss_mib - 1:+.1%}; mapped files {first.file_mib:.1f} -> {last.file_mib:.1f} MiB), "
          f"{last.threads} threads, {last.files} files; "
          f"{len(errors)} unexpected errors")
    if problems:
        print("\n".join(f"PROBLEM: {p}" for p in problems))
    if last.files != first.files:
        changed = {k: f"{first.open_files[k]} -> {last.open_files[k]}" for k in first.open_files | last.open_files
                   if first.open_files[k] != last.open_files[k]}
        print(f"open files that changed, after run {first.runs} -> after run {last.runs}: {changed}")
    return int(bool(problems))


if __name__ == "__main__":
    sys.exit(main())
