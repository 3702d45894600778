"""The numerics key: the one line that says how a pair computes (its dtype, each role's fast path, the verifier's
attention and, where not 4, its float layers' block of rows), which keys every cached run, study answer and trace,
and is stored in results folders.

The line is the key, so its format cannot change without orphaning what is stored; `Numerics` is the only place
that writes it and reads it back, so the parts that depend on one role alone (`without_draft`: a run that never
drafts) are taken from fields, not from string surgery spread over the callers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

NO_FAST_PATH = "no fast path"
STORED_BLOCK_ROWS = 4  # every key written before the block was measured (`hlm.rows.block_rows`) had it: left unsaid
_BLOCKS = re.compile(r"(.*), (\d+)-row blocks")


@dataclass(frozen=True)
class Numerics:
    """A numerics key in parts. `recipes` holds (role, recipe) per role on a fast path, sorted by role; a recipe is
    the first word of that role's `ModelPair.quant` entry (`hlm.quant.recipe_of`, trailing comma and all);
    `verifier_block_rows` the rows per float GEMM of the verifier's short passes (`hlm.rows.block_rows`), named
    only where it is not STORED_BLOCK_ROWS, so stored keys still match."""

    dtype: str
    recipes: tuple[tuple[str, str], ...]
    verifier_attention: str
    verifier_block_rows: int = STORED_BLOCK_ROWS

    def __str__(self) -> str:
        recipes = ", ".join(f"{role} {recipe}" for role, recipe in self.recipes)
        blocks = "" if self.verifier_block_rows == STORED_BLOCK_ROWS else f", {self.verifier_block_rows}-row blocks"
        return f"{self.dtype}; {recipes or NO_FAST_PATH}; verifier {self.verifier_attention}{blocks}"

    @classmethod
    def parse(cls, key: str) -> Numerics | None:
        """The parts of a key this class wrote; None for a key of another shape (an older or hand-edited file's),
        which callers then compare whole."""
        fields = key.split("; ")
        if len(fields) != 3 or not fields[2].startswith("verifier "):
            return None
        dtype, recipes, attention = fields
        parts = [] if recipes == NO_FAST_PATH else [tuple(r.split(" ", 1)) for r in recipes.split(", ")]
        if any(len(p) != 2 for p in parts):
            return None
        attention = attention.removeprefix("verifier ")
        block = STORED_BLOCK_ROWS
        if blocks := _BLOCKS.fullmatch(attention):
            attention, block = blocks.group(1), int(blocks.group(2))
        parsed = cls(dtype, tuple(parts), attention, block)  # type: ignore[arg-type]
        return parsed if str(parsed) == key else None

    def without_draft(self) -> Numerics:
        """All that a run which never drafts (the LLM alone) depends on."""
        return replace(self, recipes=tuple(r for r in self.recipes if r[0] != "draft"))


def without_draft(key: str) -> str:
    """A numerics key with the draft's fast path taken out, so runs that never draft, made beside different drafts,
    serve each other (`PairFacts.run_key`) and are reported together (`eval merge --reference-from`). A key of
    another shape is returned whole: two such keys then match only if equal, which fails safe (decoded again)."""
    parsed = Numerics.parse(key)
    return key if parsed is None else str(parsed.without_draft())
