"""The LLM's greedy answers kept on disk, so that a restarted app (or the Docker image, built with `python -m hlm
references`) scores the page's example prompts without decoding the LLM at all: one JSON file per answer under the
user cache (`hlm.models.embedded.cache_dir`), keyed by the pair (the verifier as loaded: name, dtype, quant,
device; these decide its greedy tokens), the prompt and the settings that change a greedy answer.

JSON, never pickle: a file is only data, whoever wrote it. One that cannot be read, does not parse or does not
match its key is ignored (the answer is decoded again and the file rewritten); a cache that cannot be written only
costs that decode next time. The folder holds at most `LIMIT` answers, the least recently used go first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hlm.config import SamplingConfig
from hlm.decoder import TextStream, ends
from hlm.events import TokenEvent
from hlm.models.pairs import ModelPair

FORMAT = 2  # bumped when what a file holds changes: older files then miss (1: answers by assisted generation)
LIMIT = 256  # answers kept (a file is the prompt and its ids: about 1 KB for a page example, 100 KB at most)


class Store:
    """Greedy answers (token ids) in `folder`, one file per `key`."""

    def __init__(self, folder: Path, limit: int = LIMIT) -> None:
        self.folder, self.limit = folder, limit

    @staticmethod
    def key(pair: ModelPair, preset: str, prompt: str, sampling: SamplingConfig) -> dict[str, Any]:
        """What a greedy answer depends on (seed and top_p do not change it)."""
        return {"format": FORMAT, "pair": preset, "verifier": pair.describe()["verifier"], "prompt": prompt,
                "max_new_tokens": sampling.max_new_tokens, "stop_at_eos": sampling.stop_at_eos}

    def path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.folder / f"{digest[:32]}.json"

    def load(self, key: dict[str, Any], vocab_size: int) -> list[int] | None:
        """The stored ids, or None when there is no valid file for `key`."""
        path = self.path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            ids = data["ids"]
            ok = (data["key"] == key and isinstance(ids, list) and 0 < len(ids) <= key["max_new_tokens"]
                  and all(type(i) is int and 0 <= i < vocab_size for i in ids))
            if ok:
                os.utime(path)  # used: the last to go (`save`)
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return ids if ok else None

    def files(self) -> list[Path]:
        """The stored answers, least recently used first."""
        found = []
        for path in self.folder.glob("*.json"):
            with contextlib.suppress(OSError):  # one removed meanwhile
                found.append((path.stat().st_mtime, path))
        return [path for _, path in sorted(found)]

    def save(self, key: dict[str, Any], ids: list[int]) -> None:
        """Write atomically (a reader never sees half a file); a cache that cannot be written is skipped."""
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"key": key, "ids": ids}, f)
                os.replace(tmp, self.path(key))
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            for old in self.files()[:-self.limit]:
                old.unlink(missing_ok=True)


def answer_events(pair: ModelPair, prompt_len: int, sampling: SamplingConfig, ids: list[int]) -> list[TokenEvent]:
    """A stored answer as the events quality reads (index, position, id, its text); they carry no costs."""
    text, events = TextStream(pair.tokenizer), []
    for index, token in enumerate(ids):
        last = ends(sampling, index, token, pair.stop_ids)
        events.append(TokenEvent(index=index, position=prompt_len + index, token_id=token,
                                 text=text.push(token, last), source="cloud_sampled", uploaded=False))
    return events
