"""The Evidence tab: what one-prompt runs cannot show, read from the result files committed under docs/results (the
held-back selection study, its end-to-end runs against the matched coin, HumanEval pass@1), each with the command
that made it. `evidence()` reads them once per process, so loading the page computes nothing; a file that is not
there says "not measured yet" and how to make it."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hlm.dashboard.charts import CaptureLine, capture_figure
from hlm.dashboard.settings import Settings
from hlm.experiments.study.confirm import ROWS
from hlm.policies import REGISTRY, with_role

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
STUDY = "study-gguf/summary.json"  # the shipped draft, `gguf` (study/: the int8 draft's run before it)
# What makes each file; a file's own `meta.command`, where it has one, is shown instead
STUDY_COMMAND = ("python -m hlm study --prompts hlm/assets/prompts-heldout.jsonl --out runs/study-gguf --seeds \"\" "
                 "--confirm 64 --confirm-limit 32")


@dataclass(frozen=True)
class HumanEvalRun:
    """One committed `eval humaneval` folder: its table is shown as the command wrote it."""

    folder: str  # under RESULTS, with table.txt and results.json
    caption: str
    command: str

    @property
    def table(self) -> str:
        return f"{self.folder}/table.txt"

    @property
    def results(self) -> str:
        return f"{self.folder}/results.json"


# Shown in this order, the path that ships first; each caption says what its run is.
HUMANEVAL = (
    HumanEvalRun("humaneval-amx-164", "The shipped path (`--quant auto` on an AMX machine: the draft's steps on "
                 "llama.cpp, the verifier on `q4k`): the default k = 8 and its matched coin, with slm as the floor "
                 "and llm as the ceiling, on all 164 problems",
                 "python -m hlm eval humaneval --policies ours,random --limit 90 --out runs/humaneval-164-amx; "
                 "python -m hlm eval humaneval --policies ours,random --skip 90 --limit 74 "
                 "--out runs/humaneval-amx-90-163; python -m hlm eval humaneval --policies slm --limit 164 "
                 "--out runs/humaneval-amx-slm; python -m hlm eval humaneval --policies llm --limit 164 "
                 "--out runs/humaneval-amx-llm; python -m hlm eval merge runs/humaneval-164-amx "
                 "runs/humaneval-amx-90-163 runs/humaneval-amx-slm runs/humaneval-amx-llm "
                 "--out runs/humaneval-amx-164"),
    HumanEvalRun("humaneval-gguf-curve", "The draft on its GGUF blocks (`gguf`, shipped before llama.cpp): k = 4, "
                 "the default k = 8 and k = 16, and the hidden-state judge at k = 4, 8 and 16, each against its "
                 "matched coin, with slm as the floor and llm as the ceiling, on all 164 problems",
                 "python -m hlm eval humaneval --policies ours,random,slm --ks 8 --limit 64 "
                 "--out runs/humaneval-gguf-64; python -m hlm eval humaneval --policies ours,random,slm --ks 8 "
                 "--skip 64 --limit 16 --out runs/humaneval-gguf-rest; python -m hlm eval humaneval --policies "
                 "ours,random,slm --ks 8 --skip 80 --limit 84 --out runs/humaneval-gguf-164rest; "
                 "python -m hlm eval merge runs/humaneval-gguf-64 runs/humaneval-gguf-rest runs/humaneval-gguf-164rest "
                 "--out runs/humaneval-gguf-164; python -m hlm eval humaneval --policies ours,random --ks 16 "
                 "--limit 64 --out runs/humaneval-gguf-k16-64; python -m hlm eval humaneval --policies ours,random "
                 "--ks 16 --skip 64 --limit 100 --out runs/humaneval-gguf-k16-rest; python -m hlm eval humaneval "
                 "--policies ours,random --ks 8 --estimators judge-horizon --out runs/humaneval-gguf-judge; "
                 "python -m hlm eval humaneval --policies ours,random --ks 4 --out runs/humaneval-gguf-k4; "
                 "python -m hlm eval humaneval --policies ours,random --ks 4 --estimators judge-horizon "
                 "--out runs/humaneval-gguf-judge-k4; python -m hlm eval humaneval --policies ours,random --ks 16 "
                 "--estimators judge-horizon --out runs/humaneval-gguf-judge-k16; "
                 "python -m hlm eval humaneval --policies llm --out runs/humaneval-gguf-llm; "
                 "python -m hlm eval merge runs/humaneval-gguf-164 runs/humaneval-gguf-k16-64 "
                 "runs/humaneval-gguf-k16-rest runs/humaneval-gguf-judge runs/humaneval-gguf-k4 "
                 "runs/humaneval-gguf-judge-k4 runs/humaneval-gguf-judge-k16 runs/humaneval-gguf-llm "
                 "--out runs/humaneval-gguf-curve"),
    HumanEvalRun("humaneval-exact-164", "The probe as it ships, on the int8 draft after exact rows: the default "
                 "k = 8 and k = 16, each against its matched coin, with slm and llm as floor and ceiling, on all 164 "
                 "problems",
                 "python -m hlm eval humaneval --policies llm,slm,ours,random --ks 8,16 --limit 64 "
                 "--out runs/humaneval-exact; python -m hlm eval humaneval --policies llm,slm,ours,random --ks 8,16 "
                 "--skip 64 --out runs/humaneval-exact-rest; python -m hlm eval merge runs/humaneval-exact "
                 "runs/humaneval-exact-rest --out runs/humaneval-exact-164"),
    HumanEvalRun("humaneval-164", "Before exact rows: the probe at k = 16 on all 164 problems, with llm: the share of "
                 "the gap",
                 "python -m hlm eval humaneval --policies llm,slm,ours,random --ks 16 --out runs/humaneval-164"),
    HumanEvalRun("humaneval-164-fresh", "The same runs on HumanEval/64-163 alone: problems no pass@1 was read from",
                 "python -m hlm eval humaneval --policies llm,slm,ours,random --ks 16 --skip 64 "
                 "--out runs/humaneval-164"),
    HumanEvalRun("humaneval-logfeat", "Before exact rows: four points of the probe's curve with llm, first 64 problems",
                 "python -m hlm eval humaneval --policies llm,slm,ours,random --ks 8,16,22,26 --limit 64 "
                 "--out runs/humaneval-logfeat"),
)

SHIPPED = Settings.estimator  # the study names a rule by its estimator; ours ships this one at Settings' k and γ
SHIPPED_SETTING = f"k={Settings.k} γ={Settings.gamma:g}"
PAPER = "paper-lookahead"
# The capture chart's rules, drawn in this order: (study rule, label, colour, line dash)
RULES = (
    (SHIPPED, f"ours: {SHIPPED} (ships)", REGISTRY[with_role("subject")].colour, "solid"),
    ("judge-horizon", "hidden-state judge, with the horizon (judge-horizon)", "#9467bd", "solid"),
    ("ubar-horizon", "uncertainty, with the horizon (ubar-horizon)", "#2ca02c", "solid"),
    ("ubar", "uncertainty alone (ubar)", "#ff7f0e", "solid"),
    (PAPER, "paper-literal: uncertain and attended (k, γ grid)", "#e377c2", "solid"),
    ("coin", "coin", REGISTRY[with_role("control")].colour, "dot"),
    ("oracle", "oracle (knows the cloud's answer)", "#7f7f7f", "dot"),
)
BUDGETS = (0.2, 0.3)  # the table's matched budgets


@dataclass(frozen=True)
class Evidence:
    """The tab's content: Markdown sections and the two capture charts (plotly figure dicts)."""

    capture: str  # what the charts show, on which prompts
    recall: dict[str, Any]  # first divergence uploaded against uploads
    prefix: dict[str, Any]  # faithful prefix against uploads
    capture_table: str  # the numbers at BUDGETS, and the command
    end_to_end: str
    humaneval: str


@functools.cache
def evidence(results: Path = RESULTS) -> Evidence:
    """The tab from the files under `results`, read once."""
    path = results / STUDY
    study = _json(path) or {}
    rows = [r for r in study.get("rows", []) if r.get("mode") == "greedy" and r.get("upload_rate") is not None]
    recall, prefix = _capture_figures(rows)
    capture, table = _missing("The held-back study", path, STUDY_COMMAND), ""
    if rows:
        capture = _readable("The held-back study", path, STUDY_COMMAND, _capture_text, study)
        table = _readable("The held-back study", path, STUDY_COMMAND, _capture_table, rows, study, path)
    e2e = _readable("End to end", path, STUDY_COMMAND, _end_to_end, study, path)
    return Evidence(capture, recall, prefix, table, e2e, _humaneval(results))


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _readable(what: str, path: Path, command: str, build: Callable[..., str], *args: Any) -> str:
    """A section built from its file; a file of a form this reader does not know says so instead of failing the
    page's start."""
    try:
        return build(*args)
    except (KeyError, TypeError, ValueError, AttributeError):
        return f"**{what}:** `{_shown(path)}` is not in the form this page reads; `{command}` writes it anew."


def _made_by(data: dict[str, Any] | None, path: Path, default: str) -> str:
    meta = (data or {}).get("meta")
    command = meta.get("command") if isinstance(meta, dict) and meta.get("command") else default
    return f"From `{_shown(path)}`, made by `{command}`"


def _shown(path: Path) -> str:
    """A result file's path as the repository names it."""
    root = RESULTS.parent.parent
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _missing(what: str, path: Path, command: str) -> str:
    return f"**{what}: not measured yet.** `{_shown(path)}` is not here; `{command}` makes it."


def _capture_figures(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The capture curves (greedy replay): each rule at its matched budgets (the paper-literal rule at its k, γ
    settings), and the shipped knobs as a star."""
    lines = [CaptureLine(label, colour, [r for r in rows if r.get("rule") == rule and
                                         (r.get("budget") is not None or rule == PAPER)], dash)
             for rule, label, colour, dash in RULES]
    lines.append(CaptureLine(f"ours at the shipped {SHIPPED_SETTING}", lines[0].colour,
                             [r for r in rows if r.get("rule") == SHIPPED and r.get("setting") == SHIPPED_SETTING],
                             symbol="star"))
    return (capture_figure(lines, "first_divergence_recall", "First changed draft uploaded", "share of answers"),
            capture_figure(lines, "faithful_prefix", "LLM's answer kept word for word", "share of its length"))


def _capture_text(study: dict[str, Any]) -> str:
    return (f"### Which drafts to upload: {study['prompts']} held-back prompts\n"
            f"Greedy replay on the {study.get('models', '')} pair: {study['tokens']['greedy']:,} drafts, "
            f"{study['divergences']:,} of which the cloud would change. Each rule uploads the drafts it scores "
            "highest, from 5 to 50 % of them. The first chart: how often the answer's first changed draft was "
            "uploaded (the first one missed ends the LLM's answer); the second: how much of the LLM's answer the "
            "device then kept word for word. The coin uploads at random, the oracle knows the cloud's answer; the "
            "paper-literal rule has no budget, so its points are its k, γ settings. Hover a point for its 95 % "
            "interval. The rules and knobs were chosen on other prompts (the tuning half), so these numbers are a "
            "test, not a fit.")


def _capture_table(rows: Sequence[dict[str, Any]], study: dict[str, Any], path: Path) -> str:
    """Every rule at each of BUDGETS, then at their own knobs: ours at the shipped ones, the paper-literal rule at
    its settings nearest to each budget."""
    auroc = {r["rule"]: r["auroc"] for r in study["rows"] if r.get("mode") == "greedy" and r.get("auroc") is not None}
    lines = ["Changes caught: the share of all changed drafts uploaded; AUROC: how well the score ranks the drafts the "
             "cloud changes above the rest.\n",
             "| uploads | rule | first change uploaded | faithful prefix | changes caught | AUROC |",
             "|---|---|---|---|---|---|"]
    at_budgets = [r for budget in BUDGETS for rule, *_ in RULES for r in rows
                  if r["rule"] == rule and r["budget"] == budget]
    paper = [r for r in rows if r["rule"] == PAPER]
    own = [r for r in rows if r["rule"] == SHIPPED and r["setting"] == SHIPPED_SETTING]
    own += list({id(r): r for budget in BUDGETS
                 for r in sorted(paper, key=lambda r: abs(r["upload_rate"] - budget))[:1]}.values())
    lines += [_row(r, _name(r), auroc.get(r["rule"])) for r in at_budgets]
    lines += [_row(r, f"{_name(r)}, {r['setting']}", auroc.get(r["rule"])) for r in own]
    return "\n".join(lines) + f"\n\n{_made_by(study, path, STUDY_COMMAND)}"


def _name(r: dict[str, Any]) -> str:
    return f"{r['rule']} (ours)" if r["rule"] == SHIPPED else r["rule"]


def _row(r: dict[str, Any], label: str, auroc: float | None) -> str:
    """One rule's row: the two targets with their 95 % intervals, the rest as points (the table fits a phone)."""
    cells = [f"{r['upload_rate']:.1%}", label, _ci(r, "first_divergence_recall"), _ci(r, "faithful_prefix"),
             f"{r['crm']:.3f}", "" if auroc is None else f"{auroc:.3f}"]
    return "| " + " | ".join(cells) + " |"


def _ci(r: dict[str, Any], metric: str) -> str:
    v, lo, hi = r.get(metric), r.get(f"{metric}_lo"), r.get(f"{metric}_hi")
    if v is None:
        return ""
    return f"{v:.3f} [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else f"{v:.3f}"


def _end_to_end(study: dict[str, Any], path: Path) -> str:
    """Real decoder runs: ours against a coin matched per prompt to ours' upload rate, paired differences."""
    confirm = study.get("confirm") or {}
    s = confirm.get("summary")
    if not s:
        return _missing("End to end against the matched coin", path, STUDY_COMMAND)
    config = confirm.get("config", {})
    policy, sampling = config.get("policy", {}), config.get("sampling", {})
    head = (f"### End to end against the matched coin: {s['prompts']} held-back prompts\n"
            f"Real decoder runs (temperature {sampling.get('temperature', 0):g}, {sampling.get('max_new_tokens')} "
            f"tokens; ours with {policy.get('estimator')} at k={policy.get('k')} γ={policy.get('gamma', 0):g}) "
            "against a coin whose rate is matched to ours' uploads on each prompt. Faithful prefix: the share of "
            "the LLM's greedy answer kept word for word, the LLM run alone by the same decoder (the study's y* "
            "comes from one batched, padded generation, which breaks a few near-ties differently: the last row); "
            f"{confirm.get('bertscore', 'BERTScore F1')}, against the same answer. The "
            "difference is ours − coin with its 95 % bootstrap interval; p from the Wilcoxon signed-rank test.\n\n"
            "| | ours | coin, matched | ours − coin [95 %] | p |\n|---|---|---|---|---|")
    rows = [f"| {label} | {m['ours']:.3f} | {m['coin']:.3f} | {m['delta']:+.3f} [{m['delta_lo']:+.3f}, "
            f"{m['delta_hi']:+.3f}] | {m['wilcoxon_p']:.2g} |" for key, label in ROWS if (m := s.get(key))]
    ystar = (f"\n\nThe LLM alone reproduces {s['llm_prefix_ystar']:.3f} of y* on these prompts: a flipped near-tie "
             "ends a prefix." if "llm_prefix_ystar" in s else "")
    return "\n".join([head, *rows]) + ystar + f"\n\n{_made_by(study, path, STUDY_COMMAND)}"


def _humaneval(results: Path) -> str:
    """Each HumanEval table as its command wrote it (`table.txt`, shown verbatim), or "not measured yet"."""
    head = ("### HumanEval pass@1: does the code still pass its tests?\nEach problem's prompt through each policy "
            "(greedy), the completion run against the problem's tests; the coin matched per problem to ours' "
            "uploads.")
    return "\n\n".join([head, *(_humaneval_run(results, run) for run in HUMANEVAL)])


def _humaneval_run(results: Path, run: HumanEvalRun) -> str:
    path = results / run.table
    try:
        table = path.read_text(encoding="utf-8").rstrip()
    except OSError:
        return f"**{run.caption}.** " + _missing("HumanEval", path, run.command)
    return f"**{run.caption}.**\n\n```\n{table}\n```\n\n{_made_by(_json(results / run.results), path, run.command)}"
