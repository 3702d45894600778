"""`python -m hlm study`: which device-side score picks the drafts the cloud would change (docs/selection.md).

Token-level, against a coin and an oracle, at matched upload budgets, with prompt-clustered bootstrap intervals:
- greedy replay: under greedy decoding the hybrid output equals the LLM's greedy answer y* until the first
  divergence (argmax p != y*) that is not uploaded. One LLM generation and one SLM prefill over prompt + y* give,
  exactly and for every rule, the first missed divergence and the faithful prefix. The paper-literal rules read
  attention rows over the *draft*, so at each divergence two extra SLM steps (from a copy of the cache) give the
  rows a decode over the draft would see;
- sampled paths: the SLM samples its own answer at T > 0; one SLM and one LLM prefill over it give every score
  and the exact rejection probability beta = max(0, 1 - q(d)/p(d)) and TV(p, q) of every draft.
Generation is batched (left padding) for speed; the LLM's teacher-forced argmax is checked against y*.

Every prompt's rows are cached in OUT/cache (resumable). `--fit` also fits the pair's `SelectionCalibration`
(RAUQ heads, probe, score scales) on these prompts; use it only on tuning prompts and report on others.

One module per job: `collect` (answers and per-draft rows), `score` (scores, calibration fit), `metrics`
(outcomes, capture, AUROC, `analyse`, `choose_defaults`), `confirm` (real decoder runs end to end), `report`
(files, figure, printout).
"""

from hlm.experiments.study.collect import collect
from hlm.experiments.study.confirm import confirm, faithful, paired_summary, sampled_quality
from hlm.experiments.study.metrics import analyse, capture, choose_defaults, coin_outcome
from hlm.experiments.study.outcome import greedy_outcome
from hlm.experiments.study.report import print_report, write_outputs
from hlm.experiments.study.score import fit_calibration

__all__ = ["analyse", "capture", "choose_defaults", "coin_outcome", "collect", "confirm", "faithful",
           "fit_calibration", "greedy_outcome", "paired_summary", "print_report", "sampled_quality", "write_outputs"]
