"""The page's plotly figures as plain dicts: building `go.Figure` objects costs milliseconds each, and three per
update would tax the decoding thread through the GIL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from hlm.dashboard.render import PART_COLOURS, PART_LABELS
from hlm.dashboard.runs import Replay
from hlm.metrics import Summary
from hlm.policies import REGISTRY

# ---------------------------------------------------------------------------------------------- figures


def _layout(title: str, x: str, y: str, **extra: Any) -> dict[str, Any]:
    """Shared look: title top left, legend under the x axis (it fits narrow screens), transparent background
    (light and dark themes), no mode bar (less for the browser to redraw on every update)."""
    axis = {"gridcolor": "rgba(148,163,184,0.25)", "zeroline": False, "automargin": True}
    return {"title": {"text": title, "font": {"size": 14}, "x": 0.01, "xanchor": "left", "y": 0.97,
                      "yref": "container", "yanchor": "top"},
            "height": 300, "margin": {"l": 56, "r": 12, "t": 36, "b": 96},
            "paper_bgcolor": "rgba(0,0,0,0)", "plot_bgcolor": "rgba(0,0,0,0)",
            "font": {"size": 12, "color": "#64748b"},
            "legend": {"orientation": "h", "x": 0, "y": -0.36, "yanchor": "top", "xanchor": "left",
                       "bgcolor": "rgba(0,0,0,0)", "font": {"size": 11}},
            "xaxis": {**axis, "title": {"text": x}}, "yaxis": {**axis, "title": {"text": y}},
            "hovermode": "x unified", **extra}


def _figure(data: list[dict[str, Any]], layout: dict[str, Any]) -> dict[str, Any]:
    return {"data": data, "layout": layout, "config": {"displayModeBar": False}}


def _empty(layout: dict[str, Any], text: str) -> dict[str, Any]:
    layout["annotations"] = [{"text": text, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5,
                              "y": 0.5, "font": {"size": 13}}]
    layout["xaxis"]["showticklabels"] = layout["yaxis"]["showticklabels"] = False
    return _figure([], layout)


REPLAY_LINE = {"dash": "dot", "width": 2.5, "color": "#7c3aed"}


def energy_figure(points: Sequence[Summary], what_if: Replay | None = None) -> dict[str, Any]:
    """Cumulative device energy split into compute / radio / idle, with the HLM counterfactual dashed (and a
    what-if replay's total dotted)."""
    layout = _layout("Device energy, cumulative", "tokens", "joules")
    if not points:
        return _empty(layout, "energy appears here as tokens stream")
    x = [s.tokens for s in points]
    data: list[dict[str, Any]] = [
        {"type": "scatter", "x": x, "y": [s.device_energy_parts_j[part] for s in points], "name": PART_LABELS[part],
         "stackgroup": "device", "mode": "lines", "line": {"width": 0.5, "color": colour},
         "hovertemplate": "%{y:.3g} J"}
        for part, colour in PART_COLOURS.items()]
    if any(s.hlm_device_energy_j for s in points):
        data.append({"type": "scatter", "x": x, "y": [s.hlm_device_energy_j for s in points],
                     "name": "HLM", "mode": "lines",
                     "line": {"dash": "dash", "width": 2, "color": "#e11d48"}, "hovertemplate": "%{y:.3g} J"})
    if what_if is not None:
        data.append({"type": "scatter", "x": list(range(1, len(what_if.energy_j) + 1)), "y": list(what_if.energy_j),
                     "name": f"replay {what_if.knobs} (modelled)", "mode": "lines",
                     "line": REPLAY_LINE, "hovertemplate": "%{y:.3g} J"})
    return _figure(data, layout)


def upload_figure(points: Sequence[Summary], what_if: Replay | None = None) -> dict[str, Any]:
    layout = _layout("Upload rate, running", "tokens", "% of tokens uploaded")
    layout["yaxis"]["range"] = [0, 105]
    if not points:
        return _empty(layout, "the share of uploaded tokens appears here")
    x = [s.tokens for s in points]
    data = [{"type": "scatter", "x": x, "y": [s.upload_rate * 100 for s in points], "name": "this run",
             "mode": "lines", "line": {"width": 2, "color": "#16a34a"}, "fill": "tozeroy",
             "fillcolor": "rgba(22,163,74,0.12)", "customdata": [s.uploads for s in points],
             "hovertemplate": "%{y:.1f}% (%{customdata} uploads)"},
            {"type": "scatter", "x": [x[0], x[-1]], "y": [100, 100], "name": "HLM", "mode": "lines",
             "line": {"dash": "dash", "width": 2, "color": "#e11d48"}, "hoverinfo": "skip"}]
    if what_if is not None:
        data.append({"type": "scatter", "x": list(range(1, len(what_if.rates) + 1)),
                     "y": [r * 100 for r in what_if.rates], "name": f"replay {what_if.knobs}",
                     "mode": "lines", "line": REPLAY_LINE, "hovertemplate": "%{y:.1f}% (replay)"})
    return _figure(data, layout)


def history_figure(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """This session's runs: energy saving vs BERTScore F1, one point per run, the trade-off frontier."""
    layout = _layout("Your runs (numbered in order): energy saving vs quality", "BERTScore F1 vs the LLM-only output",
                     "energy saving vs HLM (%)", hovermode="closest", height=340)
    if not history:
        return _empty(layout, "each finished run adds a point here")
    f1 = [h["bertscore_f1"] for h in history]
    saving = [h["energy_saving"] * 100 for h in history]
    layout["xaxis"]["range"] = [min(0.5, *f1) - 0.08, 1.04]
    layout["yaxis"]["range"] = [min(0.0, *saving) - 8, max(10.0, *saving) + 12]
    groups: dict[str, list[dict[str, Any]]] = {}
    for h in history:
        named = f"{h['policy']} {h['estimator']}" if REGISTRY[h["policy"]].uses_estimator else h["policy"]
        groups.setdefault(named, []).append(h)
    data = []
    for name, rows in groups.items():
        policy = REGISTRY[rows[0]["policy"]]
        data.append({
            "type": "scatter", "mode": "markers+text", "name": f"{name} (coin)" if policy.uses_coin else name,
            "x": [h["bertscore_f1"] for h in rows], "y": [h["energy_saving"] * 100 for h in rows],
            "text": [str(h.get("n", "")) for h in rows], "textposition": "middle right", "textfont": {"size": 10},
            "cliponaxis": False,
            "marker": {"size": 10, "color": policy.colour, "symbol": "x" if policy.uses_coin else "circle"},
            "customdata": [[h["label"], h["upload_rate"] * 100, h["prompt"]] for h in rows],
            "hovertemplate": "run %{text}: %{customdata[0]}<br>F1 %{x:.3f}, saving %{y:.1f}%<br>"
                             "upload rate %{customdata[1]:.1f}%<br>%{customdata[2]}<extra></extra>"})
    banded = [h for h in history if h.get("band")]
    if banded:  # T > 0: behind each point, the F1 range of the LLM's own samples on its prompt
        data.insert(0, {"type": "scatter", "mode": "lines", "name": "LLM vs LLM samples (noise)",
                        "x": [x for h in banded for x in (*h["band"], None)],
                        "y": [y for h in banded for y in (h["energy_saving"] * 100,) * 2 + (None,)],
                        "line": {"width": 9, "color": "rgba(148,163,184,0.45)"}, "hoverinfo": "skip"})
        layout["xaxis"]["range"][0] = min(layout["xaxis"]["range"][0], *(h["band"][0] - 0.08 for h in banded))
    return _figure(data, layout)



class CaptureLine(NamedTuple):
    """One rule on the capture chart: its study rows (each with `upload_rate`, the metric and its interval), drawn
    as a line through its matched budgets, or as points where it has none (a rule set by its k and γ)."""

    label: str
    colour: str
    rows: Sequence[dict[str, Any]]
    dash: str = "solid"
    symbol: str = "circle"


def capture_figure(lines: Sequence[CaptureLine], metric: str, title: str, y: str) -> dict[str, Any]:
    """The held-back capture curve: each rule's `metric` against its share of drafts uploaded; hover gives the 95 %
    interval and the setting of each point."""
    layout = _layout(title, "uploads (% of drafts)", y, hovermode="closest", height=420)
    layout["margin"]["b"] = 130  # room for the legend's seven rules
    layout["yaxis"]["range"] = [0, 1.04]
    data = []
    for line in lines:
        rows = sorted((r for r in line.rows if r.get(metric) is not None), key=lambda r: r["upload_rate"])
        if not rows:
            continue
        curve = all(r.get("budget") is not None for r in rows)
        data.append({
            "type": "scatter", "mode": "lines+markers" if curve else "markers", "name": line.label,
            "x": [r["upload_rate"] * 100 for r in rows], "y": [r[metric] for r in rows],
            "line": {"color": line.colour, "width": 2, "dash": line.dash},
            "marker": {"color": line.colour, "symbol": line.symbol, "size": 7 if curve else 11},
            "customdata": [[r["setting"], _interval(r, metric)] for r in rows],
            "hovertemplate": f"{line.label}, %{{customdata[0]}}<br>%{{y:.3f}} %{{customdata[1]}} at %{{x:.1f}}% "
                             "uploads<extra></extra>"})
    if not data:
        return _empty(layout, "not measured yet")
    return _figure(data, layout)


def _interval(row: dict[str, Any], metric: str) -> str:
    lo, hi = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
    return "" if lo is None or hi is None else f"[{lo:.2f}, {hi:.2f}]"
