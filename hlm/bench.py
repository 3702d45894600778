"""`python -m hlm bench`: speed figures on a real pair, side by side in one run (the machine is shared and
noisy, so only ratios measured together mean anything). Not a test: it prints a table and the ratios.

(a) `ours` forced to upload nothing vs the SLM's plain transformers `generate`: per-token overhead of
    uncertainty + importance + the decoder loop (target <= 10 %).
(b) verifier time per upload with a long vs a short context: must follow new tokens, not context length
    (target <= 1.3x).
(c) tokens/s of every policy and of transformers' assisted generation on the same pair.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hlm.config import RunConfig, SamplingConfig

FILLER = "The quick brown fox jumps over the lazy dog while the compiler checks every branch. "


def _timed_generate(model, ids: torch.Tensor, n: int, sampling: SamplingConfig, **kwargs) -> float:  # noqa: ANN001, ANN003
    torch.manual_seed(sampling.seed)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=sampling.temperature > 0,
                   temperature=sampling.temperature or None, top_p=None, top_k=None, **kwargs)
    return time.perf_counter() - t0


def _decoder_tps(decoder, prompt: str, config: RunConfig) -> tuple[float, list]:  # noqa: ANN001
    t0 = time.perf_counter()
    events = list(decoder.generate(prompt, config))
    return len(events) / (time.perf_counter() - t0), events


def bench(decoder, n_tokens: int, repeats: int, prompt: str) -> list[tuple[str, float, str]]:  # noqa: ANN001
    pair = decoder.pair
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=n_tokens, stop_at_eos=False)
    base = RunConfig(sampling=sampling)
    rows: list[tuple[str, float, str]] = []
    ids = torch.tensor([pair.encode_prompt(prompt, n_tokens)], device=pair.draft.device)

    # (a) overhead with no uploads: the decoder drafts and scores every draft (u, the estimator's statistics from
    # the same pass), but the bar is out of reach, so it never calls the cloud.
    silent = base.with_policy(name="ours", k=1, gamma=1e3)
    _decoder_tps(decoder, prompt, silent)  # warm-up
    ours_s, gen_s = [], []
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
        gen_s.append(_timed_generate(pair.draft, ids, n_tokens, sampling))
        tps, events = _decoder_tps(decoder, prompt, silent)
        ours_s.append(len(events) / tps)
    overhead = statistics.median(ours_s) / statistics.median(gen_s) - 1
    rows += [("(a) SLM transformers generate, tok/s", n_tokens / statistics.median(gen_s), ""),
             ("(a) ours, no uploads, tok/s", n_tokens / statistics.median(ours_s), ""),
             ("(a) overhead of ours vs generate", overhead, "target <= 10 %")]

    # (b) verifier time per upload against context length (first upload syncs the prompt: excluded).
    per_upload = {}
    for target in (100, min(2000, pair.max_context // 2)):
        long_prompt = "Summarise this text in one sentence:\n"
        while len(pair.encode_prompt(long_prompt + FILLER, 1)) <= target:
            long_prompt += FILLER
        ctx = len(pair.encode_prompt(long_prompt, 1))
        _, events = _decoder_tps(decoder, long_prompt, RunConfig(sampling=sampling.__class__(
            temperature=0.7, max_new_tokens=min(n_tokens, 24), stop_at_eos=False)).with_policy(name="hlm"))
        per_upload[ctx] = statistics.median(e.verify_s for e in events[1:])
    (short, t_short), (long, t_long) = sorted(per_upload.items())
    rows += [(f"(b) verify s/upload, context {short} tokens", t_short, ""),
             (f"(b) verify s/upload, context {long} tokens", t_long, ""),
             ("(b) ratio long/short", t_long / t_short, "target <= 1.3x")]

    # (c) tokens/s per policy, and transformers' assisted generation on the same pair.
    for policy in ("slm", "llm", "hlm", "uhlm", "ours"):
        cal = pair.calibration
        config = base.with_policy(name=policy, **({"u_th": cal.risk_averse} if cal else {}))
        tps, events = _decoder_tps(decoder, prompt, config)
        uploads = sum(e.uploaded for e in events) / max(len(events), 1)
        rows.append((f"(c) {policy} tok/s", tps, f"upload rate {uploads:.0%}" if policy not in ("slm", "llm") else ""))
    assisted = _timed_generate(pair.verifier, ids, n_tokens, sampling, assistant_model=pair.draft)
    rows.append(("(c) transformers assisted generation tok/s", n_tokens / assisted, "same pair, sampling"))
    return rows


def cmd_bench(args: argparse.Namespace) -> int:
    from hlm.cli import load_decoder

    decoder = load_decoder(args)
    rows = bench(decoder, args.tokens, args.repeats, args.prompt)
    print(f"\nhlm bench: pair {decoder.pair.name}, {decoder.pair.describe()['draft']['dtype']} on "
          f"{decoder.device}, {torch.get_num_threads()} threads, {args.tokens} tokens\n")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        shown = f"{value:.1%}" if "overhead" in name else f"{value:.3f}"
        print(f"{name:<{width}}  {shown:>10}  {note}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from hlm.cli import add_model_args

    p = sub.add_parser("bench", help="speed benchmark: overhead, verifier scaling, tokens/s per policy")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt", default="Write a Python function that checks whether a string is a palindrome.")
    add_model_args(p)
    p.set_defaults(func=cmd_bench)
