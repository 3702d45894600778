"""Prompt sets: JSON Lines with `id`, `category` and `prompt` (hlm/assets/prompts.jsonl), or plain text, one per
line."""

from __future__ import annotations

import json
from pathlib import Path

from hlm import ASSETS

DEFAULT_PROMPTS = ASSETS / "prompts.jsonl"


def load_prompts(path: str | Path = DEFAULT_PROMPTS, limit: int | None = None) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    rows: list[dict[str, str]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if path.suffix == ".jsonl":
            row = json.loads(line)
            if not isinstance(row, dict) or not str(row.get("prompt", "")).strip():
                raise ValueError(f"{path}:{n}: each line needs a non-empty 'prompt'")
            rows.append({"id": str(row.get("id", n)), "category": str(row.get("category", "")),
                         "prompt": str(row["prompt"])})
        else:
            rows.append({"id": str(n), "category": "", "prompt": line.strip()})
    return rows[:limit] if limit else rows
