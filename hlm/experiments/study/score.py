"""Every estimator's score of every studied draft, and the selection calibration fitted on them (`--fit`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from hlm.estimators import (
    NAMES,
    REGISTRY,
    WINDOW,
    DraftStats,
    Probe,
    ScoreScale,
    SelectionCalibration,
    feature,
    prompt_key,
)

PROBE_FEATURES = ("ubar", "one_minus_p", "entropy", "margin", "semantic", "prev_attention", "p_prev", "rauq")
SCORES = tuple(n for n in NAMES if not REGISTRY[n].uses_u_th)
PAPER = tuple(n for n in NAMES if REGISTRY[n].uses_u_th)  # the paper-literal rules: u > u_th AND important
FOLDS = 4  # the probe's out-of-fold scores: prompts split this many ways


def stats_of(row: dict[str, Any], heads: Sequence[tuple[int, int]], layers: Sequence[int], index: int,
             draw: int = 0) -> DraftStats:
    """One row's `DraftStats` as the device would see them, with the u of one of its independent draws."""
    prev = None
    if row["head_prev"]:
        prev = float(np.mean([row["head_prev"][layers.index(layer)][h] for layer, h in heads]))
    return DraftStats(u=row["u"][draw], ubar=row["ubar"], p_draft=row["p_draft"], p_top=row["p_top"],
                      margin=row["margin"], entropy=row["entropy"], semantic=row["semantic"], prev_attention=prev,
                      p_prev=row["p_prev"], index=index)


def record_stats(rec: dict[str, Any], heads: Sequence[tuple[int, int]], draw: int = 0) -> list[DraftStats]:
    return [stats_of(r, heads, rec["heads_layers"], i, draw) for i, r in enumerate(rec["rows"])]


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
        out.append(t)
    return out


def _fit_probe(records: Sequence[dict[str, Any]], table: Sequence[dict[str, np.ndarray]]) -> tuple[Probe, np.ndarray]:
    """The probe (L2 logistic regression on the greedy-divergence labels g of every mode) on all drafts, and its
    out-of-fold scores (FOLDS folds by prompt)."""
    x = np.vstack([np.column_stack([t[f] for f in PROBE_FEATURES]) for t in table])
    y = np.concatenate([t["g"] for t in table])
    if len(set(y.tolist())) < 2:
        raise ValueError("cannot fit the probe: every draft agrees with the LLM, or none does; study more prompts")
    mean = np.nanmean(x, axis=0)
    x = np.where(np.isnan(x), mean, x)
    scale = x.std(axis=0) + 1e-9

    def fit(rows: np.ndarray) -> LogisticRegression:
        return LogisticRegression(C=1.0, max_iter=2000).fit((x[rows] - mean) / scale, y[rows])

    prompts = sorted({rec["prompt_id"] for rec in records})
    fold = {p: i % FOLDS for i, p in enumerate(prompts)}
    owner = np.concatenate([[fold[rec["prompt_id"]]] * len(rec["rows"]) for rec in records])
    oof = np.zeros(len(y))
    for f in range(FOLDS):
        oof[owner == f] = fit(owner != f).predict_proba((x[owner == f] - mean) / scale)[:, 1]
    model = fit(np.ones(len(y), dtype=bool))
    probe = Probe(PROBE_FEATURES, tuple(map(float, mean)), tuple(map(float, scale)),
                  tuple(map(float, model.coef_[0])), float(model.intercept_[0]))
    return probe, oof


def fit_calibration(records: Sequence[dict[str, Any]], note: str,
                    tuned_on: Sequence[str] = ()) -> tuple[SelectionCalibration, list[np.ndarray]]:
    """RAUQ heads, the probe and every score's scale (its quantiles at j / WINDOW and its std) on these records.
    Returns also the probe's out-of-fold scores per record, for honest tuning-set figures."""
    heads = rauq_heads(records)
    probe, oof = _fit_probe(records, score_table(records, SelectionCalibration(heads=heads)))
    cal = SelectionCalibration(heads=heads, probe=probe, note=note, tuned_on=tuple(sorted(map(prompt_key, tuned_on))))
    table = score_table(records, cal)
    scales = {}
    for name in SCORES:
        s = np.concatenate([t[name] for t in table])
        scales[name] = ScoreScale(tuple(float(v) for v in np.quantile(s, np.arange(WINDOW + 1) / WINDOW)),
                                  float(s.std()))
    splits = np.cumsum([len(t["g"]) for t in table])[:-1]
    return replace(cal, scales=scales), np.split(oof, splits)
