"""`python -m hlm eval humaneval` (docs/humaneval.md): HumanEval pass@1 per upload policy, evaluation only.

`harness` (the problems, the prompt, the completion taken from an answer, its execution), `child` (the interpreter
that runs one completion under limits), `evaluate` (the runs, resumable and on `Workers`, their verdicts and the
output files), `report` (pass@1, paired differences, the table and the curve).
"""
