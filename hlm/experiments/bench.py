"""`python -m hlm bench`: speed figures on a real pair, side by side in one run (the machine is shared and
noisy, so only ratios measured together mean anything). Not a test: it prints a table and the ratios. Sections
(`SECTIONS`, in the order they run; `--sections` picks some):

limit     (r) how close each model's decode step runs to the memory-bandwidth bound: the bandwidth measured in
              this run, and per model and path (plain unquantised dtype; the shipped fast path) the tok/s of a
              cached step, the bytes it reads per token and bytes/token x tok/s / bandwidth (`hlm.experiments.
              roofline`).
rows      (n) each model's shipped decode step with 1, 2, 4 and 8 new tokens at once, each with its logits: the
              time per row against one row's. Near 1, a step's products are bound by their arithmetic, not by
              reading the weights, and several runs decoded side by side (Compare's, in lockstep) would take as
              long as one after another; well under 1, they would share the weights' reads.
plain     (p) plain transformers `generate` of each model, unquantised, in each dtype this hardware runs well; the
              quality guard of the fast path (teacher-forced top-1 agreement and KL against the unquantised model
              on GUARD_PROMPTS tuning prompts; targets top-1 >= 99 %, KL <= 0.01 nats).
heldout   (h) the speed targets, greedy, as means over held-back prompts: the project's SLM decode >= 2.5x plain
              `generate` of the draft (its fastest plain dtype), default `ours` >= 1.5x plain `generate` of the
              verifier alone.
overhead  (a) `ours` forced to upload nothing vs the SLM's plain transformers `generate` on the same weights:
              per-token overhead of the statistics, the scores and the decoder loop (target <= 10 %); the judge's
              own cost per draft (target <= 2 %).
context   (b) verifier time per upload with a long vs a short context: must follow new tokens, not context length
              (target <= 1.3x).
policies  (c) tokens/s of every policy and of transformers' assisted generation on the same pair.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from hlm import ASSETS, estimators, rows
from hlm.config import BENCH_SECTIONS as SECTIONS
from hlm.config import RunConfig, SamplingConfig
from hlm.estimators import DraftStats
from hlm.experiments.prompts import load_prompts
from hlm.experiments.roofline import Bandwidth, decode_bytes, gguf_decode_bytes, measure_bandwidth
from hlm.features import judge_input
from hlm.models.presets import default_dtype
from hlm.policies import REGISTRY, with_role
from hlm.quant import PackedLinear, WideLinear, quality, step_seconds
from hlm.session import with_u_th
from hlm.verifier import LocalVerifier

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from hlm.decoder import HybridDecoder
    from hlm.models.pairs import ModelPair

Row = tuple[str, float, str]
# (role, device, dtype, attention) -> that model of the pair, unquantised (`hlm.models.presets.load_unquantised`)
Loader = Callable[[str, torch.device, torch.dtype, str], "PreTrainedModel"]

ROLES = ("draft", "verifier")
HELDOUT = ASSETS / "prompts-heldout.jsonl"
STEPS = 8  # timed decode steps per model in `limit`
FILLER = "The quick brown fox jumps over the lazy dog while the compiler checks every branch. "


def _timed_generate(model: PreTrainedModel, ids: torch.Tensor, n: int, sampling: SamplingConfig,
                    **kwargs: Any) -> float:
    torch.manual_seed(sampling.seed)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=sampling.temperature > 0,
                   temperature=sampling.temperature or None, top_p=None, top_k=None, **kwargs)
    return time.perf_counter() - t0


def _decoder_tps(decoder: HybridDecoder, prompt: str, config: RunConfig) -> tuple[float, list]:
    t0 = time.perf_counter()
    events = list(decoder.generate(prompt, config))
    return len(events) / (time.perf_counter() - t0), events


def _upload_rate(events: list) -> float:
    return sum(e.uploaded for e in events) / max(len(events), 1)


def _sampled(n_tokens: int) -> SamplingConfig:
    """The sampled runs of the single-prompt sections: T = 0.7, exactly `n_tokens` each."""
    return SamplingConfig(temperature=0.7, max_new_tokens=n_tokens, stop_at_eos=False)


def _device_only() -> str:
    """The policy that drafts and never uploads: the device model decoding on its own."""
    return next(p.name for p in REGISTRY.values() if p.drafts and not p.uploads)


def _float_dtype(model: PreTrainedModel) -> torch.dtype:
    """The dtype a model computes in, quantised or not (its embedding's: int8 layers keep their scales in it)."""
    return model.get_input_embeddings().weight.dtype


def _recipe(pair: ModelPair, role: str) -> str:
    return pair.quant.get(role, "none").split(" (")[0]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _plain_dtypes(pair: ModelPair) -> list[torch.dtype]:
    """The unquantised dtypes worth timing here: fp32 always; bf16 where `hlm.models` would pick it; the pair's."""
    return list(dict.fromkeys([torch.float32, default_dtype(pair.draft.device), _float_dtype(pair.draft)]))


def _plain(pair: ModelPair, load: Loader, role: str, dtype: torch.dtype) -> PreTrainedModel:
    """`role`'s model unquantised in `dtype`: the pair's own where it is just that (no second copy in memory), else
    loaded with the same attention kernel as the pair's (eager and SDPA alone move bf16 near-ties: measured top-1
    98.3 % int8-eager vs bf16-SDPA, which the guard must not charge to the quantisation). The verifier's exact rows
    (`hlm.rows`) are this project's, not plain: its plain model is SDPA, which they run for one-token steps."""
    model = getattr(pair, role)
    exact = model.config._attn_implementation == rows.KERNEL
    packed = any(isinstance(m, PackedLinear | WideLinear) for m in model.modules())  # not plain transformers either
    if getattr(model, "hlm_quant", "none") == "none" and model.dtype == dtype and not exact and not packed:
        return model
    return load(role, model.device, dtype, "sdpa" if exact else model.config._attn_implementation)


def spread(prompts: Sequence[dict[str, str]], n: int) -> list[dict[str, str]]:
    """`n` prompts that cover the categories: the first of each category in file order, then the rest in order."""
    firsts: dict[str, dict[str, str]] = {}
    for p in prompts:
        firsts.setdefault(p["category"], p)
    chosen = list(firsts.values())
    return (chosen + [p for p in prompts if p not in chosen])[:n]


def bandwidth_rows(bandwidth: Bandwidth) -> list[Row]:
    how = f"best of {bandwidth.repeats}, {bandwidth.threads} threads"
    return [(f"(r) memory bandwidth, measured: sum() reading {bandwidth.mib} MiB fp32, GB/s", bandwidth.read_gbs,
             how),
            (f"(r) memory bandwidth, measured: copy_() {bandwidth.mib // 2} MiB (read + write bytes), GB/s",
             bandwidth.copy_gbs, f"{how}; the bound below is the higher of the two")]


def limit(pair: ModelPair, load: Loader, bandwidth: Bandwidth, context: int) -> list[Row]:
    """(r) per model, its plain path (the pair's dtype, unquantised) and its shipped path (the pair as loaded):
    tok/s of a cached decode step, bytes read per token, and the fraction of the bandwidth bound reached."""
    rows = bandwidth_rows(bandwidth)
    for role in ROLES:
        shipped = getattr(pair, role)
        dtype = _dtype_name(_float_dtype(shipped))
        plain = _plain(pair, load, role, _float_dtype(shipped))
        paths = {f"{dtype} plain = shipped": plain} if plain is shipped else \
            {f"{dtype} plain": plain, f"{_recipe(pair, role)} shipped": shipped}
        if role == "draft" and pair.llama is not None:  # its decode steps run there, on the ggml path's blocks
            own = getattr(shipped, "hlm_quant", "none")
            paths = {f"{dtype} plain": plain, f"{own} (batched passes')": shipped, "llama.cpp shipped": pair.llama,
                     "llama.cpp reading the default's attention": pair.llama}
        for path, model in paths.items():
            at = context + STEPS // 2  # the bytes at the median step
            if model is pair.llama:
                layers = pair.head_layers if "attention" in path else frozenset()
                read, tps = gguf_decode_bytes(model, at), 1 / model.step_seconds(STEPS, context, layers)
            else:
                read, tps = decode_bytes(model, at), 1 / step_seconds(model, steps=STEPS, context=context)
            rows += [(f"(r) {role} {path}: decode step tok/s", tps, f"cached step, context {context} tokens"),
                     (f"(r) {role} {path}: MB read per token", read.total / 1e6,
                      f"weights {read.weights / 1e6:.1f} MB + KV cache {read.kv_cache / 1e6:.2f} MB"),
                     (f"(r) {role} {path}: fraction of the bandwidth bound", read.total * tps / (bandwidth.bound * 1e9),
                      "bytes/token x tok/s / bandwidth")]
        del plain, paths
        gc.collect()
    return rows


def _guard_sequences(pair: ModelPair, n_prompts: int, n_tokens: int, model: PreTrainedModel,
                     skip: int = 0) -> tuple[list[list[int]], list[int]]:
    """Tuning prompts (after the first `skip`) with the unquantised model's own greedy continuation: the positions
    the guard compares."""
    seqs, starts = [], []
    for p in load_prompts(limit=skip + n_prompts)[skip:]:
        ids = pair.encode_prompt(p["prompt"], n_tokens)
        out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=n_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None)
        seqs.append(out[0].tolist())
        starts.append(len(ids))
    return seqs, starts


def plain_vs_fast(pair: ModelPair, load: Loader, n_tokens: int, prompt: str,
                  guard_prompts: int) -> tuple[list[Row], dict[str, torch.dtype]]:
    """(p): plain `generate` per model and dtype, and the fast path's quality guard; also each model's fastest
    plain dtype, which the held-back section's plain arms run."""
    rows: list[Row] = []
    sampling = _sampled(n_tokens)
    ids = torch.tensor([pair.encode_prompt(prompt, n_tokens)], device=pair.draft.device)
    best: dict[str, tuple[float, torch.dtype]] = {}
    for role in ROLES:
        fast = getattr(pair, role)
        for dtype in _plain_dtypes(pair):
            model = _plain(pair, load, role, dtype)
            _timed_generate(model, ids, 4, sampling)  # warm-up
            tps = n_tokens / _timed_generate(model, ids, n_tokens, sampling)
            best[role] = max(best.get(role, (0.0, dtype)), (tps, dtype), key=lambda b: b[0])
            rows.append((f"(p) {role} plain generate, {_dtype_name(dtype)}, tok/s", tps, ""))
            if dtype == _float_dtype(fast) and guard_prompts and getattr(fast, "hlm_quant", "none") != "none":
                shipped = pair.llama if role == "draft" and pair.llama is not None else fast
                guard = quality(model, shipped, *_guard_sequences(pair, guard_prompts, 32, model))
                rows += [(f"(p) {role} guard: top-1 agreement, {_recipe(pair, role)} vs {_dtype_name(dtype)}",
                          guard.top1, f"target >= 99 %, {guard_prompts} prompts x 32 tokens: {guard.apart} of "
                          f"{guard.positions:,} positions apart"),
                         (f"(p) {role} guard: mean KL, nats", guard.kl, "target <= 0.01")]
            del model
            gc.collect()
    return rows, {role: dtype for role, (_, dtype) in best.items()}


def heldout(decoder: HybridDecoder, load: Loader, plain_dtypes: dict[str, torch.dtype], n_tokens: int,
            n_prompts: int) -> list[Row]:
    """(h) the speed targets over held-back prompts, greedy (plain `generate` with do_sample=False, the decoder at
    temperature 0), `n_tokens` each: per prompt, plain `generate` of each model alone (in `plain_dtypes`, else the
    pair's dtype), then the device-only policy and the default subject through the decoder (cloud in process),
    interleaved so drift on a shared machine hits every arm alike; the means over the prompts and their ratios."""
    pair = decoder.pair
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=n_tokens, stop_at_eos=False)
    prompts = [p["prompt"] for p in spread(load_prompts(HELDOUT), n_prompts)]
    dtypes = {role: plain_dtypes.get(role, _float_dtype(getattr(pair, role))) for role in ROLES}
    plain = {role: _plain(pair, load, role, dtype) for role, dtype in dtypes.items()}
    alone, subject = _device_only(), with_role("subject")
    policies = {name: RunConfig(sampling=sampling).with_policy(name=name) for name in (alone, subject)}
    warm_ids = torch.tensor([pair.encode_prompt(FILLER, 4)], device=pair.draft.device)
    for model in plain.values():
        _timed_generate(model, warm_ids, 4, sampling)
    for config in policies.values():
        _decoder_tps(decoder, FILLER, replace(config, sampling=replace(sampling, max_new_tokens=4)))
    tps: dict[str, list[float]] = defaultdict(list)
    uploads: dict[str, list[float]] = defaultdict(list)
    for prompt in prompts:
        ids = torch.tensor([pair.encode_prompt(prompt, n_tokens)], device=pair.draft.device)
        for role, model in plain.items():
            tps[role].append(n_tokens / _timed_generate(model, ids, n_tokens, sampling))
        for name, config in policies.items():
            rate, events = _decoder_tps(decoder, prompt, config)
            tps[name].append(rate)
            uploads[name].append(_upload_rate(events))
    mean = {arm: statistics.fmean(values) for arm, values in tps.items()}
    upload = {name: statistics.fmean(values) for name, values in uploads.items()}
    what = f"{len(prompts)} held-back prompts x {n_tokens} tokens, greedy"
    return [(f"(h) verifier plain generate ({_dtype_name(dtypes['verifier'])}), mean tok/s", mean["verifier"], what),
            (f"(h) draft plain generate ({_dtype_name(dtypes['draft'])}), mean tok/s", mean["draft"], what),
            (f"(h) project SLM decode ({alone} policy, draft {_recipe(pair, 'draft')}), mean tok/s", mean[alone],
             f"mean upload rate {upload[alone]:.0%}"),
            (f"(h) default {subject} (verifier {_recipe(pair, 'verifier')} in process), mean tok/s", mean[subject],
             f"mean upload rate {upload[subject]:.0%}"),
            ("(h) ratio: project SLM / plain generate of the draft", mean[alone] / mean["draft"], "target >= 2.5x"),
            (f"(h) ratio: default {subject} / plain generate of the verifier", mean[subject] / mean["verifier"],
             "target >= 1.5x")]


def judge_work_s(decoder: HybridDecoder, calls: int = 2000) -> float:
    """Seconds per draft that scoring by `judge-horizon` adds to scoring by `ubar-horizon`, timed alone (best of 3):
    the hidden state's copy to float32 and the judge's arithmetic. Their runs differ by nothing else but a forward
    hook on the lm-head that keeps its input (a Python call per step)."""
    pair = decoder.pair
    hidden = torch.randn(pair.draft.config.hidden_size, dtype=pair.draft.dtype)
    stats = DraftStats(u=0.1, ubar=0.1, p_draft=0.9, p_top=0.9, margin=0.8, entropy=0.4, semantic=0.3,
                       prev_attention=None, p_prev=0.9, index=8, log_p_before=-1.0)

    def per_call(name: str) -> float:
        estimator = estimators.REGISTRY[name]
        t0 = time.perf_counter()
        for _ in range(calls):
            state = judge_input(hidden) if estimator.hidden else None
            estimator.score(replace(stats, hidden=state), pair.selection)
        return (time.perf_counter() - t0) / calls

    return min(per_call("judge-horizon") for _ in range(3)) - min(per_call("ubar-horizon") for _ in range(3))


def judge_overhead(decoder: HybridDecoder, prompt: str, silent: RunConfig, repeats: int) -> list[Row]:
    """The judge's own cost per draft. Timed alone (`judge_work_s`) against the draft step, and as the difference of
    the same silent run (no uploads) scored by `judge-horizon` and by `ubar-horizon`, interleaved: what a user
    sees, but two such runs differ by a few percent either way on a shared machine, more than the judge costs."""
    seconds: dict[str, list[float]] = {"judge-horizon": [], "ubar-horizon": []}
    for est in seconds:
        _decoder_tps(decoder, prompt, silent.with_policy(estimator=est))  # warm-up
    for _ in range(repeats):
        for est, acc in seconds.items():
            tps, events = _decoder_tps(decoder, prompt, silent.with_policy(estimator=est))
            acc.append(1 / tps)
    judge, ubar = (statistics.median(v) for v in seconds.values())
    work = judge_work_s(decoder)
    return [("(a) draft step with the judge, ms", 1000 * judge, "no uploads"),
            ("(a) draft step with ubar, ms", 1000 * ubar, "no uploads"),
            ("(a) overhead as the two runs' difference", judge / ubar - 1, f"median of {repeats} runs each"),
            ("(a) the judge's own work per draft, us", 1e6 * work, "timed alone, best of 3 x 2000 calls"),
            ("(a) overhead of the judge per draft", work / ubar, "its own work / the ubar draft step; target <= 2 %")]


def overhead(decoder: HybridDecoder, n_tokens: int, repeats: int, prompt: str) -> list[Row]:
    """(a) overhead with no uploads: the decoder drafts and scores every draft (u, the estimator's statistics from
    the same pass), but the bar is out of reach, so it never calls the cloud."""
    pair, sampling = decoder.pair, _sampled(n_tokens)
    ids = torch.tensor([pair.encode_prompt(prompt, n_tokens)], device=pair.draft.device)
    subject = with_role("subject")
    silent = RunConfig(sampling=sampling).with_policy(name=subject, k=1, gamma=1e3)
    _decoder_tps(decoder, prompt, silent)  # warm-up
    ours_s, gen_s = [], []
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
        gen_s.append(_timed_generate(pair.draft, ids, n_tokens, sampling))
        tps, events = _decoder_tps(decoder, prompt, silent)
        ours_s.append(len(events) / tps)
    rows = [("(a) SLM transformers generate, tok/s", n_tokens / statistics.median(gen_s), ""),
            (f"(a) {subject}, no uploads, tok/s", n_tokens / statistics.median(ours_s), ""),
            (f"(a) overhead of {subject} vs generate", statistics.median(ours_s) / statistics.median(gen_s) - 1,
             "target <= 10 %")]
    return rows + judge_overhead(decoder, prompt, silent, repeats)


def context_scaling(decoder: HybridDecoder, n_tokens: int) -> list[Row]:
    """(b) verifier time per upload against context length (the first upload syncs the prompt: excluded)."""
    pair = decoder.pair
    counterfactual = RunConfig(sampling=_sampled(min(n_tokens, 24))).with_policy(name=with_role("counterfactual"))
    per_upload = {}
    for target in (100, min(2000, pair.max_context // 2)):
        long_prompt = "Summarise this text in one sentence:\n"
        while len(pair.encode_prompt(long_prompt + FILLER, 1)) <= target:
            long_prompt += FILLER
        ctx = len(pair.encode_prompt(long_prompt, 1))
        _, events = _decoder_tps(decoder, long_prompt, counterfactual)  # uploads every draft
        per_upload[ctx] = statistics.median(e.verify_s for e in events[1:])
    (short, t_short), (long, t_long) = sorted(per_upload.items())
    return [(f"(b) verify s/upload, context {short} tokens", t_short, ""),
            (f"(b) verify s/upload, context {long} tokens", t_long, ""),
            ("(b) ratio long/short", t_long / t_short, "target <= 1.3x")]


def policies(decoder: HybridDecoder, n_tokens: int, prompt: str) -> list[Row]:
    """(c) tokens/s per policy, the simplest rule first (the control's skip rate means something only matched to
    the subject: it is left out), and transformers' assisted generation on the same pair."""
    pair, sampling = decoder.pair, _sampled(n_tokens)
    rows: list[Row] = []
    ordered = sorted((p for p in REGISTRY.values() if p.role != "control"),
                     key=lambda p: (p.uploads, p.uses_uncertainty, p.uses_estimator))
    for policy in ordered:
        config = with_u_th(RunConfig(sampling=sampling).with_policy(name=policy.name), None, pair.calibration)
        tps, events = _decoder_tps(decoder, prompt, config)
        rows.append((f"(c) {policy.name} tok/s", tps, f"upload rate {_upload_rate(events):.0%}" if policy.uploads
                     else ""))
    ids = torch.tensor([pair.encode_prompt(prompt, n_tokens)], device=pair.draft.device)
    assisted = _timed_generate(pair.verifier, ids, n_tokens, sampling, assistant_model=pair.draft)
    rows.append(("(c) transformers assisted generation tok/s", n_tokens / assisted, "same pair, sampling"))
    return rows


ROWS = (1, 2, 4, 8)  # new tokens a step in the rows section


def rows_at_once(pair: ModelPair, context: int) -> list[Row]:
    """(n) per model on its shipped path: seconds per row of a step of n rows, against a step of one."""
    out = []
    for role in ROLES:
        model = getattr(pair, role)
        one, *more = (step_seconds(model, steps=STEPS, context=context, rows=n) for n in ROWS)
        out.append((f"(n) {role} {_recipe(pair, role)} shipped: 1 row a step, ms", one * 1e3,
                    f"cached step, context {context} tokens"))
        out += [(f"(n) {role} {_recipe(pair, role)} shipped: {n} rows a step, time per row / one row's",
                 seconds / n / one, f"{seconds * 1e3:.1f} ms a step")
                for n, seconds in zip(ROWS[1:], more, strict=True)]
    return out


def bench(decoder: HybridDecoder, load: Loader, sections: Sequence[str] = SECTIONS, *, n_tokens: int,
          repeats: int, prompt: str, guard_prompts: int, n_prompts: int, bandwidth_mib: int = 1024) -> list[Row]:
    """The rows of the chosen `sections`, in `SECTIONS` order; `load` gives a model of the pair unquantised. Every
    pass a row times runs: the verifier serves none from a kept session (`hlm.verifier.Track`), though runs repeat."""
    pair, rows = decoder.pair, []
    if isinstance(decoder.verifier, LocalVerifier):
        decoder.verifier.remember = False
    plain_dtypes: dict[str, torch.dtype] = {}
    context = len(pair.encode_prompt(prompt, n_tokens)) + n_tokens // 2  # mid-answer on the bench's prompt
    if "limit" in sections:
        rows += limit(pair, load, measure_bandwidth(bandwidth_mib), context)
    if "rows" in sections:
        rows += rows_at_once(pair, context)
    if "plain" in sections:
        plain_rows, plain_dtypes = plain_vs_fast(pair, load, n_tokens, prompt, guard_prompts)
        rows += plain_rows
    if "heldout" in sections:
        rows += heldout(decoder, load, plain_dtypes, n_tokens, n_prompts)
    if "overhead" in sections:
        rows += overhead(decoder, n_tokens, repeats, prompt)
    if "context" in sections:
        rows += context_scaling(decoder, n_tokens)
    if "policies" in sections:
        rows += policies(decoder, n_tokens, prompt)
    return rows
