"""The study's metrics, each rule at matched upload budgets with prompt-clustered bootstrap 95 % intervals.

Greedy replay: the faithful prefix (the share of y* reproduced before the first divergence left unverified) and
the recall of the first and of all divergences. Sampled paths: the captured rejection mass sum(beta | selected) /
sum(beta). Against them: a coin at the same rate (in closed form) and an oracle that ranks by beta itself; the
knobs as shipped; the paper-literal rules over their own (k, gamma) grid; AUROC against the divergence label g.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from hlm import importance
from hlm.config import PolicyConfig
from hlm.estimators import REGISTRY, WINDOW, DraftStats, Estimator, SelectionCalibration
from hlm.experiments.study.collect import U_DRAWS
from hlm.experiments.study.outcome import greedy_outcome
from hlm.experiments.study.score import PAPER, SCORES, layer_heads, record_stats, score_table

BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
PAPER_GRID = {"k": (1, 2, 4, 8, 16), "gamma": (0.0, 0.5, 1.0, 2.0)}
ROW_AFTER_PASSES = {1: "self", 2: "look"}  # the attention row a paper-literal estimator reads, by its passes
MODES = ("greedy", "sampled")
BOOT = 1000
TARGET_RATE = 0.30  # the upload budget the defaults are chosen for (issue: selection at <= 30 % uploads)

Items = Sequence[tuple[dict[str, Any], dict[str, np.ndarray]]]  # one mode's records, each with its score table


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
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def _pooled(items: Items, key: str) -> np.ndarray:
    return np.concatenate([t[key] for _, t in items])


def _tokens(items: Items) -> list[int]:
    return [len(t["g"]) for _, t in items]


def _selected(chosen: Sequence[np.ndarray], items: Items, rng: np.random.Generator) -> dict[str, float]:
    """The greedy metrics of uploading the drafts `chosen` in each record."""
    return summarise([greedy_outcome(c, t["g"]) for c, (_, t) in zip(chosen, items, strict=True)],
                     [c.sum() for c in chosen], _tokens(items), rng)


def _budget_rows(mode: str, items: Items, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Every score, and the oracle, at every budget: the rate's share of drafts with the top scores, globally."""
    rows = []
    betas = [t["beta"] for _, t in items]
    for rule in (*SCORES, "oracle"):
        # the oracle ranks by beta itself (ties broken at random)
        sel = [t["beta"] + 1e-9 * rng.random(len(t["beta"])) if rule == "oracle" else t[rule] for _, t in items]
        pooled = np.concatenate(sel)
        for rate in BUDGETS:
            thr = float(np.quantile(pooled, 1 - rate))
            rows.append({"mode": mode, "rule": rule, "budget": rate, "setting": f"top {rate:.0%}",
                         **_selected([s >= thr for s in sel], items, rng), **capture(sel, betas, rate, thr, rng)})
    return rows


def _coin_rows(mode: str, items: Items, rng: np.random.Generator) -> list[dict[str, Any]]:
    tokens = _tokens(items)
    return [{"mode": mode, "rule": "coin", "budget": rate, "setting": f"p={rate:.0%}",
             **summarise([coin_outcome(rate, t["g"]) for _, t in items], [rate * n for n in tokens], tokens, rng),
             "crm": rate, "crm_lo": rate, "crm_hi": rate} for rate in BUDGETS]


def _shipped_rows(mode: str, items: Items, cal: SelectionCalibration, k: int, gamma: float,
                  rng: np.random.Generator) -> list[dict[str, Any]]:
    """Every score at the knobs as shipped: the estimators' own threshold from the calibration."""
    rows = []
    for name in SCORES:
        thr = cal.scale(name).threshold(k, gamma)
        rows.append({"mode": mode, "rule": name, "budget": None, "setting": f"k={k} γ={gamma:g}",
                     **_selected([t[name] >= thr for _, t in items], items, rng),
                     **capture([t[name] for _, t in items], [t["beta"] for _, t in items], 0, thr, rng)})
    return rows


def _paper_outcome(estimator: Estimator, row: str, policy: PolicyConfig, cal: SelectionCalibration, items: Items,
                   drawn: Sequence[Sequence[Sequence[DraftStats]]], rng: np.random.Generator) -> dict[str, Any]:
    """One paper-literal setting, every draft decided by the estimator itself on its attention `row` ("look" or
    "self"), pooled over the draws of u."""
    important = [[importance.decide(*r[row], policy.k, policy.gamma) for r in rec["rows"]] for rec, _ in items]
    outs, ups, crm_num, crm_den = [], [], 0.0, 0.0
    for stats in drawn:
        for (_, t), rec_stats, rec_important in zip(items, stats, important, strict=True):
            c = np.array([estimator.decide(s, imp, policy, cal) for s, imp in zip(rec_stats, rec_important,
                                                                                 strict=True)], dtype=bool)
            outs.append(greedy_outcome(c, t["g"]))
            ups.append(c.sum())
            crm_num += t["beta"][c].sum()
            crm_den += t["beta"].sum()
    return {**summarise(outs, ups, _tokens(items) * len(drawn), rng), "crm": crm_num / max(crm_den, 1e-12),
            "crm_lo": None, "crm_hi": None}


def _paper_rows(mode: str, items: Items, cal: SelectionCalibration, u_th: float,
                rng: np.random.Generator) -> list[dict[str, Any]]:
    """The paper-literal estimators (u > u_th AND important in an attention row) over their own (k, gamma) grid."""
    heads = layer_heads([rec for rec, _ in items], cal)
    drawn = [[record_stats(rec, heads, draw) for rec, _ in items] for draw in range(U_DRAWS)]
    rows = []
    for name in PAPER:
        row = ROW_AFTER_PASSES[REGISTRY[name].passes]
        for k, gamma in itertools.product(PAPER_GRID["k"], PAPER_GRID["gamma"]):
            policy = PolicyConfig(k=k, gamma=gamma, u_th=u_th)
            rows.append({"mode": mode, "rule": name, "budget": None, "setting": f"k={k} γ={gamma:g}",
                         **_paper_outcome(REGISTRY[name], row, policy, cal, items, drawn, rng)})
    return rows


def _rate_by_k_rows(mode: str, items: Items, cal: SelectionCalibration, gamma: float) -> list[dict[str, Any]]:
    """Every score's realised upload rate at every k (gamma as given): what a step of the k slider does."""
    rows = []
    for name in SCORES:
        pooled = _pooled(items, name)
        rows.append({"mode": mode, "rule": name, "budget": None, "setting": "rate by k",
                     "rate_by_k": [float((pooled >= cal.scale(name).threshold(k, gamma)).mean())
                                   for k in range(1, WINDOW + 1)]})
    return rows


def _auroc_rows(mode: str, items: Items) -> list[dict[str, Any]]:
    return [{"mode": mode, "rule": name, "budget": None, "setting": "AUROC vs g",
             "auroc": auroc(_pooled(items, name), _pooled(items, "g"))} for name in SCORES]


def analyse(records: Sequence[dict[str, Any]], cal: SelectionCalibration,
            oof: dict[str, Sequence[np.ndarray]] | None, k: int, gamma: float, u_th: float,
            seed: int = 0) -> dict[str, Any]:
    """Every metric of the study on these records, per mode; `oof` replaces learned scores ("probe", "judge", and
    their horizon-weighted forms) by their out-of-fold scores."""
    rng = np.random.default_rng(seed)
    table = score_table(records, cal)
    for name, scores in (oof or {}).items():
        for t, s in zip(table, scores, strict=True):  # the learned score as if these prompts were unseen
            t[name] = s
            t[f"{name}-horizon"] = s * cal.horizon.weight(np.arange(len(s)), t["log_p_before"])
    by_mode = {mode: [(rec, t) for rec, t in zip(records, table, strict=True) if rec["mode"] == mode]
               for mode in MODES}
    rows: list[dict[str, Any]] = []
    for mode, items in by_mode.items():
        if items:  # in this order: the bootstrap intervals draw from one rng
            rows += [*_budget_rows(mode, items, rng), *_coin_rows(mode, items, rng),
                     *_shipped_rows(mode, items, cal, k, gamma, rng), *_paper_rows(mode, items, cal, u_th, rng),
                     *_rate_by_k_rows(mode, items, cal, gamma), *_auroc_rows(mode, items)]
    greedy = by_mode["greedy"]
    return {"rows": rows, "prompts": len(greedy) or len(by_mode["sampled"]),
            "tokens": {mode: int(sum(_tokens(items))) for mode, items in by_mode.items()},
            "divergences": int(sum(t["g"].sum() for _, t in greedy)),
            "llm_agreement": float(np.mean([r["llm_agrees"] for rec, _ in greedy for r in rec["rows"]]))
            if greedy else None}


def choose_defaults(result: dict[str, Any]) -> dict[str, Any]:
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
