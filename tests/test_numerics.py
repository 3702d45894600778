"""The numerics key: written and read in one place, so the keys stored in results folders keep matching."""

import json
from dataclasses import replace
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from hlm.models.numerics import Numerics, without_draft

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _stored_keys() -> set[str]:
    metas = (json.loads(p.read_text()).get("meta", {}) for p in RESULTS.rglob("results.json"))
    return {meta["numerics"] for meta in metas if "numerics" in meta}


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


WORD = st.text(st.sampled_from("abcz0189+-_.,()"), max_size=8)  # what a dtype, recipe or attention looks like


@given(WORD, st.lists(st.tuples(st.sampled_from(["draft", "verifier"]), WORD), max_size=2, unique_by=lambda r: r[0]),
       WORD, st.integers(1, 64))
def test_a_key_reads_back_as_the_parts_that_wrote_it(dtype, recipes, attention, block):
    """Whatever the parts (a recipe with commas included, as `recipe_of` leaves them), the key reads back as them,
    and the draft comes out by role alone."""
    parts = Numerics(dtype, tuple(sorted(recipes)), attention, block)
    assert Numerics.parse(str(parts)) == parts
    assert without_draft(str(parts)) == str(Numerics(dtype, tuple(r for r in sorted(recipes) if r[0] != "draft"),
                                                     attention, block))


def test_the_verifiers_block_of_rows_is_named_only_where_stored_keys_did_not_have_it():
    four = Numerics("bfloat16", (("verifier", "q4k,"),), "sdpa+exact-rows", 4)
    one = replace(four, verifier_block_rows=1)
    assert str(four) == "bfloat16; verifier q4k,; verifier sdpa+exact-rows"
    assert str(one) == "bfloat16; verifier q4k,; verifier sdpa+exact-rows, 1-row blocks"
    assert Numerics.parse(str(one)) == one and without_draft(str(one)) == str(one)


@given(st.text(max_size=60))
def test_any_string_is_read_as_itself_or_not_at_all(key):
    parsed = Numerics.parse(key)
    assert parsed is None or str(parsed) == key
    assert parsed is not None or without_draft(key) == key


def test_the_pair_writes_its_key_through_numerics(tiny):
    parts = Numerics.parse(tiny.numerics)
    assert parts is not None and parts.recipes == ()
    assert parts.verifier_attention == tiny.verifier.config._attn_implementation
    assert parts.verifier_block_rows == tiny.verifier.hlm_block_rows in (1, 4)
