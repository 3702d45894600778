"""End to end: real decoder runs (cached) of the subject policy, its control and its counterfactual, scored against
the reference policy's answers (`hlm.policies` roles), with paired bootstrap intervals."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import wilcoxon
from tqdm import tqdm

from hlm.experiments.quality import get_scorer
from hlm.experiments.study.metrics import BOOT
from hlm.metrics import faithful_prefix
from hlm.policies import with_role

if TYPE_CHECKING:
    from hlm.config import RunConfig
    from hlm.decoder import HybridDecoder
    from hlm.experiments.workers import Workers


# The paired rows of the end-to-end summary, as the report and the Evidence tab print them
ROWS = (("upload_rate", "upload rate"), ("prefix", "faithful prefix"), ("f1", "BERTScore F1"),
        ("prefix_ystar", "faithful prefix against the study's batched y*"))


def faithful(ids: Sequence[int], reference: Sequence[int]) -> float:
    """Share of the reference reproduced before the first differing token."""
    return faithful_prefix(ids, reference) / max(len(reference), 1)


def decoded_run(decoder: HybridDecoder, item: tuple[dict[str, str], RunConfig]) -> dict[str, Any]:
    """A `Workers` task: one real decoder run as the study keeps it (text, ids, uploads)."""
    prompt, cfg = item
    text, events, summary = decoder.run(prompt["prompt"], cfg)
    return {"text": text, "ids": [e.token_id for e in events], "uploads": summary["uploads"],
            "tokens": summary["tokens"]}


def cached_runs(workers: Workers, runs_dir: Path, jobs: Sequence[tuple[dict[str, str], RunConfig]], desc: str,
                progress: bool = True) -> list[dict[str, Any] | None]:
    """Real decoder runs (text, ids, uploads) in `jobs` order, cached by prompt, full config and
    `PairFacts.run_key` so a long check resumes; None for a run that failed (reported here: the caller leaves its
    prompt out)."""
    runs_dir.mkdir(parents=True, exist_ok=True)

    def path(job: tuple[dict[str, str], RunConfig]) -> Path:
        prompt, cfg = job
        key = hashlib.sha256(json.dumps([prompt["prompt"], cfg.to_dict(), *workers.facts.run_key(cfg)],
                                        sort_keys=True).encode()).hexdigest()
        return runs_dir / f"{prompt['id']}-{key[:12]}.json"

    paths = [path(job) for job in jobs]
    todo = [job for p, job in zip(paths, jobs, strict=True) if not p.is_file()]
    with tqdm(total=len(todo), desc=desc, unit="run", disable=not progress or not todo, file=sys.stderr) as bar:
        for outcome in workers.map(decoded_run, todo, bar):
            if outcome.error is None:
                path(outcome.item).write_text(json.dumps(outcome.result), encoding="utf-8")
            else:
                tqdm.write(f"[study] {outcome.item[0]['id']} failed: {outcome.error}", file=sys.stderr)
    return [json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None for p in paths]


def _seeded(config: RunConfig, seed: int) -> RunConfig:
    return replace(config, sampling=replace(config.sampling, seed=seed))


def _upload_rate(run: dict[str, Any]) -> float:
    return run["uploads"] / max(run["tokens"], 1)


def _interval(d: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """Bootstrap 95 % interval of the mean of the per-prompt differences d."""
    boot = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(BOOT)]
    return float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def _quality_runs(workers: Workers, prompts: Sequence[dict[str, str]], runs_dir: Path, config: RunConfig,
                  references: int, progress: bool) -> list[dict[str, Any]]:
    """Per prompt: the reference's texts (seeds 1000+i), the counterfactual's run and the subject's (`config`);
    prompts with a failed run are left out."""
    arms = [_seeded(config, 1000 + i).with_policy(name=with_role("reference")) for i in range(references)]
    arms += [config.with_policy(name=with_role("counterfactual")), config]
    runs = cached_runs(workers, runs_dir, [(p, cfg) for p in prompts for cfg in arms],
                       f"quality T={config.sampling.temperature:g}", progress)
    rows = []
    for i, p in enumerate(prompts):
        mine = runs[i * len(arms):(i + 1) * len(arms)]
        if all(r is not None for r in mine):
            rows.append({"prompt_id": p["id"], "refs": [r["text"] for r in mine[:references]],
                         "counterfactual": mine[-2], "subject": mine[-1]})
    return rows


def sampled_quality(workers: Workers, prompts: Sequence[dict[str, str]], out: Path, config: RunConfig,
                    references: int, progress: bool = True) -> dict[str, Any]:
    """At T > 0 one sample of the reference (the LLM) is a noisy yardstick. Per prompt: `references` LLM samples,
    one counterfactual run (`hlm`) and one of the subject (`config`; seed 0), each scored by its mean BERTScore
    against every LLM sample. HLM follows the LLM's distribution exactly, so its score is the floor of what any
    policy can reach; the LLM samples scored against each other show the spread inside that floor."""
    rows = _quality_runs(workers, prompts, out / "quality", config, references, progress)
    scorer = get_scorer()
    pairs = [(r[arm]["text"], ref) for r in rows for arm in ("counterfactual", "subject") for ref in r["refs"]]
    pairs += [(a, b) for r in rows for i, a in enumerate(r["refs"]) for j, b in enumerate(r["refs"]) if i != j]
    f1 = iter(scorer.f1([a for a, _ in pairs], [b for _, b in pairs]))
    m = references
    per = []
    for r in rows:
        hlm_f1 = float(np.mean([next(f1) for _ in range(m)]))
        ours_f1 = float(np.mean([next(f1) for _ in range(m)]))
        per.append({"prompt_id": r["prompt_id"], "hlm_f1": hlm_f1, "ours_f1": ours_f1,
                    "ours_upload_rate": _upload_rate(r["subject"])})
    llm_vs_llm = [next(f1) for r in rows for _ in range(m * (m - 1))]
    d = np.array([r["ours_f1"] - r["hlm_f1"] for r in per])
    lo, hi = _interval(d, np.random.default_rng(0))
    return {"per_prompt": per, "references": m, "bertscore": scorer.method, "config": config.to_dict(),
            "summary": {"prompts": len(per), "hlm_f1": float(np.mean([r["hlm_f1"] for r in per])),
                        "ours_f1": float(np.mean([r["ours_f1"] for r in per])), "delta": float(d.mean()),
                        "delta_lo": lo, "delta_hi": hi,
                        "llm_vs_llm_f1": float(np.mean(llm_vs_llm)), "llm_vs_llm_sd": float(np.std(llm_vs_llm)),
                        "ours_upload_rate": float(np.mean([r["ours_upload_rate"] for r in per]))}}


def confirm(workers: Workers, prompts: Sequence[dict[str, str]], references: dict[str, list[int]], out: Path,
            config: RunConfig, coin_seeds: Sequence[int], progress: bool = True) -> dict[str, Any]:
    """Real decoder runs, greedy: the subject (`config`), then per prompt the control matched to its upload count
    (one run per coin seed) and the reference (the LLM alone). Faithful prefix and BERTScore against the reference's
    own run: the same verifier and kernels as the cloud a hybrid run calls. The study's y* (`references`) comes from
    one batched, left-padded generation, which breaks a few near-ties differently; the prefixes against it are kept
    too (`prefix_ystar`), with how much of y* the LLM alone reproduces (`llm_prefix_ystar`)."""
    runs_dir = out / "confirm"
    subjects = cached_runs(workers, runs_dir, [(p, config) for p in prompts], "confirm: ours", progress)
    kept = [(p, s) for p, s in zip(prompts, subjects, strict=True) if s is not None]
    coin_jobs = [(p, _seeded(config, seed).with_policy(name=with_role("control"),
                                                        skip_rate=round(1.0 - _upload_rate(s), 4)))
                 for p, s in kept for seed in coin_seeds]
    coins = cached_runs(workers, runs_dir, coin_jobs, "confirm: coins", progress)
    llms = cached_runs(workers, runs_dir, [(p, config.with_policy(name=with_role("reference"))) for p, _ in kept],
                       "confirm: the LLM alone", progress)
    rows, k = [], len(coin_seeds)
    for i, (p, subject) in enumerate(kept):
        mine = coins[i * k:(i + 1) * k]
        if llms[i] is not None and all(c is not None for c in mine):
            rows.append({"prompt_id": p["id"], "llm": llms[i], "subject": subject, "coins": mine,
                         "ystar": references[p["id"]][: config.sampling.max_new_tokens]})
    scorer = get_scorer()
    texts = [r["subject"]["text"] for r in rows] + [c["text"] for r in rows for c in r["coins"]]
    refs = [r["llm"]["text"] for r in rows] + [r["llm"]["text"] for r in rows for _ in r["coins"]]
    f1 = scorer.f1(texts, refs)
    per = []
    for i, r in enumerate(rows):
        coin_f1 = f1[len(rows) + i * k: len(rows) + (i + 1) * k]
        ref, ystar = r["llm"]["ids"], r["ystar"]
        per.append({"prompt_id": r["prompt_id"], "ours_upload_rate": _upload_rate(r["subject"]),
                    "coin_upload_rate": float(np.mean([_upload_rate(c) for c in r["coins"]])),
                    "ours_prefix": faithful(r["subject"]["ids"], ref),
                    "coin_prefix": float(np.mean([faithful(c["ids"], ref) for c in r["coins"]])),
                    "ours_prefix_ystar": faithful(r["subject"]["ids"], ystar),
                    "coin_prefix_ystar": float(np.mean([faithful(c["ids"], ystar) for c in r["coins"]])),
                    "llm_prefix_ystar": faithful(ref, ystar),
                    "ours_f1": f1[i], "coin_f1": float(np.mean(coin_f1))})
    summary = {**paired_summary(per), "llm_prefix_ystar": float(np.mean([r["llm_prefix_ystar"] for r in per]))}
    return {"per_prompt": per, "summary": summary, "bertscore": scorer.method}


def paired_summary(per: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Means, per-prompt paired differences (ours - coin) with bootstrap 95 % intervals and Wilcoxon p-values."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"prompts": len(per)}
    for key, _ in ROWS:
        arms = {arm: np.array([r[f"{arm}_{key}"] for r in per]) for arm in ("ours", "coin")}  # the files' field names
        d = arms["ours"] - arms["coin"]
        lo, hi = _interval(d, rng)
        out[key] = {**{arm: float(v.mean()) for arm, v in arms.items()}, "delta": float(d.mean()),
                    "delta_lo": lo, "delta_hi": hi,
                    "wilcoxon_p": float(wilcoxon(d).pvalue) if np.any(d != 0) else 1.0}
    return out
