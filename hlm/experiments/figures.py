"""The sweep's figures (plotly): interactive HTML, plus PNG for the docs where a Chrome is available.

All four are drawn from the summary rows of `hlm.experiments.sweep.aggregate` (mean and 95 % CI over prompts per
policy and setting), so every point on a figure is a row of summary.csv:
- pareto: device-energy saving vs BERTScore, every policy and (k, gamma) point, each ours setting joined to its
  random-skip control at the same upload rate;
- upload_heatmap: ours' upload rate over the k x gamma grid, one panel per estimator;
- throughput: tokens/s with the modelled link vs upload rate;
- energy_breakdown: device energy per token split into compute, radio and idle, per policy and setting.

PNG export uses kaleido 1.x, which drives a Chrome/Chromium found by choreographer: the `BROWSER_PATH`
environment variable if set, else `chromium`, `google-chrome`, ... on PATH. We point it at Debian's
/usr/bin/chromium when nothing else is set. Without a browser the HTML is still written and the error reported.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from hlm.policies import REGISTRY, Policy, role_of, with_role

DEBIAN_CHROMIUM = "/usr/bin/chromium"
ESTIMATOR_COLOURS = ("#1f77b4", "#2ca02c", "#17becf", "#bcbd22", "#e377c2", "#8c564b")  # when a policy has several
PARTS = (("compute_j_per_token", "SLM compute"), ("radio_j_per_token", "radio (uplink)"),
         ("idle_j_per_token", "idle while waiting"))
SIZE = {"width": 1000, "height": 620}


def _groups(summary: Sequence[dict[str, Any]]) -> Iterator[tuple[str, Policy, list[dict[str, Any]], dict[str, Any]]]:
    """(legend name, policy, rows, marker style) per policy, one per estimator for a policy that asks one; the
    reference (the yardstick, not a point on the trade-off) left out."""
    names: dict[str, list[dict[str, Any]]] = {}
    for r in summary:
        policy = REGISTRY[r["policy"]]
        if policy.role != "reference":
            names.setdefault(f"{policy.name} {r['estimator']}" if policy.uses_estimator else policy.name, []).append(r)
    split = [name for name, rows in names.items() if REGISTRY[rows[0]["policy"]].uses_estimator]
    for name, rows in names.items():
        policy = REGISTRY[rows[0]["policy"]]
        colour = ESTIMATOR_COLOURS[split.index(name) % len(ESTIMATOR_COLOURS)] if len(split) > 1 and name in split \
            else policy.colour
        symbol = "x" if policy.uses_coin else "circle" if policy.uses_estimator else "diamond"
        yield name, policy, rows, {"color": colour, "symbol": symbol, "size": 10}


def _xy(rows: Sequence[dict[str, Any]], x: str, y: str, x_scale: float = 1.0,
        y_scale: float = 1.0) -> dict[str, Any]:
    """Scatter arguments for mean ± CI of two metrics."""
    def values(m: str, part: str, scale: float) -> list[float | None]:
        return [r[f"{m}_{part}"] * scale if r[f"{m}_{part}"] is not None else None for r in rows]

    return {"x": values(x, "mean", x_scale), "y": values(y, "mean", y_scale),
            "error_x": {"type": "data", "array": values(x, "ci95", x_scale), "thickness": 1},
            "error_y": {"type": "data", "array": values(y, "ci95", y_scale), "thickness": 1}}


def _hover(r: dict[str, Any]) -> str:
    saving = r["energy_saving_mean"]
    return (f"{r['policy']} {r['setting']}<br>upload rate {r['upload_rate_mean']:.1%}<br>energy saving "
            f"{saving if saving is None else f'{saving:.1%}'}<br>BERTScore {r['bertscore_f1_mean']:.3f}<br>"
            f"{r['tokens_per_s_modelled_link_mean']:.2f} tok/s (modelled link)<br>{r['n_prompts']} prompts")


def _n_prompts(summary: Sequence[dict[str, Any]]) -> int:
    return max((r["n_prompts"] for r in summary), default=0)


def pareto(summary: Sequence[dict[str, Any]], decisions: dict[str, Any] | None = None) -> go.Figure:
    fig = go.Figure()
    hybrid = [r for r in summary if role_of(r["policy"]) != "reference" and r["energy_saving_mean"] is not None
              and r["bertscore_f1_mean"] is not None]
    for name, policy, rows, marker in _groups(hybrid):
        text = [f"k={r['k']} γ={r['gamma']:g}" for r in rows] if policy.uses_estimator else None
        fig.add_trace(go.Scatter(name=name, mode="markers+text" if text else "markers", text=text,
                                 textposition="top center", textfont={"size": 9}, marker=marker,
                                 hovertext=[_hover(r) for r in rows], hoverinfo="text",
                                 **_xy(rows, "bertscore_f1", "energy_saving", y_scale=100)))
    # Each subject setting joined to its control (same upload rate): the line shows what importance adds.
    control = {r["setting"]: r for r in hybrid if role_of(r["policy"]) == "control"}
    xs: list[float | None] = []
    ys: list[float | None] = []
    for r in hybrid:
        if role_of(r["policy"]) == "subject" and r["setting"] in control:
            c = control[r["setting"]]
            xs += [r["bertscore_f1_mean"], c["bertscore_f1_mean"], None]
            ys += [r["energy_saving_mean"] * 100, c["energy_saving_mean"] * 100, None]
    if xs:
        pair = f"{with_role('subject')} ↔ {with_role('control')} at equal upload rate"
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=pair,
                                 line={"color": "#bbbbbb", "dash": "dot", "width": 1}, hoverinfo="skip"))
    front = []
    for r in sorted(hybrid, key=lambda r: -r["bertscore_f1_mean"]):
        if not front or r["energy_saving_mean"] > front[-1]["energy_saving_mean"]:
            front.append(r)
    fig.add_trace(go.Scatter(x=[r["bertscore_f1_mean"] for r in front],
                             y=[r["energy_saving_mean"] * 100 for r in front], mode="lines", name="Pareto front",
                             line={"color": "#444444", "dash": "dash", "width": 1}, hoverinfo="skip"))
    picks: dict[str, tuple[dict[str, Any], list[str]]] = {}  # one label per point, naming every pick there
    for key in ("accuracy_leaning", "energy_leaning"):
        pick = (decisions or {}).get(key)
        if pick:
            picks.setdefault(pick["setting"], (pick, []))[1].append(key.split("_")[0])
    for pick, names in picks.values():
        fig.add_annotation(x=pick["bertscore_f1_mean"], y=pick["energy_saving_mean"] * 100,
                           text=" & ".join(names) + "-leaning", showarrow=True, arrowhead=2, ax=40, ay=-40)
    fig.update_layout(title=f"Device-energy saving vs quality (mean ± 95% CI over {_n_prompts(summary)} prompts)",
                      xaxis_title="BERTScore F1 against the LLM-only output",
                      yaxis_title="device-energy saving vs HLM (%)", template="plotly_white")
    return fig


def upload_heatmap(summary: Sequence[dict[str, Any]]) -> go.Figure:
    subject = with_role("subject")
    ours = [r for r in summary if r["policy"] == subject]
    estimators = list(dict.fromkeys(r["estimator"] for r in ours)) or [f"(no {subject} runs)"]
    ks = sorted({r["k"] for r in ours})
    gammas = sorted({r["gamma"] for r in ours})
    fig = make_subplots(rows=1, cols=len(estimators), subplot_titles=estimators, shared_yaxes=True)
    for col, est in enumerate(estimators, 1):
        cell = {(r["k"], r["gamma"]): r["upload_rate_mean"] * 100 for r in ours if r["estimator"] == est}
        fig.add_trace(go.Heatmap(x=[str(k) for k in ks], y=[f"{g:g}" for g in gammas],
                                 z=[[cell.get((k, g)) for k in ks] for g in gammas], coloraxis="coloraxis",
                                 texttemplate="%{z:.1f}%", hovertemplate="k=%{x} γ=%{y}: %{z:.1f}%<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="k (top-k rank bound)", type="category", row=1, col=col)
    fig.update_yaxes(title_text="γ (threshold strictness)", type="category", row=1, col=1)
    fig.update_layout(title=f"Upload rate of {subject} over k × γ (mean over prompts)", template="plotly_white",
                      coloraxis={"colorscale": "Viridis", "colorbar": {"title": "upload %"}})
    return fig


def throughput(summary: Sequence[dict[str, Any]]) -> go.Figure:
    fig = go.Figure()
    for name, _, rows, marker in _groups(summary):
        fig.add_trace(go.Scatter(name=name, mode="markers", marker=marker, hovertext=[_hover(r) for r in rows],
                                 hoverinfo="text", **_xy(rows, "upload_rate", "tokens_per_s_modelled_link",
                                                         x_scale=100)))
    reference = with_role("reference")
    llm = next((r for r in summary if r["policy"] == reference), None)
    if llm:
        fig.add_hline(y=llm["tokens_per_s_modelled_link_mean"], line_dash="dot", line_color=REGISTRY[reference].colour,
                      annotation_text="LLM only (cloud generates every token)")
    fig.update_layout(title="Throughput vs upload rate (modelled link: device compute + uplink + cloud + downlink)",
                      xaxis_title="upload rate (%)", yaxis_title="tokens/s with the modelled link",
                      template="plotly_white")
    return fig


def energy_breakdown(summary: Sequence[dict[str, Any]]) -> go.Figure:
    rows = sorted(summary, key=lambda r: list(REGISTRY).index(r["policy"]))
    labels = [r["policy"] if r["setting"] == "-" else f"{r['policy']} {r['setting']}" for r in rows]
    fig = go.Figure([go.Bar(name=title, x=labels, y=[r[f"{part}_mean"] for r in rows],
                            hovertemplate="%{x}: %{y:.4f} J/token<extra>" + title + "</extra>")
                     for part, title in PARTS])
    fig.update_layout(barmode="stack", title="Device energy per token by part (mean over prompts)",
                      yaxis_title="J per token", xaxis_tickangle=-45, template="plotly_white")
    return fig


def export_png(figs: Sequence[go.Figure], paths: Sequence[Path], width: int, height: int) -> str | None:
    """Write each figure as PNG through kaleido; returns why not (no browser, ...) instead of raising."""
    if "BROWSER_PATH" not in os.environ and Path(DEBIAN_CHROMIUM).is_file():
        os.environ["BROWSER_PATH"] = DEBIAN_CHROMIUM
    try:
        pio.write_images(list(figs), list(paths), width=width, height=height)
    except Exception as exc:  # noqa: BLE001 - no browser, kaleido missing, ...: the HTML is still there
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def save_figures(figs: dict[str, go.Figure], out_dir: Path, png: bool = True) -> dict[str, Any]:
    """Write NAME.html per figure (plotly.min.js once beside them, so the folder works offline) and NAME.png.
    Returns the paths written and, if PNG export failed, why."""
    out_dir.mkdir(parents=True, exist_ok=True)
    html = []
    for name, fig in figs.items():
        path = out_dir / f"{name}.html"
        fig.write_html(path, include_plotlyjs="directory")
        html.append(str(path))
    result: dict[str, Any] = {"html": html, "png": [], "png_error": None}
    if png:
        paths = [out_dir / f"{name}.png" for name in figs]
        result["png_error"] = export_png(list(figs.values()), paths, **SIZE)
        result["png"] = [] if result["png_error"] else [str(p) for p in paths]
    return result


def write_figures(summary: Sequence[dict[str, Any]], decisions: dict[str, Any] | None, out_dir: Path,
                  png: bool = True) -> dict[str, Any]:
    """The sweep's four figures (`save_figures`)."""
    return save_figures({"pareto": pareto(summary, decisions), "upload_heatmap": upload_heatmap(summary),
                         "throughput": throughput(summary), "energy_breakdown": energy_breakdown(summary)},
                        out_dir, png)
