"""The study's data: answers generated in batches, and per-draft rows along each answer (cached per prompt and mode).

Greedy replay: the answer is the LLM's greedy y*, and one SLM prefill over prompt + y* gives every draft's
statistics; at each divergence two extra SLM steps (from a copy of the cache) give the attention rows a decode
over the draft would see. Sampled paths: the answer is the SLM's own sample, and one SLM and one LLM prefill give
every score, beta = max(0, 1 - q(d)/p(d)) and TV(p, q) of every draft. The drafter's final hidden state at each
draft's query (what its lm-head read) is kept beside the rows, in a .npy file, for the hidden-state judge.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList

from hlm.config import SamplingConfig
from hlm.features import draft_stats
from hlm.importance import attention_row, row_stats
from hlm.sampling import distribution
from hlm.uncertainty import uncertainty

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from hlm.decoder import HybridDecoder
    from hlm.experiments.workers import Workers
    from hlm.models.pairs import ModelPair

U_DRAWS = 4  # independent u draws per draft: the paper-literal rule's gate is random
SINKS, LAST_LAYERS = 4, 4  # the paper-literal rows' settings (PolicyConfig defaults)


class _MaskFillers(LogitsProcessor):
    """Generation never picks a token outside the pair's valid vocabulary (the fillers)."""

    def __init__(self, valid: torch.Tensor) -> None:
        self.valid = valid

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(~self.valid[: scores.shape[-1]].to(scores.device), float("-inf"))


def _generate(model: PreTrainedModel, pair: ModelPair, prompts: Sequence[list[int]], n: int, temperature: float,
              seed: int, batch: int) -> list[list[int]]:
    """n new tokens per prompt (stopping at end of turn), batched with left padding; fillers masked."""
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else min(pair.stop_ids)
    cfg = GenerationConfig(max_new_tokens=n, do_sample=temperature > 0, temperature=temperature or None,
                           top_k=None, top_p=None, repetition_penalty=None, pad_token_id=pad,
                           eos_token_id=sorted(pair.stop_ids))
    out: list[list[int]] = []
    torch.manual_seed(seed)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                                 logits_processor=LogitsProcessorList([_MaskFillers(pair.valid)]))
        for row in gen[:, width:].tolist():
            stop = next((j for j, t in enumerate(row) if t in pair.stop_ids), None)
            out.append(row[: stop + 1] if stop is not None else row)
    return out


def _argmax(logits: torch.Tensor, valid: torch.Tensor) -> int:
    return int(logits.masked_fill(~valid, float("-inf")).argmax())


@dataclass(frozen=True)
class _Replay:
    """Both models' teacher-forced pass over prompt + answer: all that the rows along the answer read."""

    pair: ModelPair
    full: list[int]  # prompt + answer
    start: int  # the answer's first position
    greedy: bool  # the answer is the LLM's greedy y* (else the SLM's own sample)
    sampling: SamplingConfig
    gens: list[torch.Generator]  # one per u draw
    mid: range  # the middle layers whose heads' previous-token attention RAUQ chooses from
    cache: DynamicCache
    attentions: tuple[torch.Tensor, ...]
    z: torch.Tensor  # the SLM's logits at every position
    q: torch.Tensor  # the LLM's
    hidden: torch.Tensor  # the SLM's final (normed) hidden state at every position


def _replay(pair: ModelPair, prompt_ids: list[int], answer: list[int], temperature: float, seed: int,
            greedy: bool) -> _Replay:
    full = prompt_ids + answer
    n_layers = pair.draft.config.num_hidden_layers
    cache = DynamicCache()
    out = pair.draft(input_ids=torch.tensor([full]), cache=cache, use_cache=True, output_attentions=True,
                     output_hidden_states=True)
    q = pair.verifier(input_ids=torch.tensor([full])).logits[0].float()
    return _Replay(pair, full, len(prompt_ids), greedy, SamplingConfig(temperature=temperature),
                   [torch.Generator().manual_seed(seed * 1000 + i) for i in range(U_DRAWS)],
                   range(n_layers // 3, 2 * n_layers // 3 or 1), cache, out.attentions, out.logits[0].float(), q,
                   out.hidden_states[-1][0])


def _row(rp: _Replay, i: int) -> dict[str, Any]:
    """The i-th draft's labels and statistics; its logits come from the query at the position before it."""
    valid, att, pos = rp.pair.valid, rp.attentions, rp.start + i
    z, token = rp.z[pos - 1], rp.full[pos]
    d = _argmax(z, valid) if rp.greedy else token
    uncs = [uncertainty(z, d, 20, 2.0, g, valid) for g in rp.gens]
    prev = None  # the SLM's probability of the previous token
    if i:
        prev = float(torch.softmax(rp.z[pos - 2].masked_fill(~valid, float("-inf")), -1)[rp.full[pos - 1]])
    stats = draft_stats(z, d, uncs[0], valid, rp.pair.embeddings, None, prev)
    qg = _argmax(rp.q[pos - 1], valid)
    if rp.greedy:
        beta, tv, g = float(d != token), float(d != token), int(d != token)
    else:
        p, q = distribution(z, rp.sampling, valid), distribution(rp.q[pos - 1], rp.sampling, valid)
        beta = max(0.0, 1.0 - float(q[d]) / max(float(p[d]), 1e-30))
        tv, g = 0.5 * float((p - q).abs().sum()), int(_argmax(z, valid) != qg)
    n_heads = rp.pair.draft.config.num_attention_heads
    head_prev = [] if i == 0 else [[round(float(att[layer][0, h, pos - 1, pos - 2]), 5) for h in range(n_heads)]
                                   for layer in rp.mid]
    return {"g": g, "beta": beta, "tv": tv, "llm_agrees": int(qg == token) if rp.greedy else None,
            "u": [x.u for x in uncs], **{k: v for k, v in stats.__dict__.items() if k not in ("u", "hidden")},
            "head_prev": head_prev,
            "self": row_stats(attention_row(att, LAST_LAYERS, pos), pos, SINKS),
            "look": row_stats(attention_row(att, LAST_LAYERS, pos + 1), pos, SINKS)}


def _step(rp: _Replay, cache: DynamicCache, token: int) -> Any:
    return rp.pair.draft(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True, output_attentions=True)


def _rows_at_divergences(rp: _Replay, rows: list[dict[str, Any]]) -> None:
    """At a greedy divergence the draft, not y*, is in the SLM's context: its rows come from two extra steps."""
    for i, r in enumerate(rows):
        if not r["g"]:
            continue
        pos = rp.start + i
        cache = copy.deepcopy(rp.cache)
        cache.crop(-(len(rp.full) - pos))
        over_draft = _step(rp, cache, _argmax(rp.z[pos - 1], rp.pair.valid))
        r["self"] = row_stats(attention_row(over_draft.attentions, LAST_LAYERS), pos, SINKS)
        if i > 0 and not rows[i - 1]["g"]:
            rows[i - 1]["look"] = row_stats(attention_row(over_draft.attentions, LAST_LAYERS), pos - 1, SINKS)
        after = _step(rp, cache, _argmax(over_draft.logits[0, -1].float(), rp.pair.valid))
        r["look"] = row_stats(attention_row(after.attentions, LAST_LAYERS), pos, SINKS)


def _rows(pair: ModelPair, prompt_ids: list[int], answer: list[int], temperature: float, seed: int,
          greedy: bool) -> dict[str, Any]:
    """Per-draft statistics along `answer` (the LLM's greedy answer, or the SLM's own sampled one)."""
    n = len(answer) - 1  # the last token only serves as the lookahead query of the one before
    with torch.inference_mode():
        rp = _replay(pair, prompt_ids, answer, temperature, seed, greedy)
        rows = [_row(rp, i) for i in range(n)]
        if greedy:
            _rows_at_divergences(rp, rows)
        hidden = rp.hidden[rp.start - 1: rp.start - 1 + n].to(torch.float16).numpy()  # draft i's query: start+i-1
    return {"tokens": answer[:n], "rows": rows, "heads_layers": list(rp.mid), "hidden": hidden}


@dataclass(frozen=True)
class Batch:
    """One generation batch of a mode (greedy y* or a sampled seed): the unit of work of the study's collection."""

    mode: str
    seed: int
    temperature: float
    n: int
    prompts: tuple[dict[str, str], ...]


def answer_batch(decoder: HybridDecoder, batch: Batch) -> list[dict[str, Any] | None]:
    """A `Workers` task: the batch's answers (one batched generation, seeded by the batch's seed) and every
    answer's rows; None for an answer too short to study."""
    pair = decoder.pair
    ids = [pair.encode_prompt(p["prompt"], batch.n + 1) for p in batch.prompts]
    model = pair.verifier if batch.mode == "greedy" else pair.draft
    answers = _generate(model, pair, ids, batch.n + 1, batch.temperature, batch.seed, len(ids))
    return [None if len(answer) < 2 else
            {"prompt_id": p["id"], "category": p["category"], "mode": batch.mode, "seed": batch.seed,
             "temperature": batch.temperature, **_rows(pair, pid, answer, batch.temperature, batch.seed,
                                                       batch.mode == "greedy")}
            for p, pid, answer in zip(batch.prompts, ids, answers, strict=True)]


def collect(workers: Workers, models: str, prompts: Sequence[dict[str, str]], out: Path, n: int,
            seeds: Sequence[int], temperature: float, batch: int, progress: bool = True) -> list[dict[str, Any]]:
    """Greedy replay and sampled paths for every prompt (cached per prompt and mode; batches run on `workers`, and
    a batch that fails is reported and left out)."""
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    modes = [("greedy", 0, 0.0)] + [("sampled", s, temperature) for s in seeds]

    def path(p: dict[str, str], mode: str, seed: int, t: float) -> Path:
        key = json.dumps([models, workers.facts.numerics, p["prompt"], mode, seed, t, n], sort_keys=True)
        return cache / f"{mode}-{seed}-{p['id']}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"

    def done(p: dict[str, str], mode: str, seed: int, t: float) -> bool:
        return path(p, mode, seed, t).is_file() and path(p, mode, seed, t).with_suffix(".npy").is_file()

    def load(path: Path) -> dict[str, Any]:
        return {**json.loads(path.read_text(encoding="utf-8")),
                "hidden": np.load(path.with_suffix(".npy"), allow_pickle=False)}

    records = []
    for mode, seed, t in modes:
        todo = [p for p in prompts if not done(p, mode, seed, t)]
        batches = [Batch(mode, seed, t, n, tuple(todo[i:i + batch])) for i in range(0, len(todo), batch)]
        if todo:
            print(f"[study] {mode} seed {seed}: {len(todo)} answers ({n + 1} tokens, batches of {batch})",
                  file=sys.stderr, flush=True)
        with tqdm(total=len(todo), desc=f"study {mode} {seed}", unit="prompt", disable=not progress or not todo,
                  file=sys.stderr) as bar:
            for outcome in workers.map(answer_batch, batches, bar, size=lambda b: len(b.prompts)):
                if outcome.error is not None:
                    ids = ", ".join(p["id"] for p in outcome.item.prompts)
                    tqdm.write(f"[study] batch {ids} failed: {outcome.error}", file=sys.stderr)
                    continue
                for p, rec in zip(outcome.item.prompts, outcome.result, strict=True):
                    if rec is not None:
                        file = path(p, mode, seed, t)
                        np.save(file.with_suffix(".npy"), rec.pop("hidden"), allow_pickle=False)
                        file.write_text(json.dumps(rec), encoding="utf-8")
        records += [load(path(p, mode, seed, t)) for p in prompts if done(p, mode, seed, t)]
    return records
