"""`python -m hlm study`: which device-side score picks the drafts the cloud would change (README "Selection").

Token-level, against a coin and an oracle, at matched upload budgets, with prompt-clustered bootstrap intervals:
- greedy replay: under greedy decoding the hybrid output equals the LLM's greedy answer y* until the first
  divergence (argmax p != y*) that is not uploaded. One LLM generation and one SLM prefill over prompt + y* give,
  exactly and for every rule, the first missed divergence and the faithful prefix. The paper-literal rules read
  attention rows over the *draft*, so at each divergence two extra SLM steps (from a copy of the cache) give the
  rows a decode over the draft would see;
- sampled paths: the SLM samples its own answer at T > 0; one SLM and one LLM prefill over it give every score
  and the exact rejection probability beta = max(0, 1 - q(d)/p(d)) and TV(p, q) of every draft.
Generation is batched (left padding) for speed; the LLM's teacher-forced argmax is checked against y*.

Every prompt's rows are cached in OUT/cache (resumable). `--fit` also fits the pair's `SelectionCalibration`
(RAUQ heads, probe, score scales) on these prompts; use it only on tuning prompts and report on others.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hlm.estimators import (
    NAMES,
    REGISTRY,
    WINDOW,
    DraftStats,
    Probe,
    ScoreScale,
    SelectionCalibration,
    feature,
    horizon,
    prompt_key,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from hlm.config import RunConfig
    from hlm.decoder import HybridDecoder
    from hlm.models.pairs import ModelPair

BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
U_DRAWS = 4  # independent u draws per draft: the paper-literal rule's gate is random
PAPER_GRID = {"k": (1, 2, 4, 8, 16), "gamma": (0.0, 0.5, 1.0, 2.0)}
PROBE_FEATURES = ("ubar", "one_minus_p", "entropy", "margin", "semantic", "prev_attention", "p_prev", "rauq")
SCORES = tuple(n for n in NAMES if not REGISTRY[n].uses_u_th)
SINKS, LAST_LAYERS = 4, 4  # the paper-literal rows' settings (PolicyConfig defaults)
BOOT = 1000


# ----------------------------------------------------------------------------------------------- collection

def _generate(model: PreTrainedModel, pair: ModelPair, prompts: Sequence[list[int]], n: int, temperature: float,
              seed: int, batch: int) -> list[list[int]]:
    """n new tokens per prompt (stopping at end of turn), batched with left padding; fillers masked."""
    import torch
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class Fillers(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return scores.masked_fill(~pair.valid[: scores.shape[-1]].to(scores.device), float("-inf"))

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
                                 logits_processor=LogitsProcessorList([Fillers()]))
        for row in gen[:, width:].tolist():
            stop = next((j for j, t in enumerate(row) if t in pair.stop_ids), None)
            out.append(row[: stop + 1] if stop is not None else row)
    return out


def _rows(pair: ModelPair, prompt_ids: list[int], answer: list[int], temperature: float, seed: int,
          greedy: bool) -> dict[str, Any]:
    """Per-draft statistics along `answer` (the LLM's greedy answer, or the SLM's own sampled one)."""
    import torch
    from transformers import DynamicCache

    from hlm.config import SamplingConfig
    from hlm.features import draft_stats
    from hlm.importance import attention_row, row_stats
    from hlm.sampling import distribution
    from hlm.uncertainty import uncertainty

    draft, verifier, valid = pair.draft, pair.verifier, pair.valid
    n_layers, n_heads = draft.config.num_hidden_layers, draft.config.num_attention_heads
    mid = range(n_layers // 3, 2 * n_layers // 3 or 1)
    emb = pair.embeddings
    full, start = prompt_ids + answer, len(prompt_ids)
    n = len(answer) - 1  # the last token only serves as the lookahead query of the one before
    sampling = SamplingConfig(temperature=temperature)
    with torch.inference_mode():
        cache = DynamicCache()
        out = draft(input_ids=torch.tensor([full]), cache=cache, use_cache=True, output_attentions=True)
        att, z_all = out.attentions, out.logits[0].float()
        q_logits = verifier(input_ids=torch.tensor([full])).logits[0].float()
        gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(U_DRAWS)]
        rows: list[dict[str, Any]] = []
        for i in range(n):
            pos = start + i  # the drafted token's position; its logits come from the query at pos - 1
            z = z_all[pos - 1]
            d = int(z.masked_fill(~valid, float("-inf")).argmax()) if greedy else answer[i]
            uncs = [uncertainty(z, d, 20, 2.0, g, valid) for g in gens]
            prev = None if i == 0 else float(torch.softmax(
                z_all[pos - 2].masked_fill(~valid, float("-inf")), -1)[full[pos - 1]])
            stats = draft_stats(z, d, uncs[0], valid, emb, None, prev)
            p, q = distribution(z, sampling, valid), distribution(q_logits[pos - 1], sampling, valid)
            pg = int(z.masked_fill(~valid, float("-inf")).argmax())
            qg = int(q_logits[pos - 1].masked_fill(~valid, float("-inf")).argmax())
            if greedy:
                beta, tv, g = float(d != answer[i]), float(d != answer[i]), int(d != answer[i])
            else:
                beta = max(0.0, 1.0 - float(q[d]) / max(float(p[d]), 1e-30))
                tv, g = 0.5 * float((p - q).abs().sum()), int(pg != qg)
            head_prev = [] if i == 0 else [[round(float(att[layer][0, h, pos - 1, pos - 2]), 5)
                                            for h in range(n_heads)] for layer in mid]
            rows.append({"g": g, "beta": beta, "tv": tv, "llm_agrees": int(qg == answer[i]) if greedy else None,
                         "u": [x.u for x in uncs], **{k: v for k, v in stats.__dict__.items() if k != "u"},
                         "head_prev": head_prev,
                         "self": row_stats(attention_row(att, LAST_LAYERS, pos), pos, SINKS),
                         "look": row_stats(attention_row(att, LAST_LAYERS, pos + 1), pos, SINKS)})
        if greedy:  # at a divergence the draft, not y*, is in the SLM's context: rows from two extra steps
            for i, r in enumerate(rows):
                if not r["g"]:
                    continue
                pos, d = start + i, int(z_all[start + i - 1].masked_fill(~valid, float("-inf")).argmax())
                c = copy.deepcopy(cache)
                c.crop(-(len(full) - pos))
                o1 = draft(input_ids=torch.tensor([[d]]), cache=c, use_cache=True, output_attentions=True)
                r["self"] = row_stats(attention_row(o1.attentions, LAST_LAYERS), pos, SINKS)
                if i > 0 and not rows[i - 1]["g"]:
                    rows[i - 1]["look"] = row_stats(attention_row(o1.attentions, LAST_LAYERS), pos - 1, SINKS)
                nxt = int(o1.logits[0, -1].float().masked_fill(~valid, float("-inf")).argmax())
                o2 = draft(input_ids=torch.tensor([[nxt]]), cache=c, use_cache=True, output_attentions=True)
                r["look"] = row_stats(attention_row(o2.attentions, LAST_LAYERS), pos, SINKS)
    return {"tokens": answer[:n], "rows": rows, "heads_layers": list(mid)}


def collect(pair: ModelPair, models: str, prompts: Sequence[dict[str, str]], out: Path, n: int,
            seeds: Sequence[int], temperature: float, batch: int, progress: bool = True) -> list[dict[str, Any]]:
    """Greedy replay and sampled paths for every prompt (cached per prompt and mode)."""
    from tqdm import tqdm

    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    modes = [("greedy", 0, 0.0)] + [("sampled", s, temperature) for s in seeds]

    def path(p: dict[str, str], mode: str, seed: int, t: float) -> Path:
        key = json.dumps([models, pair.numerics, p["prompt"], mode, seed, t, n], sort_keys=True)
        return cache / f"{mode}-{seed}-{p['id']}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"

    records = []
    for mode, seed, t in modes:
        todo = [p for p in prompts if not path(p, mode, seed, t).is_file()]
        if todo:
            ids = [pair.encode_prompt(p["prompt"], n + 1) for p in todo]
            model = pair.verifier if mode == "greedy" else pair.draft
            print(f"[study] {mode} seed {seed}: generating {len(todo)} answers ({n + 1} tokens, batches of {batch})",
                  file=sys.stderr, flush=True)
            answers = _generate(model, pair, ids, n + 1, t, seed, batch)
            for p, pid, answer in tqdm(list(zip(todo, ids, answers, strict=True)), desc=f"study {mode} {seed}",
                                       unit="prompt", disable=not progress, file=sys.stderr):
                if len(answer) < 2:
                    continue
                rec = {"prompt_id": p["id"], "category": p["category"], "mode": mode, "seed": seed,
                       "temperature": t, **_rows(pair, pid, answer, t, seed, mode == "greedy")}
                path(p, mode, seed, t).write_text(json.dumps(rec), encoding="utf-8")
        records += [json.loads(path(p, mode, seed, t).read_text(encoding="utf-8"))
                    for p in prompts if path(p, mode, seed, t).is_file()]
    return records


# ------------------------------------------------------------------------------------------------- scoring

def stats_of(row: dict[str, Any], heads: Sequence[tuple[int, int]], layers: Sequence[int], index: int) -> DraftStats:
    prev = None
    if row["head_prev"]:
        prev = float(np.mean([row["head_prev"][layers.index(layer)][h] for layer, h in heads]))
    return DraftStats(u=row["u"][0], ubar=row["ubar"], p_draft=row["p_draft"], p_top=row["p_top"],
                      margin=row["margin"], entropy=row["entropy"], semantic=row["semantic"], prev_attention=prev,
                      p_prev=row["p_prev"], index=index)


def rauq_heads(records: Sequence[dict[str, Any]]) -> tuple[tuple[int, int], ...]:
    """Per middle layer, the head that attends most to the previous token on average (RAUQ's head choice)."""
    rows = [r["head_prev"] for rec in records for r in rec["rows"] if r["head_prev"]]
    layers = records[0]["heads_layers"]
    mean = np.mean(np.asarray(rows), axis=0)  # (layers, heads)
    return tuple((layer, int(mean[j].argmax())) for j, layer in enumerate(layers))


def default_layer_heads(records: Sequence[dict[str, Any]]) -> tuple[tuple[int, int], ...]:
    rows = next(r["head_prev"] for rec in records for r in rec["rows"] if r["head_prev"])
    return tuple((layer, h) for layer in records[0]["heads_layers"] for h in range(len(rows[0])))


def score_table(records: Sequence[dict[str, Any]], cal: SelectionCalibration) -> list[dict[str, np.ndarray]]:
    """Per record: every score estimator's score per draft, plus the labels."""
    heads = cal.heads or default_layer_heads(records)
    out = []
    for rec in records:
        stats = [stats_of(r, heads, rec["heads_layers"], i) for i, r in enumerate(rec["rows"])]
        t = {name: np.array([REGISTRY[name].score(s, cal) for s in stats]) for name in SCORES}
        t.update({f: np.array([np.nan if (x := feature(s, f)) is None else x for s in stats])
                  for f in PROBE_FEATURES})
        for key in ("g", "beta", "tv"):
            t[key] = np.array([r[key] for r in rec["rows"]], dtype=float)
        out.append(t)
    return out


def fit_calibration(records: Sequence[dict[str, Any]], note: str,
                    tuned_on: Sequence[str] = ()) -> tuple[SelectionCalibration, list[np.ndarray]]:
    """RAUQ heads, the probe (L2 logistic regression on greedy-divergence labels g of every mode) and the scales.
    Returns also the probe's out-of-fold scores per record (4 folds by prompt), for honest tuning-set figures."""
    from sklearn.linear_model import LogisticRegression

    heads = rauq_heads(records)
    base = SelectionCalibration(heads=heads)
    table = score_table(records, base)
    x_parts = [np.column_stack([t[f] for f in PROBE_FEATURES]) for t in table]
    x = np.vstack(x_parts)
    y = np.concatenate([t["g"] for t in table])
    if len(set(y.tolist())) < 2:
        raise ValueError("cannot fit the probe: every draft agrees with the LLM, or none does; study more prompts")
    mean = np.nanmean(x, axis=0)
    x = np.where(np.isnan(x), mean, x)
    scale = x.std(axis=0) + 1e-9

    def fit(rows: np.ndarray) -> LogisticRegression:
        return LogisticRegression(C=1.0, max_iter=2000).fit((x[rows] - mean) / scale, y[rows])

    prompts = sorted({rec["prompt_id"] for rec in records})
    fold = {p: i % 4 for i, p in enumerate(prompts)}
    owner = np.concatenate([[fold[rec["prompt_id"]]] * len(rec["rows"]) for rec in records])
    oof = np.zeros(len(y))
    for f in range(4):
        model = fit(owner != f)
        oof[owner == f] = model.predict_proba((x[owner == f] - mean) / scale)[:, 1]
    model = fit(np.ones(len(y), dtype=bool))
    probe = Probe(PROBE_FEATURES, tuple(map(float, mean)), tuple(map(float, scale)),
                  tuple(map(float, model.coef_[0])), float(model.intercept_[0]))
    cal = SelectionCalibration(heads=heads, probe=probe, note=note, tuned_on=tuple(sorted(map(prompt_key, tuned_on))))
    table = score_table(records, cal)
    scales = {}
    for name in SCORES:
        s = np.concatenate([t[name] for t in table])
        scales[name] = ScoreScale(tuple(float(v) for v in np.quantile(s, np.arange(WINDOW + 1) / WINDOW)),
                                  float(s.std()))
    splits = np.cumsum([len(t["g"]) for t in table])[:-1]
    return replace(cal, scales=scales), np.split(oof, splits)


# ------------------------------------------------------------------------------------------------- metrics

def greedy_outcome(selected: np.ndarray, g: np.ndarray) -> tuple[float, float | None, int, int]:
    """(faithful prefix fraction, first divergence caught or None when there is none, divergences caught, total)."""
    div = np.flatnonzero(g > 0)
    missed = div[~selected[div]]
    prefix = (missed[0] if len(missed) else len(g)) / len(g)
    return float(prefix), (float(selected[div[0]]) if len(div) else None), int(selected[div].sum()), len(div)


def coin_outcome(rate: float, g: np.ndarray) -> tuple[float, float | None, float, int]:
    """Expected greedy outcome of uploading each draft with probability `rate`, in closed form."""
    div = np.flatnonzero(g > 0)
    ends = np.append(div, len(g)) / len(g)
    probs = np.append(rate ** np.arange(len(div)) * (1 - rate), rate ** len(div))
    return float((probs * ends).sum()), (rate if len(div) else None), rate * len(div), len(div)


def summarise(outcomes: Sequence[tuple], uploads: Sequence[float], tokens: Sequence[int],
              rng: np.random.Generator) -> dict[str, float]:
    """Pooled metrics over prompts with prompt-clustered bootstrap 95 % intervals."""
    o = np.array([[a, np.nan if b is None else b, c, d] for a, b, c, d in outcomes], dtype=float)
    up, tok = np.asarray(uploads, dtype=float), np.asarray(tokens, dtype=float)

    def stat(idx: np.ndarray) -> np.ndarray:
        sub = o[idx]
        return np.array([sub[:, 0].mean(), np.nanmean(sub[:, 1]), sub[:, 2].sum() / max(sub[:, 3].sum(), 1),
                         up[idx].sum() / tok[idx].sum()])

    point = stat(np.arange(len(o)))
    boot = np.array([stat(rng.integers(0, len(o), len(o))) for _ in range(BOOT)])
    lo, hi = np.nanpercentile(boot, 2.5, axis=0), np.nanpercentile(boot, 97.5, axis=0)
    names = ("faithful_prefix", "first_divergence_recall", "divergence_recall", "upload_rate")
    return {f"{k}{suffix}": float(v[i]) for i, k in enumerate(names) for suffix, v in (("", point), ("_lo", lo),
                                                                                         ("_hi", hi))}


def capture(scores: Sequence[np.ndarray], beta: Sequence[np.ndarray], rate: float, threshold: float,
            rng: np.random.Generator) -> dict[str, float]:
    """Captured rejection mass sum(beta | selected) / sum(beta), pooled, with a prompt-clustered interval."""
    sel = [s >= threshold for s in scores]
    num = np.array([b[m].sum() for b, m in zip(beta, sel, strict=True)])
    den = np.array([b.sum() for b in beta])
    point = num.sum() / den.sum()
    boot = []
    for _ in range(BOOT):
        idx = rng.integers(0, len(num), len(num))
        boot.append(num[idx].sum() / max(den[idx].sum(), 1e-12))
    return {"crm": float(point), "crm_lo": float(np.percentile(boot, 2.5)), "crm_hi": float(np.percentile(boot, 97.5))}


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def analyse(records: Sequence[dict[str, Any]], cal: SelectionCalibration, oof_probe: Sequence[np.ndarray] | None,
            k: int, gamma: float, u_th: float, seed: int = 0) -> dict[str, Any]:
    """Every metric of the study on these records (see the module docstring)."""
    rng = np.random.default_rng(seed)
    table = score_table(records, cal)
    if oof_probe is not None:
        for t, s in zip(table, oof_probe, strict=True):  # the probe as if these prompts were unseen
            t["probe"] = s
            t["probe-horizon"] = s * np.array([horizon(i) for i in range(len(s))])
    greedy = [(rec, t) for rec, t in zip(records, table, strict=True) if rec["mode"] == "greedy"]
    sampled = [(rec, t) for rec, t in zip(records, table, strict=True) if rec["mode"] == "sampled"]
    rows: list[dict[str, Any]] = []
    for mode, items in (("greedy", greedy), ("sampled", sampled)):
        if not items:
            continue
        tokens = [len(t["g"]) for _, t in items]
        for rule in (*SCORES, "oracle"):
            # the oracle ranks by beta itself (ties broken at random); the rate's share of drafts, globally
            sel = [t["beta"] + 1e-9 * rng.random(len(t["beta"])) if rule == "oracle" else t[rule] for _, t in items]
            pooled = np.concatenate(sel)
            for rate in BUDGETS:
                thr = float(np.quantile(pooled, 1 - rate))
                chosen = [s >= thr for s in sel]
                row = {"mode": mode, "rule": rule, "budget": rate, "setting": f"top {rate:.0%}",
                       **summarise([greedy_outcome(c, t["g"]) for c, (_, t) in zip(chosen, items, strict=True)],
                                   [c.sum() for c in chosen], tokens, rng),
                       **capture(sel, [t["beta"] for _, t in items], rate, thr, rng)}
                rows.append(row)
        for rate in BUDGETS:
            rows.append({"mode": mode, "rule": "coin", "budget": rate, "setting": f"p={rate:.0%}",
                         **summarise([coin_outcome(rate, t["g"]) for _, t in items],
                                     [rate * n for n in tokens], tokens, rng), "crm": rate, "crm_lo": rate,
                         "crm_hi": rate})
        for name in SCORES:  # the knobs as shipped: thresholds from the calibration
            thr = cal.scale(name).threshold(k, gamma)
            chosen = [t[name] >= thr for _, t in items]
            rows.append({"mode": mode, "rule": name, "budget": None, "setting": f"k={k} γ={gamma:g}",
                         **summarise([greedy_outcome(c, t["g"]) for c, (_, t) in zip(chosen, items, strict=True)],
                                     [c.sum() for c in chosen], tokens, rng),
                         **capture([t[name] for _, t in items], [t["beta"] for _, t in items], 0, thr, rng)})
        for est in ("paper-lookahead", "paper-self"):  # the paper-literal AND rule over its own (k, gamma) grid
            key = "look" if est == "paper-lookahead" else "self"
            for kk in PAPER_GRID["k"]:
                for gg in PAPER_GRID["gamma"]:
                    outs, ups, crm_num, crm_den = [], [], 0.0, 0.0
                    for draw in range(U_DRAWS):
                        for rec, t in items:
                            imp = np.array([r[key][0] >= r[key][1] + gg * r[key][2] and r[key][3] < kk
                                            for r in rec["rows"]])
                            u = np.array([r["u"][draw] for r in rec["rows"]])
                            c = imp & (u > u_th)
                            outs.append(greedy_outcome(c, t["g"]))
                            ups.append(c.sum())
                            crm_num += t["beta"][c].sum()
                            crm_den += t["beta"].sum()
                    rows.append({"mode": mode, "rule": est, "budget": None, "setting": f"k={kk} γ={gg:g}",
                                 **summarise(outs, ups, tokens * U_DRAWS, rng),
                                 "crm": crm_num / max(crm_den, 1e-12), "crm_lo": None, "crm_hi": None})
        for name in SCORES:  # realised upload rate at every k (gamma as given): what a k slider step does
            pooled = np.concatenate([t[name] for _, t in items])
            rows.append({"mode": mode, "rule": name, "budget": None, "setting": "rate by k",
                         "rate_by_k": [float((pooled >= cal.scale(name).threshold(kk, gamma)).mean())
                                       for kk in range(1, WINDOW + 1)]})
        for name in SCORES:
            s = np.concatenate([t[name] for _, t in items])
            g = np.concatenate([t["g"] for _, t in items])
            rows.append({"mode": mode, "rule": name, "budget": None, "setting": "AUROC vs g", "auroc": auroc(s, g)})
    return {"rows": rows, "prompts": len(greedy) or len(sampled),
            "tokens": {m: int(sum(len(t["g"]) for _, t in items)) for m, items in (("greedy", greedy),
                                                                                     ("sampled", sampled))},
            "divergences": int(sum(t["g"].sum() for _, t in greedy)),
            "llm_agreement": float(np.mean([r["llm_agrees"] for rec, _ in greedy for r in rec["rows"]]))
            if greedy else None}


# -------------------------------------------------------------------------------------- end to end (real runs)

def faithful(ids: Sequence[int], reference: Sequence[int]) -> float:
    """Share of the reference reproduced before the first differing token."""
    from hlm.metrics import faithful_prefix  # torch-free import of this module for the CLI's start-up

    return faithful_prefix(ids, reference) / max(len(reference), 1)


def cached_run(decoder: HybridDecoder, runs_dir: Path, prompt: dict[str, str], cfg: RunConfig) -> dict[str, Any]:
    """One real decoder run (text, ids, uploads), cached by prompt and full config so a long check resumes."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps([prompt["prompt"], cfg.to_dict(), decoder.pair.numerics],
                                    sort_keys=True).encode()).hexdigest()
    path = runs_dir / f"{prompt['id']}-{key[:12]}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    text, events, summary = decoder.run(prompt["prompt"], cfg)
    rec = {"text": text, "ids": [e.token_id for e in events], "uploads": summary["uploads"],
           "tokens": summary["tokens"]}
    path.write_text(json.dumps(rec), encoding="utf-8")
    return rec


def sampled_quality(decoder: HybridDecoder, prompts: Sequence[dict[str, str]], out: Path, config: RunConfig,
                    references: int, progress: bool = True) -> dict[str, Any]:
    """At T > 0 one LLM sample is a noisy reference. Per prompt: `references` LLM samples (seeds 1000+i), one
    `hlm` and one `ours` run (seed 0); each scored by its mean BERTScore against every LLM sample. HLM follows
    the LLM's distribution exactly, so its score is the floor of what any policy can reach; the LLM samples
    scored against each other show the spread inside that floor."""
    from tqdm import tqdm

    from hlm.experiments.quality import get_scorer

    runs_dir = out / "quality"
    rows = []
    for p in tqdm(prompts, desc=f"quality T={config.sampling.temperature:g}", unit="prompt", disable=not progress,
                  file=sys.stderr):
        refs = [cached_run(decoder, runs_dir, p, replace(config, sampling=replace(config.sampling, seed=1000 + i))
                           .with_policy(name="llm")) for i in range(references)]
        rows.append({"prompt_id": p["id"], "refs": [r["text"] for r in refs],
                     "hlm": cached_run(decoder, runs_dir, p, config.with_policy(name="hlm")),
                     "ours": cached_run(decoder, runs_dir, p, config)})
    scorer = get_scorer()
    pairs = [(r[arm]["text"], ref) for r in rows for arm in ("hlm", "ours") for ref in r["refs"]]
    pairs += [(a, b) for r in rows for i, a in enumerate(r["refs"]) for j, b in enumerate(r["refs"]) if i != j]
    f1 = iter(scorer.f1([a for a, _ in pairs], [b for _, b in pairs]))
    m = references
    per = []
    for r in rows:
        hlm_f1 = float(np.mean([next(f1) for _ in range(m)]))
        ours_f1 = float(np.mean([next(f1) for _ in range(m)]))
        per.append({"prompt_id": r["prompt_id"], "hlm_f1": hlm_f1, "ours_f1": ours_f1,
                    "ours_upload_rate": r["ours"]["uploads"] / max(r["ours"]["tokens"], 1)})
    llm_vs_llm = [next(f1) for r in rows for _ in range(m * (m - 1))]
    rng = np.random.default_rng(0)
    d = np.array([r["ours_f1"] - r["hlm_f1"] for r in per])
    boot = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(BOOT)]
    return {"per_prompt": per, "references": m, "bertscore": scorer.method, "config": config.to_dict(),
            "summary": {"prompts": len(per), "hlm_f1": float(np.mean([r["hlm_f1"] for r in per])),
                        "ours_f1": float(np.mean([r["ours_f1"] for r in per])), "delta": float(d.mean()),
                        "delta_lo": float(np.percentile(boot, 2.5)), "delta_hi": float(np.percentile(boot, 97.5)),
                        "llm_vs_llm_f1": float(np.mean(llm_vs_llm)), "llm_vs_llm_sd": float(np.std(llm_vs_llm)),
                        "ours_upload_rate": float(np.mean([r["ours_upload_rate"] for r in per]))}}


def confirm(decoder: HybridDecoder, prompts: Sequence[dict[str, str]], references: dict[str, list[int]], out: Path,
            config: RunConfig, coin_seeds: Sequence[int], progress: bool = True) -> dict[str, Any]:
    """Real decoder runs, greedy: `ours` as configured, then per prompt `random` matched to ours' upload count
    (one run per coin seed). Faithful prefix and BERTScore against the LLM's greedy answer y* (the study's)."""
    from tqdm import tqdm

    from hlm.experiments.quality import get_scorer

    tok = decoder.pair.tokenizer
    n = config.sampling.max_new_tokens

    def run(prompt: dict[str, str], cfg: RunConfig) -> dict[str, Any]:
        return cached_run(decoder, out / "confirm", prompt, cfg)

    rows = []
    for p in tqdm(prompts, desc="confirm", unit="prompt", disable=not progress, file=sys.stderr):
        ref = references[p["id"]][:n]
        ours = run(p, config)
        skip = round(1.0 - ours["uploads"] / max(ours["tokens"], 1), 4)
        coins = [run(p, replace(config, sampling=replace(config.sampling, seed=s)).with_policy(
            name="random", skip_rate=skip)) for s in coin_seeds]
        rows.append({"prompt_id": p["id"], "reference": tok.decode(ref, skip_special_tokens=True), "ours": ours,
                     "coins": coins, "ref_ids": ref})
    scorer = get_scorer()
    texts = [r["ours"]["text"] for r in rows] + [c["text"] for r in rows for c in r["coins"]]
    refs = [r["reference"] for r in rows] + [r["reference"] for r in rows for _ in r["coins"]]
    f1 = scorer.f1(texts, refs)
    k = len(coin_seeds)
    per = []
    for i, r in enumerate(rows):
        coin_f1 = f1[len(rows) + i * k: len(rows) + (i + 1) * k]
        per.append({"prompt_id": r["prompt_id"],
                    "ours_upload_rate": r["ours"]["uploads"] / max(r["ours"]["tokens"], 1),
                    "coin_upload_rate": float(np.mean([c["uploads"] / max(c["tokens"], 1) for c in r["coins"]])),
                    "ours_prefix": faithful(r["ours"]["ids"], r["ref_ids"]),
                    "coin_prefix": float(np.mean([faithful(c["ids"], r["ref_ids"]) for c in r["coins"]])),
                    "ours_f1": f1[i], "coin_f1": float(np.mean(coin_f1))})
    return {"per_prompt": per, "summary": paired_summary(per), "bertscore": scorer.method}


def paired_summary(per: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Means, per-prompt paired differences (ours - coin) with bootstrap 95 % intervals and Wilcoxon p-values."""
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"prompts": len(per)}
    for key in ("upload_rate", "prefix", "f1"):
        a = np.array([r[f"ours_{key}"] for r in per])
        b = np.array([r[f"coin_{key}"] for r in per])
        d = a - b
        boot = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(BOOT)]
        out[key] = {"ours": float(a.mean()), "coin": float(b.mean()), "delta": float(d.mean()),
                    "delta_lo": float(np.percentile(boot, 2.5)), "delta_hi": float(np.percentile(boot, 97.5)),
                    "wilcoxon_p": float(wilcoxon(d).pvalue) if np.any(d != 0) else 1.0}
    return out


# ------------------------------------------------------------------------------------------------- decisions

TARGET_RATE = 0.30  # the upload budget the defaults are chosen for (issue: selection at <= 30 % uploads)


def decide(result: dict[str, Any]) -> dict[str, Any]:
    """The default estimator and k from a tuning run: the score with the most first-divergence recall plus
    captured rejection mass at TARGET_RATE (greedy), then the largest k whose realised rate stays within it."""
    at = {r["rule"]: r for r in result["rows"] if r["mode"] == "greedy" and r.get("budget") == TARGET_RATE}
    merit = {name: at[name]["first_divergence_recall"] + at[name]["crm"] for name in SCORES if name in at}
    best = max(merit, key=merit.__getitem__)
    rates = next(r["rate_by_k"] for r in result["rows"] if r["mode"] == "greedy" and r["rule"] == best
                 and r["setting"] == "rate by k")
    k = max((i + 1 for i, rate in enumerate(rates) if rate <= TARGET_RATE), default=1)
    return {"estimator": best, "k": k, "gamma": 0.0, "merit": merit, "rate_by_k": rates,
            "reason": f"{best}: highest first-divergence recall + captured rejection mass at {TARGET_RATE:.0%} "
                      f"uploads (greedy, tuning prompts; the probe scored out of fold); k = {k}: the largest k "
                      f"whose realised upload rate on these prompts stays within {TARGET_RATE:.0%} "
                      f"({rates[k - 1]:.1%}); gamma = 0 leaves the budget to k (gamma is the viewer's strictness)"}


# ------------------------------------------------------------------------------------------------- outputs

def write_outputs(result: dict[str, Any], out: Path) -> None:
    import csv

    rows = result["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / "summary.json").write_text(json.dumps(result, indent=1, default=float) + "\n", encoding="utf-8")
    figures(rows, out)


def figures(rows: Sequence[dict[str, Any]], out: Path) -> None:
    """Capture curves per rule: first-divergence recall and faithful prefix (greedy), captured beta (sampled)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from hlm.experiments.figures import export_png

    panels = (("greedy", "first_divergence_recall", "first divergence caught (greedy)"),
              ("greedy", "faithful_prefix", "faithful prefix (greedy)"),
              ("sampled", "crm", "captured rejection mass (T > 0)"))
    fig = make_subplots(rows=1, cols=3, subplot_titles=[p[2] for p in panels])
    palette = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b", "#bcbd22")
    colours = {"coin": "#d62728", "oracle": "#7f7f7f", **dict(zip(SCORES, palette, strict=False))}
    for col, (mode, metric, _) in enumerate(panels, 1):
        for rule in ("oracle", *SCORES, "coin"):
            pts = sorted((r["budget"], r.get(metric)) for r in rows
                         if r["mode"] == mode and r["rule"] == rule and r["budget"] is not None)
            if not pts or any(v is None for _, v in pts):
                continue
            fig.add_trace(go.Scatter(x=[100 * b for b, _ in pts], y=[v for _, v in pts], mode="lines+markers",
                                     name=rule, legendgroup=rule, showlegend=col == 1,
                                     line={"color": colours[rule],
                                           "dash": "dot" if rule in ("coin", "oracle") else None}),
                          row=1, col=col)
        fig.update_xaxes(title_text="uploads (% of drafts)", row=1, col=col)
    fig.update_layout(title="Which score picks the drafts the cloud would change", template="plotly_white",
                      width=1300, height=480)
    fig.write_html(out / "capture.html", include_plotlyjs="directory")
    error = export_png([fig], [out / "capture.png"], width=1300, height=480)
    if error:
        print(f"[study] capture.png not written: {error}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- report


def _ci(r: dict[str, Any], key: str) -> str:
    v, lo, hi = r.get(key), r.get(f"{key}_lo"), r.get(f"{key}_hi")
    if v is None or v != v:
        return f"{'-':>16}"
    return f"{v:5.3f} [{lo:.2f},{hi:.2f}]" if lo is not None and hi is not None else f"{v:5.3f}{'':11}"


def print_confirm(c: dict[str, Any]) -> None:
    s = c["summary"]
    print(f"end to end on {s['prompts']} prompts (greedy; ours vs a coin matched per prompt, {c['bertscore']}):")
    for key, label in (("upload_rate", "upload rate"), ("prefix", "faithful prefix"), ("f1", "BERTScore F1")):
        m = s[key]
        print(f"  {label:16} ours {m['ours']:.3f}  coin {m['coin']:.3f}  delta {m['delta']:+.3f} "
              f"[{m['delta_lo']:+.3f}, {m['delta_hi']:+.3f}]  Wilcoxon p={m['wilcoxon_p']:.2g}")


def print_report(result: dict[str, Any]) -> None:
    """The matched-budget rows at 10/20/30 %, the shipped knob setting, a few paper-literal settings, AUROCs."""
    print(f"{result['prompts']} prompts, greedy tokens {result['tokens']['greedy']}, divergences "
          f"{result['divergences']}, LLM teacher-forced argmax = y* on {result['llm_agreement'] or 0:.1%}")
    print(f"{'mode':8} {'rule':16} {'setting':12} {'uploads':>8} {'1st-div':>16} {'prefix':>16} {'CRM':>16}")
    for r in result["rows"]:
        if "rate_by_k" in r:
            continue
        if "auroc" in r:
            print(f"{r['mode']:8} {r['rule']:16} AUROC {r['auroc'] if r['auroc'] is not None else float('nan'):.3f}")
        elif r["budget"] in (0.1, 0.2, 0.3) or (r["budget"] is None and not r["rule"].startswith("paper")) or \
                r["setting"] in ("k=4 γ=0", "k=16 γ=0", "k=16 γ=1"):
            print(f"{r['mode']:8} {r['rule']:16} {r['setting']:12} {r['upload_rate']:8.1%} "
                  f"{_ci(r, 'first_divergence_recall')} {_ci(r, 'faithful_prefix')} {_ci(r, 'crm')}")
    if "decisions" in result:
        print(f"decision: {result['decisions']['reason']}")
    if "confirm" in result:
        print_confirm(result["confirm"])
    if "quality" in result:
        q = result["quality"]["summary"]
        print(f"T={result['quality']['config']['sampling']['temperature']:g} on {q['prompts']} prompts, BERTScore "
              f"against {result['quality']['references']} LLM samples each: hlm {q['hlm_f1']:.3f}, ours "
              f"{q['ours_f1']:.3f} at {q['ours_upload_rate']:.1%} uploads, delta {q['delta']:+.3f} "
              f"[{q['delta_lo']:+.3f}, {q['delta_hi']:+.3f}]; LLM samples against each other "
              f"{q['llm_vs_llm_f1']:.3f} (sd {q['llm_vs_llm_sd']:.3f})")
