"""`python -m hlm sweep`: the energy/quality trade-off measured on one model pair, and the defaults chosen from it.

Every (prompt, policy, setting, seed) is one run, cached as DIR/runs/<hash>.json where the hash covers the model
spec, the prompt, the full RunConfig, the numerics and, for a policy that asks an estimator, the selection
calibration (`PairFacts.run_key`): an interrupted sweep resumes by skipping the runs already on disk. The
policies are run by their role (`hlm.policies`): the reference (`llm`) of each (prompt, seed) is always made: it
is the BERTScore yardstick; the counterfactual and every baseline run once per (prompt, seed); the subject (`ours`)
at each setting of the grid. The control (`random`) runs last: for each subject setting its skip rate is
1 - (the subject's upload rate) measured on the same prompts, so it uploads as often as the subject while choosing
*which* drafts to upload by a coin. The subject beating it at equal upload rate is the evidence that importance
picks the right tokens.

Writes results.csv/.json (one row per run), summary.csv (mean and 95 % CI over prompts per policy and setting),
decisions.json (default estimator and (k, gamma), with the reasons) and figures/ (`hlm.experiments.figures`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from scipy.stats import t
from tqdm import tqdm

from hlm.config import ESTIMATORS, ConfigError, PolicyConfig, RunConfig, link_label
from hlm.errors import UserError
from hlm.experiments.figures import write_figures
from hlm.experiments.workers import Workers, call, energy_methods
from hlm.policies import HYBRID, Policy, with_role
from hlm.policies import REGISTRY as POLICIES

if TYPE_CHECKING:
    from hlm.decoder import HybridDecoder
    from hlm.events import TokenEvent
    from hlm.experiments.quality import QualityScorer

# Quick: 4 prompts (one per category) x 10 tokens x 2x2 (k, gamma) with the default estimator, every figure,
# under 10 minutes on 2 CPU cores; comparing estimators is `python -m hlm study`'s job (or --estimators here).
QUICK = {"limit": 4, "max_new_tokens": 10, "k": (4, 16), "gamma": (0.0, 1.0), "estimators": (PolicyConfig.estimator,),
         "seeds": (0,)}
FULL = {"limit": None, "max_new_tokens": 64, "k": (2, 4, 8, 16), "gamma": (0.0, 0.5, 1.0, 2.0),
        "estimators": ESTIMATORS, "seeds": (0,)}
# Aggregated per (policy, setting) as mean and 95 % CI over prompts.
METRICS = ("upload_rate", "energy_saving", "energy_saving_vs_hlm_run", "bertscore_f1", "tokens_per_s_modelled_link",
           "tokens_per_s", "acceptance_rate", "llm_calls", "tokens", "device_j_per_token", "compute_j_per_token",
           "radio_j_per_token", "idle_j_per_token")
# Columns derived from measured time (compute, wall clock): they differ between two runs of the same job.
TIMED = ("device_energy_j", "link_energy_j", "device_energy_compute_j", "device_energy_radio_j", "device_energy_idle_j",
         "cloud_energy_j", "hlm_device_energy_j", "hlm_call_s", "energy_saving", "energy_saving_vs_hlm_run",
         "device_compute_s", "cloud_compute_s", "wall_s", "tokens_per_s", "tokens_per_s_modelled_link",
         "device_j_per_token", "compute_j_per_token", "radio_j_per_token", "idle_j_per_token")
PART_COLUMNS = {"device_compute": "compute", "radio": "radio", "device_idle": "idle"}


@dataclass(frozen=True)
class Job:
    prompt: dict[str, str]  # id, category, prompt
    config: RunConfig
    matched_to: str = ""  # the control: the subject setting whose upload rate it matches
    stop: str = ""  # the run ends where its text first matches this regular expression (`HybridDecoder.run`)

    def identity(self, models: str) -> dict[str, Any]:
        return {"models": models, "prompt_id": self.prompt["id"],
                "prompt_sha256": hashlib.sha256(self.prompt["prompt"].encode()).hexdigest(),
                "config": self.config.to_dict(), **({"stop": self.stop} if self.stop else {})}

    @property
    def policy(self) -> Policy:
        return POLICIES[self.config.policy.name]


def once_per_prompt(policies: Sequence[str]) -> list[str]:
    """The policies of `policies` that run once per (prompt, seed), in run order: the reference (always: every
    output is scored against it), the bounds (the counterfactual uploads every draft, a baseline that uploads
    none), then the other baselines."""
    once = [p for p in POLICIES.values() if p.name in policies and p.role in ("counterfactual", "baseline")]
    once.sort(key=lambda p: (p.role != "counterfactual", p.uploads))
    return [with_role("reference"), *(p.name for p in once)]


@dataclass(frozen=True)
class Grid:
    """What a sweep runs. Configs are canonical: fields a policy ignores stay at their defaults, so e.g. the HLM
    run of a prompt is shared by every sweep over the same pair, prompt, sampling and link."""

    policies: tuple[str, ...] = HYBRID
    ks: tuple[int, ...] = FULL["k"]
    gammas: tuple[float, ...] = FULL["gamma"]
    estimators: tuple[str, ...] = ESTIMATORS
    seeds: tuple[int, ...] = (0,)
    u_th: float = PolicyConfig.u_th
    settings: tuple[PolicyConfig, ...] = field(init=False)

    def __post_init__(self) -> None:
        for name, values in (("policies", self.policies), ("k", self.ks), ("gamma", self.gammas),
                             ("estimators", self.estimators), ("seeds", self.seeds)):
            if not values:
                raise ConfigError(f"{name}: give at least one value")
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown:
            raise ConfigError(f"unknown policies {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
        subject, control = with_role("subject"), with_role("control")
        if control in self.policies and subject not in self.policies:
            raise ConfigError(f"the {control} control is matched to {subject} settings: include {subject}")
        settings = tuple(self.config(subject, k=k, gamma=g, estimator=e)  # validates
                         for e in self.estimators for k in self.ks for g in self.gammas)
        object.__setattr__(self, "settings", settings if subject in self.policies else ())

    def config(self, policy: str, **knobs: Any) -> PolicyConfig:
        """`policy`'s config at `knobs`, carrying the grid's u_th where the policy reads it (else the default)."""
        return PolicyConfig(name=policy, **knobs, **({"u_th": self.u_th} if POLICIES[policy].uses_u_th else {}))

    def first_jobs(self, prompts: Sequence[dict[str, str]], base: RunConfig) -> list[Job]:
        """Everything but the control, prompt by prompt (a partial sweep holds whole prompts)."""
        once = [self.config(p) for p in once_per_prompt(self.policies)]
        jobs = []
        for prompt in prompts:
            for seed in self.seeds:
                cfg = replace(base, sampling=replace(base.sampling, seed=seed))
                jobs += [Job(prompt, replace(cfg, policy=p)) for p in [*once, *self.settings]]
        return jobs

    def control_count(self, prompts: Sequence[dict[str, str]]) -> int:
        return len(prompts) * len(self.seeds) * len(self.settings) if with_role("control") in self.policies else 0

    def control_jobs(self, first: Sequence[tuple[Job, dict]], per_prompt: bool = False) -> list[Job]:
        """The control for each subject run, at the skip rate that matches the upload rate of its setting pooled
        over the prompts, or with `per_prompt` of the subject's own run on that prompt (and seed)."""
        control = with_role("control")
        if control not in self.policies:
            return []
        subject = [(job, record, job.policy.setting(job.config.policy)) for job, record in first
                   if job.policy.role == "subject"]

        def key(job: Job, setting: str) -> tuple:
            return (setting, job.prompt["id"], job.config.sampling.seed) if per_prompt else (setting,)

        pooled: dict[tuple, list[int]] = {}
        for job, record, setting in subject:
            tally = pooled.setdefault(key(job, setting), [0, 0])
            tally[0] += record["summary"]["uploads"]
            tally[1] += record["summary"]["tokens"]
        jobs = []
        for job, _, setting in subject:
            up, tokens = pooled[key(job, setting)]
            skip = round(1.0 - up / tokens, 4) if tokens else 1.0
            jobs.append(replace(job, config=job.config.with_policy(name=control, skip_rate=skip), matched_to=setting))
        return jobs


def minimal_token(event: TokenEvent) -> dict[str, Any]:
    """The per-token stats a run file keeps (enough to redo every figure of the importance analysis)."""
    return {"u": event.u, "importance": event.importance, "important": event.important, "uploaded": event.uploaded,
            "source": event.source}


def write_atomic(path: Path, data: Any) -> None:
    """Temp file + rename, so an interrupted sweep never leaves a truncated run file that would be skipped."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run_job(decoder: HybridDecoder, item: tuple[int, Job]) -> dict[str, Any]:
    """A `Workers` task: the run of (position, job), as its run file keeps it (less the identity: the driver's)."""
    job = item[1]
    text, events, summary = decoder.run(job.prompt["prompt"], job.config, stop=job.stop or None)
    return {"text": text, "summary": summary, "tokens": [minimal_token(e) for e in events]}


class Runner:
    """Runs jobs on the workers, skipping those whose run file exists; the driver alone writes run files. Jobs that
    raise are kept in `failed` (job, error) and reported; the rest go on."""

    def __init__(self, workers: Workers, models: str, runs_dir: Path, bar: tqdm,
                 after_run: Callable[[Job, dict], None] | None = None) -> None:
        self.workers, self.models, self.runs_dir, self.bar, self.after_run = workers, models, runs_dir, bar, after_run
        self.failed: list[tuple[Job, str]] = []
        runs_dir.mkdir(parents=True, exist_ok=True)

    def path(self, job: Job) -> Path:
        text = json.dumps([job.identity(self.models), *self.workers.facts.run_key(job.config)], sort_keys=True)
        return self.runs_dir / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"

    def cached(self, jobs: Sequence[Job]) -> int:
        return sum(self.path(j).is_file() for j in jobs)

    def run(self, jobs: Sequence[Job]) -> list[tuple[Job, dict]]:
        """Records in job order, failed jobs left out. The bar advances only for new runs (cached ones were counted
        up front)."""
        paths = [self.path(job) for job in jobs]
        records = {i: json.loads(path.read_text(encoding="utf-8")) for i, path in enumerate(paths) if path.is_file()}
        todo = [(i, job) for i, job in enumerate(jobs) if i not in records]
        for outcome in self.workers.map(run_job, todo, self.bar):
            i, job = outcome.item
            if outcome.error is not None:
                self.failed.append((job, outcome.error))
                tqdm.write(f"[sweep] {job.prompt['id']} {job.policy.label(job.config.policy)} failed: {outcome.error}",
                           file=sys.stderr)
                continue
            records[i] = {"identity": job.identity(self.models), **outcome.result}
            write_atomic(paths[i], records[i])
            if self.after_run is not None:
                self.after_run(job, records[i])
        return [(job, records[i]) for i, job in enumerate(jobs) if i in records]

    def failed_prompts(self) -> set[str]:
        return {job.prompt["id"] for job, _ in self.failed}


@dataclass(frozen=True)
class SweepSpec:
    """What one sweep runs and where it writes it: everything but the loaded decoder and scorer. `meta` is merged
    into results.json's meta; `tolerance` is `choose_defaults`'."""

    models: str  # the pair's spec, part of every run's cache identity
    prompts: Sequence[dict[str, str]]
    grid: Grid
    base: RunConfig  # what every run shares; the grid sets the policy
    out_dir: Path
    tolerance: float = 0.01
    png: bool = True
    progress: bool = True
    meta: dict[str, Any] = field(default_factory=dict)


def execute(workers: Workers, spec: SweepSpec,
            after_run: Callable[[Job, dict], None] | None = None) -> tuple[list[tuple[Job, dict]], list[dict]]:
    """Run (or load) every job of the sweep (`run_matched`), each control matched to its setting's pooled rate."""
    return run_matched(workers, spec.models, spec.out_dir / "runs", spec.grid,
                       spec.grid.first_jobs(spec.prompts, spec.base), progress=spec.progress, after_run=after_run)


def run_matched(workers: Workers, models: str, runs_dir: Path, grid: Grid, first: Sequence[Job], *,
                per_prompt: bool = False, desc: str = "sweep", progress: bool = True,
                after_run: Callable[[Job, dict], None] | None = None) -> tuple[list[tuple[Job, dict]], list[dict]]:
    """Run (or load) `first`, then the grid's controls matched to its subject runs (`Grid.control_jobs`); returns
    (job, record) pairs, the controls last, and the failed jobs. A prompt with a failed job is left out whole (its
    rows would lack a run they are compared with)."""
    matched = sum(j.policy.role == "subject" for j in first) if with_role("control") in grid.policies else 0
    with tqdm(total=len(first) + matched, unit="run", desc=desc, disable=not progress, dynamic_ncols=True,
              file=sys.stderr) as bar:
        runner = Runner(workers, models, runs_dir, bar, after_run)
        bar.update(runner.cached(first))
        done = [(j, r) for j, r in runner.run(first) if j.prompt["id"] not in runner.failed_prompts()]
        second = grid.control_jobs(done, per_prompt)
        bar.update(runner.cached(second))
        done += runner.run(second)
    failed = [{"prompt_id": job.prompt["id"], "policy": job.config.policy.name,
               "setting": job.policy.setting(job.config.policy), "error": error} for job, error in runner.failed]
    done = [(j, r) for j, r in done if j.prompt["id"] not in runner.failed_prompts()]
    if not done:
        raise UserError(f"every prompt had a failed job; the first: {failed[0]['prompt_id']}: {failed[0]['error']}")
    return done, failed


def _per_token(value: float | None, tokens: int) -> float | None:
    return value / tokens if value is not None and tokens else None


def run_row(job: Job, record: dict, counterfactual: dict | None) -> dict[str, Any]:
    """One run's row: its settings (the knobs its policy reads), every Summary figure, per-token energy, and its
    energy saving against the counterfactual's run of the same prompt and seed (`counterfactual`: that summary)."""
    pol, policy, s = job.config.policy, job.policy, record["summary"]
    tuned, n = policy.tuned, s["tokens"]
    row: dict[str, Any] = {
        "prompt_id": job.prompt["id"], "category": job.prompt["category"], "seed": job.config.sampling.seed,
        "policy": pol.name, "setting": policy.setting(pol), "estimator": pol.estimator if tuned else None,
        "k": pol.k if tuned else None, "gamma": pol.gamma if tuned else None,
        "u_th": pol.u_th if policy.uses_u_th else None, "skip_rate": pol.skip_rate if policy.uses_coin else None,
        "matched_to": job.matched_to or None,
    }
    row |= {k: v for k, v in s.items() if not isinstance(v, dict) and k != "policy"}
    parts = s["device_energy_parts_j"]
    row |= {f"device_energy_{short}_j": parts[part] for part, short in PART_COLUMNS.items()}
    row["device_j_per_token"] = mine = _per_token(s["device_energy_j"], n)
    row |= {f"{short}_j_per_token": _per_token(parts[part], n) for part, short in PART_COLUMNS.items()}
    theirs = _per_token(counterfactual["device_energy_j"], counterfactual["tokens"]) if counterfactual else None
    row["energy_saving_vs_hlm_run"] = (1.0 - mine / theirs if mine is not None and theirs
                                       and policy.role != "reference" else None)
    return row


def tabulate(done: Sequence[tuple[Job, dict]], scorer: QualityScorer) -> list[dict[str, Any]]:
    """One tidy row per run (`run_row`) with its BERTScore F1 against the reference's output for the same prompt and
    seed (scored in one batch by the one loaded scorer)."""
    def key(job: Job) -> tuple[str, int]:
        return job.prompt["id"], job.config.sampling.seed

    by_role: dict[str, dict[tuple[str, int], dict]] = {"reference": {}, "counterfactual": {}}
    for job, record in done:
        if job.policy.role in by_role:
            by_role[job.policy.role][key(job)] = record
    scored = [(job, record) for job, record in done if job.policy.role != "reference"]
    f1s = iter(scorer.f1([r["text"] for _, r in scored], [by_role["reference"][key(j)]["text"] for j, _ in scored]))
    rows = []
    for job, record in done:
        row = run_row(job, record, by_role["counterfactual"].get(key(job), {}).get("summary"))
        row["bertscore_f1"] = next(f1s) if job.policy.role != "reference" else None
        rows.append(row)
    return rows


def _ci95(values: pd.Series) -> float:
    """Half-width of the t-based 95 % confidence interval of the mean (NaN below two values)."""
    x = values.dropna()
    return float(t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and 95 % CI over prompts per (policy, setting); seeds are averaged within a prompt first, so the CI
    is over prompts, the unit the claim is about."""
    df = pd.DataFrame(rows)
    df[list(METRICS)] = df[list(METRICS)].astype(float)
    groups = ["policy", "setting"]
    per_prompt = df.groupby([*groups, "prompt_id"], sort=False, dropna=False)[list(METRICS)].mean()
    stats = per_prompt.groupby(level=groups, sort=False).agg(["mean", _ci95, "count"])
    labels = df.groupby(groups, sort=False)[["estimator", "k", "gamma", "skip_rate"]].first()
    out = []
    for (policy, setting), r in stats.iterrows():
        row = {"policy": policy, "setting": setting,
               **{c: _plain(labels.loc[(policy, setting), c]) for c in labels.columns},
               "n_prompts": int(r[("upload_rate", "count")])}
        row["k"] = int(row["k"]) if row["k"] is not None else None
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_ci95"] = _plain(r[(m, "mean")]), _plain(r[(m, "_ci95")])
        out.append(row)
    return out


def _plain(value: Any) -> Any:
    """numpy scalars to Python, NaN to None (JSON has no NaN)."""
    if value is None:
        return None
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def versus_control(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The subject against its control at the matched upload rate, paired by (prompt, seed): the mean BERTScore
    difference with a 95 % CI over prompts and a verdict that only claims what the CI supports."""
    subject, control = with_role("subject"), with_role("control")
    df = pd.DataFrame(rows)
    if not {subject, control} <= set(df["policy"]):
        return []
    cols = ["prompt_id", "seed", "setting", "bertscore_f1", "upload_rate", "energy_saving"]
    mine, theirs = df[df.policy == subject][[*cols, "estimator", "k", "gamma"]], df[df.policy == control][cols]
    pairs = mine.merge(theirs, on=["prompt_id", "seed", "setting"], suffixes=(f"_{subject}", f"_{control}"))
    out = []
    for setting, g in pairs.groupby("setting", sort=False):
        per_prompt = g.groupby("prompt_id")[[c for c in g.columns if c.endswith((f"_{subject}", f"_{control}"))]].mean()
        delta = (per_prompt[f"bertscore_f1_{subject}"] - per_prompt[f"bertscore_f1_{control}"]).astype(float)
        mean, ci = float(delta.mean()), _ci95(delta)
        verdict = ("no clear difference" if math.isnan(ci) or abs(mean) <= ci else
                   f"{subject} better" if mean > 0 else f"{control} better")
        out.append({"setting": setting, "estimator": g["estimator"].iloc[0], "k": int(g["k"].iloc[0]),
                    "gamma": float(g["gamma"].iloc[0]), "n_prompts": len(per_prompt),
                    **{c: _plain(per_prompt[c].mean()) for c in per_prompt.columns},
                    "delta_bertscore": mean, "delta_bertscore_ci95": _plain(ci), "verdict": verdict})
    return out


def _quality(summary: Sequence[dict[str, Any]], policy: str | None) -> float | None:
    """`policy`'s mean BERTScore in `summary` (None where it did not run)."""
    row = next((r for r in summary if policy is not None and r["policy"] == policy), None)
    return row["bertscore_f1_mean"] if row else None


def gated_baseline() -> str | None:
    """U-HLM: the baseline gated on an uncertainty threshold, the paper's 'vs U-HLM' comparison."""
    return next((p.name for p in POLICIES.values() if p.role == "baseline" and p.uses_u_th), None)


def pick_setting(summary: Sequence[dict[str, Any]], min_bertscore: float,
                 estimator: str | None = None) -> dict[str, Any] | None:
    """The subject setting with the largest mean energy saving whose mean BERTScore is at least `min_bertscore`."""
    subject = with_role("subject")
    ok = [r for r in summary if r["policy"] == subject and (estimator is None or r["estimator"] == estimator)
          and r["bertscore_f1_mean"] is not None and r["bertscore_f1_mean"] >= min_bertscore
          and r["energy_saving_mean"] is not None]
    return max(ok, key=lambda r: r["energy_saving_mean"], default=None)


def by_estimator(comparisons: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`versus_control`'s verdicts counted per estimator, with the mean BERTScore difference."""
    verdicts = (f"{with_role('subject')} better", f"{with_role('control')} better", "no clear difference")
    out: dict[str, dict[str, Any]] = {}
    for c in comparisons:
        e = out.setdefault(c["estimator"], {"settings": 0, **dict.fromkeys(verdicts, 0), "deltas": []})
        e["settings"] += 1
        e[c["verdict"]] += 1
        e["deltas"].append(c["delta_bertscore"])
    for e in out.values():
        e["mean_delta_bertscore"] = sum(e.pop("deltas")) / e["settings"]
    return out


def choose_defaults(rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]],
                    tolerance: float = 0.01) -> dict[str, Any]:
    """Defaults from evidence. Accuracy-leaning: the most energy saved with BERTScore within `tolerance` of HLM
    (the counterfactual); if no setting gets that close, the subject setting with the best BERTScore (and the text
    says so). Energy-leaning: the most saved with BERTScore within `tolerance` of U-HLM (the paper's 'vs U-HLM'
    comparison). Estimator: the one the accuracy-leaning pick uses, reported beside how each estimator fares
    against its control (random skipping) at the same upload rate."""
    subject = with_role("subject")
    hlm_q, uhlm_q = _quality(summary, with_role("counterfactual")), _quality(summary, gated_baseline())
    accuracy = pick_setting(summary, hlm_q - tolerance if hlm_q is not None else -math.inf)
    accuracy_floor = f"HLM {hlm_q:.3f} - {tolerance}" if hlm_q is not None else "no HLM run"
    if accuracy is None:
        scored = [r for r in summary if r["policy"] == subject and r["bertscore_f1_mean"] is not None]
        accuracy = max(scored, key=lambda r: r["bertscore_f1_mean"], default=None)
        accuracy_floor = f"none reaches {accuracy_floor}: this is the best BERTScore of {subject}"
    energy = pick_setting(summary, uhlm_q - tolerance if uhlm_q is not None else -math.inf)
    comparisons = versus_control(rows)
    estimators = by_estimator(comparisons)
    lines = [_describe("accuracy-leaning", accuracy, accuracy_floor),
             _describe("energy-leaning", energy, f"U-HLM {uhlm_q:.3f} - {tolerance}" if uhlm_q is not None
                       else "no U-HLM run"), *_verdicts(estimators)]
    if comparisons and not any(c["verdict"] == f"{subject} better" for c in comparisons):
        lines.append("Importance did NOT beat random skipping at equal upload rate in any setting of this sweep.")
    return {"tolerance": tolerance, "hlm_bertscore": hlm_q, "uhlm_bertscore": uhlm_q,
            "estimator": accuracy["estimator"] if accuracy else None, "accuracy_leaning": accuracy,
            "energy_leaning": energy, "by_estimator": estimators, "versus_random": comparisons,
            "why": " ".join(lines)}


def _describe(name: str, pick: dict[str, Any] | None, floor: str) -> str:
    if pick is None:
        return f"{name}: no {with_role('subject')} setting reaches {floor}."
    return (f"{name}: {pick['setting']} saves {pick['energy_saving_mean']:.1%} device energy at BERTScore "
            f"{pick['bertscore_f1_mean']:.3f} (upload rate {pick['upload_rate_mean']:.1%}; {floor}).")


def _verdicts(estimators: dict[str, dict[str, Any]]) -> list[str]:
    """One line per estimator: how it fared against the control over the settings of this sweep."""
    subject, control = with_role("subject"), with_role("control")
    return [f"{name} vs {control} at the same upload rate over {e['settings']} settings: {subject} better in "
            f"{e[f'{subject} better']}, {control} better in {e[f'{control} better']}, no clear difference in "
            f"{e['no clear difference']}; mean ΔBERTScore {e['mean_delta_bertscore']:+.4f}."
            for name, e in estimators.items()]


@dataclass
class Result:
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    decisions: dict[str, Any]
    figures: dict[str, Any]
    failed: list[dict[str, str]]  # jobs that raised (their prompts are left out of every table)


def sweep(workers: Workers, scorer: QualityScorer, spec: SweepSpec,
          after_run: Callable[[Job, dict], None] | None = None) -> Result:
    """Run everything (resuming), score, aggregate, choose the defaults and write every output file.
    `after_run(job, record)` is called after each new run (progress, interruption in tests)."""
    out = spec.out_dir
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done, failed = execute(workers, spec, after_run)
    jobs_wall_s = time.perf_counter() - start
    rows = tabulate(done, scorer)
    summary = aggregate(rows)
    decisions = choose_defaults(rows, summary, spec.tolerance)
    figures = write_figures(summary, decisions, out / "figures", png=spec.png)
    meta = {**_meta(workers, scorer, spec, len(rows)), "sweep_wall_s": time.perf_counter() - start,
            "jobs_wall_s": jobs_wall_s, "figures": figures, "failed_jobs": failed}
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    write_atomic(out / "results.json", {"meta": meta, "rows": rows})
    pd.DataFrame(summary).to_csv(out / "summary.csv", index=False)
    write_atomic(out / "decisions.json", decisions)
    return Result(rows, summary, decisions, figures, failed)


def _meta(workers: Workers, scorer: QualityScorer, spec: SweepSpec, runs: int) -> dict[str, Any]:
    """What results.json records about the sweep besides its rows."""
    base = spec.base
    return {**spec.meta, "models": spec.models, "prompts": len(spec.prompts), "runs": runs,
            "grid": {k: v for k, v in asdict(spec.grid).items() if k != "settings"}, "sampling": asdict(base.sampling),
            "link": asdict(base.link), "uplink_rate_bps": base.link.uplink_rate_bps,
            "device_profile": asdict(base.device), "link_preset": link_label(base.link_preset, base.link),
            "energy_methods": call(workers, energy_methods, (base.link, base.device)), "quality": scorer.method,
            "numerics": workers.facts.numerics, "workers": getattr(workers, "n", 1)}


def format_summary(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a plain text table: mean ± 95 % CI over prompts."""
    def cell(r: dict[str, Any], m: str, scale: float, digits: int) -> str:
        mean, ci = r[f"{m}_mean"], r[f"{m}_ci95"]
        if mean is None:
            return "-"
        return f"{mean * scale:.{digits}f}" + (f" ±{ci * scale:.{digits}f}" if ci is not None else "")

    head = (f"{'policy':<7} {'setting':<24} {'upload %':>12} {'saving %':>12} {'BERTScore F1':>15} "
            f"{'tok/s (link)':>13}")
    lines = [head, "-" * len(head)]
    for r in summary:
        lines.append(f"{r['policy']:<7} {r['setting']:<24} {cell(r, 'upload_rate', 100, 1):>12} "
                     f"{cell(r, 'energy_saving', 100, 1):>12} {cell(r, 'bertscore_f1', 1, 3):>15} "
                     f"{cell(r, 'tokens_per_s_modelled_link', 1, 2):>13}")
    return "\n".join(lines)
