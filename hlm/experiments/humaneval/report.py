"""HumanEval's numbers from the rows of `evaluate`: pass@1 per policy and setting with a 95 % Wilson interval,
uploads and modelled energy, paired differences per problem (bootstrap interval, exact McNemar test), the table
and the curve (pass@1 against realised upload rate).

Policies are read by their registry flags and roles, never their names: the floor is the policy that drafts and
never uploads (`slm`), the ceiling the reference (`llm`); the subject (`ours`) is compared with the control at the
same setting (`random`, matched per problem) and with every policy run once per problem.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from scipy.stats import binomtest

from hlm.config import PolicyConfig
from hlm.policies import REGISTRY, floor, role_of, with_role

BOOT = 10_000  # bootstrap resamples of the problems
Rows = Sequence[dict[str, Any]]
DASHES = ("solid", "dash", "dot", "dashdot")  # the curve's lines, one per estimator
SYMBOLS = ("circle", "square", "triangle-up", "diamond", "star")


def _groups(rows: Rows) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows per (policy, setting), in run order."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["policy"], r["setting"]), []).append(r)
    return out


def _passed(rows: Rows) -> dict[str, bool]:
    """Each problem's verdict in one policy's rows."""
    return {r["prompt_id"]: bool(r["passed"]) for r in rows}


def summarise(rows: Rows) -> list[dict[str, Any]]:
    """One row per (policy, setting): pass@1 and its Wilson 95 % interval over problems, uploads (the realised rate
    pooled over the problems' drafts), mean tokens and mean modelled device and link energy per problem; the
    subject's rows add the share of the floor-to-ceiling gap they recover on their own problems (`_gap`)."""
    out = []
    groups = _groups(rows)
    for (policy, setting), g in groups.items():
        n, passed = len(g), sum(bool(r["passed"]) for r in g)
        ci = binomtest(passed, n).proportion_ci(0.95, method="wilson")
        tokens, uploads = sum(r["tokens"] for r in g), sum(r["uploads"] for r in g)
        out.append({"policy": policy, "setting": setting, "estimator": g[0]["estimator"], "k": g[0]["k"],
                    "gamma": g[0]["gamma"], "matched_to": g[0]["matched_to"], "problems": n, "passed": passed,
                    "pass_at_1": passed / n, "pass_lo": float(ci.low), "pass_hi": float(ci.high),
                    "uploads": uploads, "upload_rate": uploads / tokens if tokens else 0.0, "tokens_mean": tokens / n,
                    "device_energy_j_mean": sum(r["device_energy_j"] for r in g) / n,
                    "link_energy_j_mean": sum(r["link_energy_j"] for r in g) / n})
    low, high = _passed(groups.get((floor(), "-"), [])), _passed(groups.get((with_role("reference"), "-"), []))
    for r in out:
        if role_of(r["policy"]) == "subject":
            _gap(r, {row["prompt_id"] for row in groups[r["policy"], r["setting"]]}, low, high)
    return out


def _gap(r: dict[str, Any], ran: set[str], low: dict[str, bool], high: dict[str, bool]) -> None:
    """The share of the floor-to-ceiling gap the subject's row `r` recovers, with the floor and the ceiling read on
    the problems it ran (a merged report may hold the subject on fewer problems than they ran): where both ran all
    of them and differ there."""
    def on_these(passed: dict[str, bool]) -> float | None:
        return sum(passed[p] for p in ran) / len(ran) if ran and ran <= passed.keys() else None

    floor_pass, ceiling_pass = on_these(low), on_these(high)
    r["gap_recovered"] = None
    if floor_pass is not None and ceiling_pass is not None and floor_pass != ceiling_pass:
        r.update(gap_recovered=(r["pass_at_1"] - floor_pass) / (ceiling_pass - floor_pass),
                 floor_on_its_problems=floor_pass, ceiling_on_its_problems=ceiling_pass)


def difference(mine: Rows, theirs: Rows, seed: int = 0) -> dict[str, Any]:
    """Paired by problem: the pass@1 difference with a bootstrap 95 % interval over problems, the discordant
    problems and the exact McNemar p-value (a two-sided binomial test on them)."""
    other = _passed(theirs)
    pairs = np.array([(bool(r["passed"]), other[r["prompt_id"]]) for r in mine if r["prompt_id"] in other], dtype=int)
    d = pairs[:, 0] - pairs[:, 1]
    means = d[np.random.default_rng(seed).integers(0, len(d), (BOOT, len(d)))].mean(axis=1)
    only_mine, only_theirs = int((d > 0).sum()), int((d < 0).sum())
    discordant = only_mine + only_theirs
    return {"problems": len(d), "delta": float(d.mean()), "delta_lo": float(np.percentile(means, 2.5)),
            "delta_hi": float(np.percentile(means, 97.5)), "only_subject": only_mine, "only_other": only_theirs,
            "mcnemar_p": float(binomtest(only_mine, discordant).pvalue) if discordant else 1.0}


def paired(rows: Rows) -> list[dict[str, Any]]:
    """The subject at each setting against the control at that setting and against each policy run once; under
    an estimator other than the default, also against the default estimator at the same k and gamma (what the
    other score buys on the same problems)."""
    groups = _groups(rows)
    once = [(policy, g) for (policy, setting), g in groups.items() if setting == "-"]
    default = PolicyConfig().estimator
    out = []
    for (policy, setting), mine in groups.items():
        if role_of(policy) != "subject":
            continue
        control = groups.get((with_role("control"), setting))
        knobs = mine[0]["k"], mine[0]["gamma"]
        shipped = [] if mine[0]["estimator"] == default else [
            (f"{policy} {s}", g) for (p, s), g in groups.items()
            if p == policy and (g[0]["estimator"], g[0]["k"], g[0]["gamma"]) == (default, *knobs)]
        others = ([(f"{with_role('control')} (matched)", control)] if control else []) + shipped + once
        out += [{"subject": policy, "setting": setting, "versus": name, **difference(mine, theirs)}
                for name, theirs in others]
    return out


def _interval(r: dict[str, Any], key: str, lo: str, hi: str, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{r[key]:{sign}.3f} [{r[lo]:{sign}.3f}, {r[hi]:{sign}.3f}]"


def _side(d: dict[str, Any]) -> str:
    """The subject's side of a difference in words: its setting too where the other side is the subject as well."""
    return f"{d['subject']} {d['setting']}" if d["versus"].startswith(f"{d['subject']} ") else d["subject"]


def format_table(summary: Rows, differences: Rows, meta: dict[str, Any]) -> str:
    """The plain-text report: pass@1 per policy and setting, then the paired differences."""
    head = (f"{'policy':<8} {'setting':<28} {'problems':>8} {'pass@1 [95 % Wilson]':<22} {'uploads':>8} "
            f"{'upload %':>9} {'tokens':>7} {'device J':>9} {'link J':>8} {'gap':>6}")
    gap = [r.get("gap_recovered") for r in summary]
    ids = meta["task_ids"]
    span = f"{ids[0]} to {ids[-1]}; " if ids else ""
    lines = [f"HumanEval pass@1 on {meta['problems']} problems ({span}greedy, {meta['sampling']['max_new_tokens']} "
             f"tokens at most, {meta['models']}); energy modelled per problem (device profile "
             f"{meta['device_profile']['name']}, link {meta['link_preset']}); {meta['note']}.",
             "", head, "-" * len(head)]
    for r, g in zip(summary, gap, strict=True):
        lines.append(f"{r['policy']:<8} {r['setting']:<28} {r['problems']:>8} "
                     f"{_interval(r, 'pass_at_1', 'pass_lo', 'pass_hi'):<22} "
                     f"{r['uploads']:>8} {100 * r['upload_rate']:>9.1f} {r['tokens_mean']:>7.1f} "
                     f"{r['device_energy_j_mean']:>9.3f} {r['link_energy_j_mean']:>8.3f} "
                     f"{'' if g is None else f'{100 * g:.0f} %':>6}")
    if any(g is not None for g in gap):
        lines.append(f"gap: the share of the pass@1 gap from {floor()} to {with_role('reference')} recovered, both "
                     "read on the problems the row ran (shown where both ran all of them)")
    if differences:
        lines += ["", "paired by problem, on the problems both ran (bootstrap 95 % interval; discordant problems; "
                  "exact McNemar p):"]
        lines += [f"  {d['subject']} {d['setting']} - {d['versus']}, {d['problems']} problems: "
                  f"{_interval(d, 'delta', 'delta_lo', 'delta_hi', signed=True)}; {_side(d)} alone passes "
                  f"{d['only_subject']}, {d['versus']} alone {d['only_other']}; p = {d['mcnemar_p']:.3g}"
                  for d in differences]
    return "\n".join(lines)


def _errors(rows: Rows) -> dict[str, Any]:
    """pass@1 points with their asymmetric Wilson intervals, in percent."""
    return {"y": [100 * r["pass_at_1"] for r in rows],
            "error_y": {"type": "data", "symmetric": False, "array": [100 * (r["pass_hi"] - r["pass_at_1"])
                                                                       for r in rows],
                        "arrayminus": [100 * (r["pass_at_1"] - r["pass_lo"]) for r in rows], "thickness": 1}}


def _subject_lines(fig: go.Figure, subject: Rows, on: Callable[[dict[str, Any]], str]) -> None:
    """The subject's points, a line per estimator (and problem count: a line joins like with like), each in the
    subject's colour with its own dash and marker."""
    for i, (estimator, n) in enumerate(dict.fromkeys((r["estimator"], r["problems"]) for r in subject)):
        rows = sorted((r for r in subject if r["estimator"] == estimator and r["problems"] == n),
                      key=lambda r: r["upload_rate"])
        policy = REGISTRY[rows[0]["policy"]]
        fig.add_trace(go.Scatter(name=f"{policy.name} {estimator}{on(rows[0])}", mode="lines+markers+text",
                                 x=[100 * r["upload_rate"] for r in rows], text=[f"k={r['k']}" for r in rows],
                                 textposition="top left", line={"dash": DASHES[i % len(DASHES)]},
                                 marker={"color": policy.colour, "symbol": SYMBOLS[i % len(SYMBOLS)], "size": 8},
                                 **_errors(rows)))


def curve(summary: Rows, problems: int) -> go.Figure:
    """pass@1 against realised upload rate: the subject over its settings (a line per estimator), the control at
    each setting joined to the subject's point, policies that never upload as horizontal lines (the floor and the
    ceiling), and any other policy as a point."""
    fig = go.Figure()
    mixed = len({r["problems"] for r in summary}) > 1  # a merged report: each trace says how many problems it is on

    def on(r: dict[str, Any]) -> str:
        return f" ({r['problems']} problems)" if mixed else ""

    subject = [r for r in summary if role_of(r["policy"]) == "subject"]
    _subject_lines(fig, subject, on)
    control = {r["setting"]: r for r in summary if role_of(r["policy"]) == "control"}
    if control:
        rows = list(control.values())
        fig.add_trace(go.Scatter(name=f"{rows[0]['policy']} (matched per problem)", mode="markers",
                                 x=[100 * r["upload_rate"] for r in rows], text=[r["setting"] + on(r) for r in rows],
                                 marker={"color": REGISTRY[rows[0]["policy"]].colour, "symbol": "x", "size": 9},
                                 **_errors(rows)))
        xs: list[float | None] = []
        ys: list[float | None] = []
        for r in subject:
            if r["setting"] in control:
                c = control[r["setting"]]
                xs += [100 * r["upload_rate"], 100 * c["upload_rate"], None]
                ys += [100 * r["pass_at_1"], 100 * c["pass_at_1"], None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="same setting", hoverinfo="skip",
                                 line={"color": "#bbbbbb", "dash": "dot", "width": 1}))
    xmax = max([100 * r["upload_rate"] for r in summary] + [1.0])
    for r in summary:
        policy = REGISTRY[r["policy"]]
        if policy.role in ("subject", "control"):
            continue
        label = (f"{policy.name}: {100 * r['pass_at_1']:.1f} % [{100 * r['pass_lo']:.1f}, {100 * r['pass_hi']:.1f}]"
                 f"{on(r)}")
        if not policy.uploads:  # a line across the plot, named in the legend (floor and ceiling may coincide)
            fig.add_trace(go.Scatter(name=label, mode="lines", x=[0, xmax], y=[100 * r["pass_at_1"]] * 2,
                                     line={"color": policy.colour, "dash": "dash"}))
            # and, in a merged report, on the fewer problems a subject's trace ran: the floor and ceiling its gap used
            key = {floor(): "floor_on_its_problems", with_role("reference"): "ceiling_on_its_problems"}.get(r["policy"])
            fewer = {sub["problems"]: sub[key] for sub in subject if key in sub and sub["problems"] != r["problems"]}
            for n, passed in fewer.items():
                fig.add_trace(go.Scatter(name=f"{policy.name} on the same {n} problems: {100 * passed:.1f} %",
                                         mode="lines", x=[0, xmax], y=[100 * passed] * 2,
                                         line={"color": policy.colour, "dash": "dot", "width": 1}))
        else:
            fig.add_trace(go.Scatter(name=label, mode="markers", x=[100 * r["upload_rate"]],
                                     marker={"color": policy.colour, "symbol": "diamond", "size": 9}, **_errors([r])))
    fig.update_layout(title=f"HumanEval pass@1 against realised upload rate ({'up to ' if mixed else ''}{problems} "
                      "problems, greedy; 95 % Wilson intervals)",
                      xaxis={"title": "uploads (% of drafts)", "rangemode": "tozero"},
                      yaxis={"title": "pass@1 (%)", "range": [-2, 102]}, template="plotly_white")
    return fig
