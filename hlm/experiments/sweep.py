"""`python -m hlm sweep`: the energy/quality trade-off measured on one model pair, and the defaults chosen from it.

Every (prompt, policy, setting, seed) is one run, cached as DIR/runs/<hash>.json where the hash covers the model
spec, the prompt and the full RunConfig: an interrupted sweep resumes by skipping the runs already on disk. The
`llm` run of each (prompt, seed) is always made: it is the BERTScore reference. The `random` control runs last:
for each `ours` setting its skip rate is 1 - (ours upload rate) measured on the same prompts, so it uploads as
often as `ours` while choosing *which* drafts to upload by a coin. Ours beating it at
equal upload rate is the evidence that importance picks the right tokens.

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

from hlm.config import ESTIMATORS, ConfigError, PolicyConfig, RunConfig, link_label
from hlm.policies import REGISTRY as POLICIES

if TYPE_CHECKING:
    import pandas as pd
    from tqdm import tqdm

    from hlm.decoder import HybridDecoder
    from hlm.events import TokenEvent
    from hlm.experiments.quality import QualityScorer

HYBRID = tuple(n for n, p in POLICIES.items() if p.drafts)
TUNED = tuple(n for n, p in POLICIES.items() if p.tuned)  # rows with an importance setting (random: the one matched)
GATED = tuple(n for n, p in POLICIES.items() if p.uses_u_th)  # rows with u_th
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


def setting_label(policy: PolicyConfig) -> str:
    """The importance setting as a short label (rows, summary, figures)."""
    return f"{policy.estimator} k={policy.k} γ={policy.gamma:g}"


@dataclass(frozen=True)
class Job:
    prompt: dict[str, str]  # id, category, prompt
    config: RunConfig
    matched_to: str = ""  # random control: the ours setting whose upload rate it matches

    def identity(self, models: str) -> dict[str, Any]:
        return {"models": models, "prompt_id": self.prompt["id"],
                "prompt_sha256": hashlib.sha256(self.prompt["prompt"].encode()).hexdigest(),
                "config": self.config.to_dict()}

    def label(self) -> str:
        pol = self.config.policy
        return POLICIES[pol.name].label(pol)


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
        if "random" in self.policies and "ours" not in self.policies:
            raise ConfigError("the random control is matched to ours settings: include ours")
        settings = tuple(PolicyConfig(name="ours", u_th=self.u_th, k=k, gamma=g, estimator=e)  # validates
                         for e in self.estimators for k in self.ks for g in self.gammas)
        object.__setattr__(self, "settings", settings if "ours" in self.policies else ())

    def first_jobs(self, prompts: Sequence[dict[str, str]], base: RunConfig) -> list[Job]:
        """Everything but the random control, prompt by prompt (a partial sweep holds whole prompts)."""
        singles = ["llm", *(p for p in ("hlm", "slm", "uhlm") if p in self.policies)]
        jobs = []
        for prompt in prompts:
            for seed in self.seeds:
                cfg = replace(base, sampling=replace(base.sampling, seed=seed))
                jobs += [Job(prompt, replace(cfg, policy=PolicyConfig(name=p, **({"u_th": self.u_th} if p in GATED
                                                                                   else {})))) for p in singles]
                jobs += [Job(prompt, replace(cfg, policy=s)) for s in self.settings]
        return jobs

    def random_count(self, prompts: Sequence[dict[str, str]]) -> int:
        return len(prompts) * len(self.seeds) * len(self.settings) if "random" in self.policies else 0

    def random_jobs(self, first: Sequence[tuple[Job, dict]]) -> list[Job]:
        """The random control for each ours setting, at the skip rate that matches its pooled upload rate."""
        if "random" not in self.policies:
            return []
        pooled: dict[str, list[int]] = {}
        for job, record in first:
            pol = job.config.policy
            if pol.name == "ours":
                tally = pooled.setdefault(setting_label(pol), [0, 0])
                tally[0] += record["summary"]["uploads"]
                tally[1] += record["summary"]["tokens"]
        jobs = []
        for job, _ in first:
            pol = job.config.policy
            if pol.name == "ours":
                up, tokens = pooled[setting_label(pol)]
                skip = round(1.0 - up / tokens, 4) if tokens else 1.0
                jobs.append(Job(job.prompt, job.config.with_policy(name="random", skip_rate=skip),
                                setting_label(pol)))
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


class Runner:
    """Runs jobs through one decoder, skipping those whose run file exists."""

    def __init__(self, decoder: HybridDecoder, models: str, runs_dir: Path, bar: tqdm,
                 after_run: Callable[[Job, dict], None] | None = None) -> None:
        self.decoder, self.models, self.runs_dir, self.bar, self.after_run = decoder, models, runs_dir, bar, after_run
        runs_dir.mkdir(parents=True, exist_ok=True)

    def path(self, job: Job) -> Path:
        text = json.dumps([job.identity(self.models), self.decoder.pair.numerics], sort_keys=True)
        return self.runs_dir / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"

    def cached(self, jobs: Sequence[Job]) -> int:
        return sum(self.path(j).is_file() for j in jobs)

    def run(self, jobs: Sequence[Job]) -> list[tuple[Job, dict]]:
        """Records in job order. The bar advances only for new runs (cached ones were counted up front)."""
        done = []
        for job in jobs:
            path = self.path(job)
            if path.is_file():
                done.append((job, json.loads(path.read_text(encoding="utf-8"))))
                continue
            self.bar.set_postfix_str(f"{job.prompt['id']} {job.label()}", refresh=False)
            text, events, summary = self.decoder.run(job.prompt["prompt"], job.config)
            record = {"identity": job.identity(self.models), "text": text, "summary": summary,
                      "tokens": [minimal_token(e) for e in events]}
            write_atomic(path, record)
            self.bar.update(1)
            done.append((job, record))
            if self.after_run is not None:
                self.after_run(job, record)
        return done


def execute(decoder: HybridDecoder, models: str, prompts: Sequence[dict[str, str]], grid: Grid, base: RunConfig,
            out_dir: Path, progress: bool = True,
            after_run: Callable[[Job, dict], None] | None = None) -> list[tuple[Job, dict]]:
    """Run (or load) every job of the sweep; returns (job, record) pairs, random controls last."""
    from tqdm import tqdm

    first = grid.first_jobs(prompts, base)
    with tqdm(total=len(first) + grid.random_count(prompts), unit="run", desc="sweep", disable=not progress,
              dynamic_ncols=True, file=sys.stderr) as bar:
        runner = Runner(decoder, models, out_dir / "runs", bar, after_run)
        bar.update(runner.cached(first))
        done = runner.run(first)
        second = grid.random_jobs(done)
        bar.update(runner.cached(second))
        return done + runner.run(second)


def _per_token(value: float | None, tokens: int) -> float | None:
    return value / tokens if value is not None and tokens else None


def tabulate(done: Sequence[tuple[Job, dict]], scorer: QualityScorer) -> list[dict[str, Any]]:
    """One tidy row per run: the settings, every Summary figure, per-token energy and BERTScore F1 against the
    `llm` output for the same prompt and seed (scored in one batch by the one loaded scorer)."""
    def key(job: Job) -> tuple[str, int]:
        return job.prompt["id"], job.config.sampling.seed

    by_policy: dict[str, dict[tuple[str, int], dict]] = {"llm": {}, "hlm": {}}
    for job, record in done:
        if job.config.policy.name in by_policy:
            by_policy[job.config.policy.name][key(job)] = record
    scored = [(job, record) for job, record in done if job.config.policy.name != "llm"]
    f1s = iter(scorer.f1([r["text"] for _, r in scored], [by_policy["llm"][key(j)]["text"] for j, _ in scored]))

    rows = []
    for job, record in done:
        pol, s = job.config.policy, record["summary"]
        tuned = pol.name in TUNED
        n = s["tokens"]
        hlm = by_policy["hlm"].get(key(job), {}).get("summary")
        hlm_per_token = _per_token(hlm["device_energy_j"], hlm["tokens"]) if hlm else None
        mine = _per_token(s["device_energy_j"], n)
        row: dict[str, Any] = {
            "prompt_id": job.prompt["id"], "category": job.prompt["category"], "seed": job.config.sampling.seed,
            "policy": pol.name, "setting": (job.matched_to or setting_label(pol)) if tuned else "-",
            "estimator": pol.estimator if tuned else None, "k": pol.k if tuned else None,
            "gamma": pol.gamma if tuned else None, "u_th": pol.u_th if pol.name in GATED else None,
            "skip_rate": pol.skip_rate if pol.name == "random" else None, "matched_to": job.matched_to or None,
        }
        row |= {k: v for k, v in s.items() if not isinstance(v, dict) and k != "policy"}
        parts = s["device_energy_parts_j"]
        row |= {f"device_energy_{short}_j": parts[part] for part, short in PART_COLUMNS.items()}
        row["device_j_per_token"] = mine
        row |= {f"{short}_j_per_token": _per_token(parts[part], n) for part, short in PART_COLUMNS.items()}
        row["energy_saving_vs_hlm_run"] = (1.0 - mine / hlm_per_token if mine is not None and hlm_per_token
                                           and pol.name != "llm" else None)
        row["bertscore_f1"] = next(f1s) if pol.name != "llm" else None
        rows.append(row)
    return rows


def _ci95(values: pd.Series) -> float:
    """Half-width of the t-based 95 % confidence interval of the mean (NaN below two values)."""
    from scipy.stats import t

    x = values.dropna()
    return float(t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and 95 % CI over prompts per (policy, setting); seeds are averaged within a prompt first, so the CI
    is over prompts, the unit the claim is about."""
    import pandas as pd

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


def versus_random(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours against its random control at the matched upload rate, paired by (prompt, seed): the mean BERTScore
    difference with a 95 % CI over prompts and a verdict that only claims what the CI supports."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if not {"ours", "random"} <= set(df["policy"]):
        return []
    cols = ["prompt_id", "seed", "setting", "bertscore_f1", "upload_rate", "energy_saving"]
    ours, rnd = df[df.policy == "ours"][[*cols, "estimator", "k", "gamma"]], df[df.policy == "random"][cols]
    pairs = ours.merge(rnd, on=["prompt_id", "seed", "setting"], suffixes=("_ours", "_random"))
    out = []
    for setting, g in pairs.groupby("setting", sort=False):
        per_prompt = g.groupby("prompt_id")[[c for c in g.columns if c.endswith(("_ours", "_random"))]].mean()
        delta = (per_prompt["bertscore_f1_ours"] - per_prompt["bertscore_f1_random"]).astype(float)
        mean, ci = float(delta.mean()), _ci95(delta)
        verdict = ("no clear difference" if math.isnan(ci) or abs(mean) <= ci else
                   "ours better" if mean > 0 else "random better")
        out.append({"setting": setting, "estimator": g["estimator"].iloc[0], "k": int(g["k"].iloc[0]),
                    "gamma": float(g["gamma"].iloc[0]), "n_prompts": len(per_prompt),
                    **{c: _plain(per_prompt[c].mean()) for c in per_prompt.columns},
                    "delta_bertscore": mean, "delta_bertscore_ci95": _plain(ci), "verdict": verdict})
    return out


def _row(summary: Sequence[dict[str, Any]], policy: str) -> dict[str, Any] | None:
    return next((r for r in summary if r["policy"] == policy), None)


def pick_setting(summary: Sequence[dict[str, Any]], min_bertscore: float,
                 estimator: str | None = None) -> dict[str, Any] | None:
    """The ours setting with the largest mean energy saving whose mean BERTScore is at least `min_bertscore`."""
    ok = [r for r in summary if r["policy"] == "ours" and (estimator is None or r["estimator"] == estimator)
          and r["bertscore_f1_mean"] is not None and r["bertscore_f1_mean"] >= min_bertscore
          and r["energy_saving_mean"] is not None]
    return max(ok, key=lambda r: r["energy_saving_mean"], default=None)


def decide(rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]],
           tolerance: float = 0.01) -> dict[str, Any]:
    """Defaults from evidence. Accuracy-leaning: the most energy saved with BERTScore within `tolerance` of HLM;
    if no setting gets that close, the ours setting with the best BERTScore (and the text says so).
    Energy-leaning: the most saved with BERTScore within `tolerance` of U-HLM (the paper's 'vs U-HLM' comparison).
    Estimator: the one the accuracy-leaning pick uses, reported beside how each estimator fares against random
    skipping at the same upload rate."""
    hlm, uhlm = _row(summary, "hlm"), _row(summary, "uhlm")
    hlm_q = hlm["bertscore_f1_mean"] if hlm else None
    uhlm_q = uhlm["bertscore_f1_mean"] if uhlm else None
    accuracy = pick_setting(summary, hlm_q - tolerance if hlm_q is not None else -math.inf)
    accuracy_floor = f"HLM {hlm_q:.3f} - {tolerance}" if hlm_q is not None else "no HLM run"
    if accuracy is None:
        scored = [r for r in summary if r["policy"] == "ours" and r["bertscore_f1_mean"] is not None]
        accuracy = max(scored, key=lambda r: r["bertscore_f1_mean"], default=None)
        accuracy_floor = f"none reaches {accuracy_floor}: this is the best BERTScore of ours"
    energy = pick_setting(summary, uhlm_q - tolerance if uhlm_q is not None else -math.inf)
    comparisons = versus_random(rows)
    by_estimator: dict[str, dict[str, Any]] = {}
    for c in comparisons:
        e = by_estimator.setdefault(c["estimator"], {"settings": 0, "ours better": 0, "random better": 0,
                                                     "no clear difference": 0, "deltas": []})
        e["settings"] += 1
        e[c["verdict"]] += 1
        e["deltas"].append(c["delta_bertscore"])
    for e in by_estimator.values():
        e["mean_delta_bertscore"] = sum(e.pop("deltas")) / e["settings"]

    def describe(name: str, pick: dict[str, Any] | None, floor: str) -> str:
        if pick is None:
            return f"{name}: no ours setting reaches {floor}."
        return (f"{name}: {pick['setting']} saves {pick['energy_saving_mean']:.1%} device energy at BERTScore "
                f"{pick['bertscore_f1_mean']:.3f} (upload rate {pick['upload_rate_mean']:.1%}; {floor}).")

    lines = [describe("accuracy-leaning", accuracy, accuracy_floor),
             describe("energy-leaning", energy, f"U-HLM {uhlm_q:.3f} - {tolerance}" if uhlm_q is not None
                      else "no U-HLM run")]
    for name, e in by_estimator.items():
        lines.append(f"{name} vs random at the same upload rate over {e['settings']} settings: ours better in "
                     f"{e['ours better']}, random better in {e['random better']}, no clear difference in "
                     f"{e['no clear difference']}; mean ΔBERTScore {e['mean_delta_bertscore']:+.4f}.")
    if comparisons and not any(c["verdict"] == "ours better" for c in comparisons):
        lines.append("Importance did NOT beat random skipping at equal upload rate in any setting of this sweep.")
    return {"tolerance": tolerance, "hlm_bertscore": hlm_q, "uhlm_bertscore": uhlm_q,
            "estimator": accuracy["estimator"] if accuracy else None, "accuracy_leaning": accuracy,
            "energy_leaning": energy, "by_estimator": by_estimator, "versus_random": comparisons,
            "why": " ".join(lines)}


@dataclass
class Result:
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    decisions: dict[str, Any]
    figures: dict[str, Any]


def sweep(decoder: HybridDecoder, models: str, prompts: Sequence[dict[str, str]], grid: Grid, base: RunConfig,
          out_dir: Path, scorer: QualityScorer, meta: dict[str, Any] | None = None, png: bool = True,
          progress: bool = True, tolerance: float = 0.01,
          after_run: Callable[[Job, dict], None] | None = None) -> Result:
    """Run everything (resuming), score, aggregate, decide and write every output file."""
    import pandas as pd

    from hlm.experiments.figures import write_figures

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = execute(decoder, models, prompts, grid, base, out_dir, progress, after_run)
    rows = tabulate(done, scorer)
    summary = aggregate(rows)
    decisions = decide(rows, summary, tolerance)
    figures = write_figures(summary, decisions, out_dir / "figures", png=png)
    meta = {**(meta or {}), "models": models, "prompts": len(prompts), "runs": len(rows),
            "grid": {k: v for k, v in asdict(grid).items() if k != "settings"}, "sampling": asdict(base.sampling),
            "link": asdict(base.link), "uplink_rate_bps": base.link.uplink_rate_bps,
            "device_profile": asdict(base.device), "link_preset": link_label(base.link_preset, base.link),
            "energy_methods": decoder.energy_methods(base.link, base.device), "quality": scorer.method,
            "sweep_wall_s": time.perf_counter() - start, "figures": figures}
    pd.DataFrame(rows).to_csv(out_dir / "results.csv", index=False)
    write_atomic(out_dir / "results.json", {"meta": meta, "rows": rows})
    pd.DataFrame(summary).to_csv(out_dir / "summary.csv", index=False)
    write_atomic(out_dir / "decisions.json", decisions)
    return Result(rows, summary, decisions, figures)


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
