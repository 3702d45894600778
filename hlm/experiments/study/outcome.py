"""What uploading a set of drafts does to one greedy answer: shared by the metrics and the horizon's fit."""

from __future__ import annotations

import numpy as np


def greedy_outcome(selected: np.ndarray, g: np.ndarray) -> tuple[float, float | None, int, int]:
    """(faithful prefix fraction, first divergence caught or None when there is none, divergences caught, total)."""
    div = np.flatnonzero(g > 0)
    missed = div[~selected[div]]
    prefix = (missed[0] if len(missed) else len(g)) / len(g)
    return float(prefix), (float(selected[div[0]]) if len(div) else None), int(selected[div].sum()), len(div)
