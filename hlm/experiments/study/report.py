"""The study's outputs: metrics.csv, summary.json, the capture figure, and the report on stdout."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from hlm.experiments.figures import export_png
from hlm.experiments.study.confirm import ROWS
from hlm.experiments.study.score import SCORES


def write_outputs(result: dict[str, Any], out: Path) -> None:
    """metrics.csv (one row per rule and setting), summary.json (everything) and the capture figure."""
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


def _ci(r: dict[str, Any], key: str) -> str:
    v, lo, hi = r.get(key), r.get(f"{key}_lo"), r.get(f"{key}_hi")
    if v is None or v != v:
        return f"{'-':>16}"
    return f"{v:5.3f} [{lo:.2f},{hi:.2f}]" if lo is not None and hi is not None else f"{v:5.3f}{'':11}"


def print_confirm(c: dict[str, Any]) -> None:
    s = c["summary"]
    print(f"end to end on {s['prompts']} prompts (greedy; ours vs a coin matched per prompt, against the LLM alone; "
          f"{c['bertscore']}):")
    for key, label in ROWS:
        if m := s.get(key):
            print(f"  {label:16} ours {m['ours']:.3f}  coin {m['coin']:.3f}  delta {m['delta']:+.3f} "
                  f"[{m['delta_lo']:+.3f}, {m['delta_hi']:+.3f}]  Wilcoxon p={m['wilcoxon_p']:.2g}")
    if "llm_prefix_ystar" in s:
        print(f"  the LLM alone reproduces {s['llm_prefix_ystar']:.3f} of the study's batched y*")


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
        elif r["budget"] in (0.1, 0.2, 0.3) or (r["budget"] is None and r["rule"] in SCORES) or \
                r["setting"] in ("k=4 γ=0", "k=16 γ=0", "k=16 γ=1"):
            print(f"{r['mode']:8} {r['rule']:16} {r['setting']:12} {r['upload_rate']:8.1%} "
                  f"{_ci(r, 'first_divergence_recall')} {_ci(r, 'faithful_prefix')} {_ci(r, 'crm')}")
    if "decisions" in result:
        print(f"decision: {result['decisions']['reason']}")
    if "confirm" in result:
        print_confirm(result["confirm"])
    if "quality" in result:
        print_quality(result["quality"])


def print_quality(quality: dict[str, Any]) -> None:
    q = quality["summary"]
    print(f"T={quality['config']['sampling']['temperature']:g} on {q['prompts']} prompts, BERTScore "
          f"against {quality['references']} LLM samples each: hlm {q['hlm_f1']:.3f}, ours "
          f"{q['ours_f1']:.3f} at {q['ours_upload_rate']:.1%} uploads, delta {q['delta']:+.3f} "
          f"[{q['delta_lo']:+.3f}, {q['delta_hi']:+.3f}]; LLM samples against each other "
          f"{q['llm_vs_llm_f1']:.3f} (sd {q['llm_vs_llm_sd']:.3f})")
