"""Prompt sets: JSON Lines with `id`, `category` and `prompt` (hlm/assets/prompts.jsonl), or plain text, one per
line."""

from __future__ import annotations

import json
from pathlib import Path

from hlm import ASSETS
from hlm.errors import UserError

DEFAULT_PROMPTS = ASSETS / "prompts.jsonl"


class PromptFileError(UserError):
    """A prompt file a user can fix: unreadable, a line that is not JSON, or one without a prompt."""


def load_prompts(path: str | Path = DEFAULT_PROMPTS, limit: int | None = None) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    rows: list[dict[str, str]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"cannot read {path}: {exc}") from exc
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptFileError(f"{path}:{n}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or not str(row.get("prompt", "")).strip():
                raise PromptFileError(f"{path}:{n}: each line needs a non-empty 'prompt'")
            rows.append({"id": str(row.get("id", n)), "category": str(row.get("category", "")),
                         "prompt": str(row["prompt"])})
        else:
            rows.append({"id": str(n), "category": "", "prompt": line.strip()})
    return rows[:limit] if limit else rows
