"""`hlm.importance`: the paper-literal attention score and its adaptive threshold."""

import math

import torch

from hlm.importance import score


def test_importance_excludes_sinks_and_uses_the_adaptive_threshold():
    row = torch.tensor([0.6, 0.1, 0.02, 0.02, 0.2, 0.02, 0.04])  # query at 6, candidate 4 stands out
    imp = score(row, 4, k=1, gamma=1.0, sink_tokens=2)
    assert imp.rank == 0 and imp.important
    # sinks and the query itself are excluded from the renormalised row
    assert math.isclose(imp.score, 0.2 / (0.02 + 0.02 + 0.2 + 0.02), rel_tol=1e-6)
    assert not score(row, 5, k=3, gamma=1.0, sink_tokens=2).important  # below tau
    assert not score(row, 4, k=1, gamma=10.0, sink_tokens=2).important  # stricter gamma
    assert score(row, 6, k=8, gamma=0.0, sink_tokens=2).rank >= 0  # self estimator: the query scores itself
