"""BERTScore quality (`hlm.experiments.quality`): texts that strip to nothing are scored, never a crash."""

import pytest

from hlm.experiments.quality import get_scorer

EMPTY = ["", " ", "\n", "\x1e", " \t\n "]


@pytest.fixture(scope="module")
def scorer():
    return get_scorer()


@pytest.mark.parametrize("empty", EMPTY)
def test_an_empty_answer_scores_zero_against_a_real_reference(scorer, empty):
    assert scorer.f1([empty], ["hello there"]) == [0.0]


@pytest.mark.parametrize("empty", EMPTY)
def test_an_empty_reference_scores_zero_for_a_real_answer(scorer, empty):
    assert scorer.f1(["hello there"], [empty]) == [0.0]


@pytest.mark.parametrize("empty", EMPTY)
def test_two_empty_texts_are_identical(scorer, empty):
    assert scorer.f1([empty], ["\n"]) == [1.0]


def test_empty_pairs_mixed_with_real_ones_keep_their_places(scorer):
    real = scorer.f1(["the cat sat", "a sorted list"], ["the cat sat down", "merge two lists"])
    mixed = scorer.f1(["the cat sat", " ", "a sorted list", ""],
                      ["the cat sat down", "merge two lists", "merge two lists", ""])
    assert mixed[0] == pytest.approx(real[0], abs=1e-6) and mixed[2] == pytest.approx(real[1], abs=1e-6)
    assert mixed[1] == 0.0 and mixed[3] == 1.0
    assert 0.0 < real[1] < real[0] < 1.0  # a real score, not a constant
    assert scorer.f1([], []) == []
    with pytest.raises(ValueError):
        scorer.f1(["a"], [])


def test_the_backbone_is_read_into_memory_not_left_mapped(scorer):
    """A mapped checkpoint's pages come in as tokens first use them: the app's RSS would creep for hours."""
    from hlm.experiments.quality import offline_backbone

    weights = str(offline_backbone() / "model.safetensors")
    with open("/proc/self/maps") as f:
        assert not [line for line in f if line.rstrip().endswith(weights)]
