"""Every estimator's score of every studied draft, and the selection calibration fitted on them (`--fit`): the RAUQ
heads, the probe, the judge and every score's scale. The learned scores come with out-of-fold scores (folds by
prompt), so that figures on the tuning prompts are honest too."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier

from hlm.estimators import (
    MIN_P,
    NAMES,
    REGISTRY,
    WINDOW,
    DraftStats,
    Horizon,
    Judge,
    Probe,
    ScoreScale,
    SelectionCalibration,
    feature,
    prompt_key,
)
from hlm.experiments.study.outcome import greedy_outcome

CONFIDENCE = ("ubar", "one_minus_p", "entropy", "margin", "log_one_minus_p", "log_entropy")
PROBE_FEATURES = (*CONFIDENCE, "semantic", "prev_attention", "p_prev", "rauq")
JUDGE_FEATURES = (*CONFIDENCE, "semantic", "p_prev")  # none reads attention
# The judge's candidates, chosen by out-of-fold AUROC on the tuning prompts' greedy drafts: L2 logistic models and
# one-hidden-layer MLPs, each at a few regularisation strengths (the hidden vector has far more inputs than the
# tuning set has divergences).
JUDGE_CANDIDATES: tuple[dict[str, Any], ...] = (
    *({"kind": "logistic", "C": c} for c in (0.0003, 0.001, 0.003, 0.01)),
    *({"kind": "mlp", "width": 32, "alpha": a} for a in (3.0, 10.0, 30.0)),
)
SCORES = tuple(n for n in NAMES if not REGISTRY[n].uses_u_th)
PAPER = tuple(n for n in NAMES if REGISTRY[n].uses_u_th)  # the paper-literal rules: u > u_th AND important
FOLDS = 4  # the probe's out-of-fold scores: prompts split this many ways
# The horizon's grid and the upload budgets at which it is judged (greedy: first-divergence recall + faithful prefix)
# (a floor of 0 would score best on the prefix alone, but would stop uploads late in long answers, where the
# cloud still corrects tokens: the floor stays > 0). tokens = 0 and doubt > 0: the weight falls with the SLM's
# doubt alone, not with the position.
HORIZON_GRID = {"tokens": (0.0, 4.0, 8.0, 16.0, 32.0, 64.0), "floor": (0.05, 0.1, 0.2),
                "doubt": (0.0, 0.125, 0.25, 0.5, 1.0)}
HORIZON_BUDGETS = (0.2, 0.3)


def log_p_before(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """`DraftStats.log_p_before` of every row of an answer: the sum of log p_draft over the rows before it."""
    logp = np.log(np.maximum([r["p_draft"] for r in rows], MIN_P))
    return np.concatenate([[0.0], np.cumsum(logp)[:-1]])


def stats_of(row: dict[str, Any], heads: Sequence[tuple[int, int]], layers: Sequence[int], index: int,
             draw: int = 0, hidden: np.ndarray | None = None, before: float = 0.0) -> DraftStats:
    """One row's `DraftStats` as the device would see them, with the u of one of its independent draws."""
    prev = None
    if row["head_prev"]:
        prev = float(np.mean([row["head_prev"][layers.index(layer)][h] for layer, h in heads]))
    return DraftStats(u=row["u"][draw], ubar=row["ubar"], p_draft=row["p_draft"], p_top=row["p_top"],
                      margin=row["margin"], entropy=row["entropy"], semantic=row["semantic"], prev_attention=prev,
                      p_prev=row["p_prev"], index=index, log_p_before=before, hidden=hidden)


def record_stats(rec: dict[str, Any], heads: Sequence[tuple[int, int]], draw: int = 0) -> list[DraftStats]:
    hidden, before = rec.get("hidden"), log_p_before(rec["rows"])
    return [stats_of(r, heads, rec["heads_layers"], i, draw, None if hidden is None else hidden[i], float(before[i]))
            for i, r in enumerate(rec["rows"])]


def rauq_heads(records: Sequence[dict[str, Any]]) -> tuple[tuple[int, int], ...]:
    """Per middle layer, the head that attends most to the previous token on average (RAUQ's head choice)."""
    rows = [r["head_prev"] for rec in records for r in rec["rows"] if r["head_prev"]]
    layers = records[0]["heads_layers"]
    mean = np.mean(np.asarray(rows), axis=0)  # (layers, heads)
    return tuple((layer, int(mean[j].argmax())) for j, layer in enumerate(layers))


def layer_heads(records: Sequence[dict[str, Any]], cal: SelectionCalibration) -> tuple[tuple[int, int], ...]:
    """The calibration's RAUQ heads, or every head of the recorded layers where it has none."""
    if cal.heads:
        return cal.heads
    rows = next(r["head_prev"] for rec in records for r in rec["rows"] if r["head_prev"])
    return tuple((layer, h) for layer in records[0]["heads_layers"] for h in range(len(rows[0])))


def score_table(records: Sequence[dict[str, Any]], cal: SelectionCalibration) -> list[dict[str, np.ndarray]]:
    """Per record: every score estimator's score per draft, the probe's features, and the labels."""
    heads = layer_heads(records, cal)
    out = []
    for rec in records:
        stats = record_stats(rec, heads)
        t = {name: np.array([REGISTRY[name].score(s, cal) for s in stats]) for name in SCORES}
        t.update({f: np.array([np.nan if (x := feature(s, f)) is None else x for s in stats])
                  for f in PROBE_FEATURES})
        for key in ("g", "beta", "tv"):
            t[key] = np.array([r[key] for r in rec["rows"]], dtype=float)
        t["log_p_before"] = np.array([st.log_p_before for st in stats])
        out.append(t)
    return out


def _folds(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """Each draft's fold: prompts split FOLDS ways, so a prompt's drafts are never scored by a model fitted on it."""
    prompts = sorted({rec["prompt_id"] for rec in records})
    fold = {p: i % FOLDS for i, p in enumerate(prompts)}
    return np.concatenate([[fold[rec["prompt_id"]]] * len(rec["rows"]) for rec in records])


def _out_of_fold(owner: np.ndarray, fit: Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]]) -> np.ndarray:
    """Scores of every draft by the model `fit(rows)` fitted without its fold."""
    oof = np.zeros(len(owner))
    for f in range(FOLDS):
        oof[owner == f] = fit(owner != f)(owner == f)
    return oof


def _inputs(table: Sequence[dict[str, np.ndarray]], features: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Standardised-ready inputs (missing scalars imputed by their mean) and the greedy-divergence labels g."""
    x = np.vstack([np.column_stack([t[f] for f in features]) for t in table])
    y = np.concatenate([t["g"] for t in table])
    if len(set(y.tolist())) < 2:
        raise ValueError("cannot fit: every draft agrees with the LLM, or none does; study more prompts")
    return np.where(np.isnan(x), np.nanmean(x, axis=0), x), y


def _fit_probe(records: Sequence[dict[str, Any]], table: Sequence[dict[str, np.ndarray]]) -> tuple[Probe, np.ndarray]:
    """The probe (L2 logistic regression on the greedy-divergence labels g of every mode) on all drafts, and its
    out-of-fold scores."""
    x, y = _inputs(table, PROBE_FEATURES)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = (x - mean) / scale

    def fit(rows: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        model = LogisticRegression(C=1.0, max_iter=2000).fit(z[rows], y[rows])
        return lambda test: model.predict_proba(z[test])[:, 1]

    model = LogisticRegression(C=1.0, max_iter=2000).fit(z, y)
    probe = Probe(PROBE_FEATURES, tuple(map(float, mean)), tuple(map(float, scale)),
                  tuple(map(float, model.coef_[0])), float(model.intercept_[0]))
    return probe, _out_of_fold(_folds(records), fit)


def _judge_model(spec: dict[str, Any], seed: int = 0) -> LogisticRegression | MLPClassifier:
    if spec["kind"] == "logistic":
        return LogisticRegression(C=spec["C"], max_iter=3000)
    return MLPClassifier((spec["width"],), alpha=spec["alpha"], max_iter=300, early_stopping=True,
                         n_iter_no_change=10, random_state=seed)


def _fit_judge(records: Sequence[dict[str, Any]], table: Sequence[dict[str, np.ndarray]],
               greedy: np.ndarray) -> tuple[Judge, np.ndarray, list[dict[str, Any]]]:
    """The judge on the drafter's hidden state and JUDGE_FEATURES: each candidate's out-of-fold AUROC on the greedy
    drafts, the best one refitted on all drafts; its out-of-fold scores and every candidate's AUROC."""
    scalars, y = _inputs(table, JUDGE_FEATURES)
    x = np.hstack([scalars, np.vstack([rec["hidden"] for rec in records]).astype(np.float32)])
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = ((x - mean) / scale).astype(np.float32)
    owner = _folds(records)
    tried = []
    for spec in JUDGE_CANDIDATES:
        def fit(rows: np.ndarray, spec: dict[str, Any] = spec) -> Callable[[np.ndarray], np.ndarray]:
            model = _judge_model(spec).fit(z[rows], y[rows])
            return lambda test: model.predict_proba(z[test])[:, 1]

        oof = _out_of_fold(owner, fit)
        tried.append({**spec, "oof_auroc_greedy": float(roc_auc_score(y[greedy], oof[greedy])), "oof": oof})
    best = max(tried, key=lambda t: t["oof_auroc_greedy"])
    model = _judge_model(best).fit(z, y)
    if isinstance(model, LogisticRegression):
        weights, biases = (model.coef_.T,), (model.intercept_,)
    else:
        weights, biases = tuple(model.coefs_), tuple(model.intercepts_)
    spec = {k: v for k, v in best.items() if k != "oof"}
    judge = Judge(JUDGE_FEATURES, mean.astype(np.float32), scale.astype(np.float32),
                  tuple(w.astype(np.float32) for w in weights), tuple(b.astype(np.float32) for b in biases),
                  note=f"{json.dumps(spec)}; inputs: {', '.join(JUDGE_FEATURES)} + the final hidden state "
                       f"({x.shape[1] - len(JUDGE_FEATURES)}); {len(y)} drafts, {int(y.sum())} divergences")
    return judge, best["oof"], [{k: v for k, v in t.items() if k != "oof"} for t in tried]


def _fit_horizon(records: Sequence[dict[str, Any]], table: Sequence[dict[str, np.ndarray]],
                 bases: dict[str, np.ndarray]) -> tuple[Horizon, dict[str, Any]]:
    """The horizon that best turns a per-draft chance into an upload order: for each grid point and each base score
    (ubar, and the learned ones out of fold), first-divergence recall + faithful prefix of the greedy answers at
    HORIZON_BUDGETS (each budget's share of drafts with the top weighted scores); the best point of the best base.
    `table`: the records' score table (`score_table`), whose labels and `log_p_before` it reads."""
    greedy = [i for i, rec in enumerate(records) if rec["mode"] == "greedy"]
    g = [table[i]["g"] for i in greedy]
    along = [(np.arange(len(table[i]["g"])), table[i]["log_p_before"]) for i in greedy]
    best: tuple[float, Horizon, str] = (-1.0, Horizon(), "")
    for tokens, floor, doubt in itertools.product(*HORIZON_GRID.values()):
        h = Horizon(tokens, floor, doubt)
        if not tokens and not doubt:
            continue  # no horizon at all
        for name, base in bases.items():
            weighted = [base[i] * h.weight(*a) for i, a in zip(greedy, along, strict=True)]
            pooled, merit = np.concatenate(weighted), 0.0
            for rate in HORIZON_BUDGETS:
                thr = np.quantile(pooled, 1 - rate)
                outs = [greedy_outcome(w >= thr, y) for w, y in zip(weighted, g, strict=True)]
                merit += np.mean([o[0] for o in outs]) + np.mean([o[1] for o in outs if o[1] is not None])
            if merit > best[0]:
                best = (float(merit), h, name)
    return best[1], {"base": best[2], "merit": best[0] / len(HORIZON_BUDGETS), **asdict(best[1])}


def fit_calibration(records: Sequence[dict[str, Any]], note: str, tuned_on: Sequence[str] = ()
                    ) -> tuple[SelectionCalibration, dict[str, list[np.ndarray]]]:
    """RAUQ heads, the probe, the judge (where the records hold hidden states) and every score's scale (its
    quantiles at j / WINDOW and its std) on these records. Returns also the learned scores' out-of-fold scores per
    record ("probe", "judge"), for honest tuning-set figures."""
    heads = rauq_heads(records)
    table = score_table(records, SelectionCalibration(heads=heads))
    probe, oof_probe = _fit_probe(records, table)
    oof = {"probe": oof_probe}
    judge = None
    if all(rec.get("hidden") is not None for rec in records):
        greedy = np.concatenate([[rec["mode"] == "greedy"] * len(rec["rows"]) for rec in records])
        judge, oof["judge"], tried = _fit_judge(records, table, greedy)
        note += f"; judge candidates (out-of-fold AUROC, greedy): {json.dumps(tried)}"
    splits = np.cumsum([len(t["g"]) for t in table])[:-1]
    bases = {"ubar": [t["ubar"] for t in table], **{name: np.split(s, splits) for name, s in oof.items()}}
    horizon, chosen = _fit_horizon(records, table, bases)
    note += f"; horizon (recall + prefix at {list(HORIZON_BUDGETS)}, greedy, out of fold): {json.dumps(chosen)}"
    cal = SelectionCalibration(heads=heads, probe=probe, note=note, tuned_on=tuple(sorted(map(prompt_key, tuned_on))),
                               horizon=horizon, judge=judge)
    table = score_table(records, cal)
    scales = {}
    for name in SCORES:
        s = np.concatenate([t[name] for t in table])
        scales[name] = ScoreScale(tuple(float(v) for v in np.quantile(s, np.arange(WINDOW + 1) / WINDOW)),
                                  float(s.std()))
    return replace(cal, scales=scales), {name: np.split(s, splits) for name, s in oof.items()}
