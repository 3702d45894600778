"""The numerics key: written and read in one place, so the keys stored in results folders keep matching."""

import json
from pathlib import Path

from hlm.models.numerics import Numerics, without_draft

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _stored_keys() -> set[str]:
    return {json.loads(p.read_text())["meta"]["numerics"] for p in RESULTS.rglob("results.json")
            if "numerics" in json.loads(p.read_text()).get("meta", {})}


def test_every_key_in_the_committed_results_reads_back_as_written():
    keys = _stored_keys()
    current = {k for k in keys if len(k.split("; ")) == 3}
    assert current, "no three-part key among the committed results"
    for key in current:
        parts = Numerics.parse(key)
        assert parts is not None and str(parts) == key, key
        assert parts.verifier_attention.startswith("sdpa") and parts.dtype == "bfloat16", key
    for key in keys - current:  # the keys written before the verifier's attention joined them
        assert Numerics.parse(key) is None and without_draft(key) == key, key


def test_the_draft_is_taken_out_by_role_whatever_its_recipe_looks_like():
    gguf = "bfloat16; draft gguf,, verifier q4k,; verifier sdpa+exact-rows"  # a recipe with its trailing comma
    int8 = "bfloat16; draft int8+compiled, verifier q4k,; verifier sdpa+exact-rows"
    assert without_draft(gguf) == without_draft(int8) == "bfloat16; verifier q4k,; verifier sdpa+exact-rows"
    assert without_draft("bfloat16; draft int8; verifier sdpa") == "bfloat16; no fast path; verifier sdpa"
    assert without_draft("bfloat16; no fast path; verifier eager") == "bfloat16; no fast path; verifier eager"
    assert Numerics.parse("bfloat16; no fast path; verifier eager") == Numerics("bfloat16", (), "eager")
    for odd in ("an older key", "bfloat16; draft; verifier sdpa", "bfloat16; x y; sdpa", "a; b; c; verifier d"):
        assert Numerics.parse(odd) is None and without_draft(odd) == odd, odd


def test_the_pair_writes_its_key_through_numerics(tiny):
    parts = Numerics.parse(tiny.numerics)
    assert parts is not None and parts.recipes == ()
    assert parts.verifier_attention == tiny.verifier.config._attn_implementation
