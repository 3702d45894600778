"""What Ray costs per job: the same sweep serially and on Ray, one after the other on this machine.

    python scripts/cluster_overhead.py --models embedded --limit 8 --max-new-tokens 16 --policies ours,hlm,slm \
        --out runs/cluster-overhead

Each variant is a fresh `python -m hlm sweep` into its own folder (nothing cached). Per variant it prints the wall
time of the jobs phase (models already loaded), the sum of the runs' own times (`wall_s`, measured inside the
decoder) and the difference per job: the scheduling overhead. It also checks that every variant wrote the same rows
as the serial one (timings aside). Ratios are only meaningful within one run of this script: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hlm.config import PolicyConfig  # noqa: E402
from hlm.experiments.sweep import TIMED  # noqa: E402

HELDOUT = Path(__file__).resolve().parents[1] / "hlm" / "assets" / "prompts-heldout.jsonl"


def run(name: str, common: list[str], extra: list[str], out: Path) -> dict:
    folder = out / name
    cmd = [sys.executable, "-m", "hlm", "sweep", *common, "--out", str(folder), *extra]
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((folder / "results.json").read_text())


def figures(result: dict) -> dict[str, float]:
    rows, jobs_s = result["rows"], result["meta"]["jobs_wall_s"]
    own_s = sum(r["wall_s"] for r in rows)
    return {"jobs": len(rows), "jobs_wall_s": jobs_s, "own_s": own_s, "per_job_own_s": own_s / len(rows),
            "overhead_per_job_s": (jobs_s - own_s) / len(rows), "overhead_pct": 100 * (jobs_s - own_s) / own_s}


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMED} for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="embedded")
    p.add_argument("--prompts", default=str(HELDOUT))
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--policies", default="ours,hlm,slm")
    p.add_argument("--quant", default="none", help="explicit, so every process runs the same numerics")
    p.add_argument("--out", required=True)
    p.add_argument("--two-workers", action="store_true", help="also 2 workers of half the CPUs each")
    args = p.parse_args()
    common = ["--models", args.models, "--prompts", args.prompts, "--limit", str(args.limit), "--max-new-tokens",
              str(args.max_new_tokens), "--policies", args.policies, "--k", str(PolicyConfig.k),
              "--gamma", str(PolicyConfig.gamma), "--estimators", PolicyConfig.estimator, "--quant", args.quant,
              "--no-png"]
    out = Path(args.out)
    variants = {"serial": [], "ray-1-worker": ["--ray", "local", "--workers", "1", "--worker-cpus", "2"]}
    if args.two_workers:
        variants["ray-2-workers"] = ["--ray", "local", "--workers", "2", "--worker-cpus", "1"]
    results = {name: run(name, common, extra, out) for name, extra in variants.items()}
    base = results["serial"]
    print(f"{'variant':<14} {'jobs':>5} {'jobs wall s':>12} {'own s':>9} {'own s/job':>10} {'overhead s/job':>15} "
          f"{'overhead %':>11} {'vs serial':>10} {'same rows':>10}")
    for name, result in results.items():
        f = figures(result)
        same = untimed(result["rows"]) == untimed(base["rows"])
        print(f"{name:<14} {f['jobs']:>5} {f['jobs_wall_s']:>12.1f} {f['own_s']:>9.1f} {f['per_job_own_s']:>10.2f} "
              f"{f['overhead_per_job_s']:>15.3f} {f['overhead_pct']:>10.1f}% "
              f"{f['jobs_wall_s'] / figures(base)['jobs_wall_s']:>9.2f}x {str(same):>10}")


if __name__ == "__main__":
    main()
