"""search/query_features.py: the groups a caption falls into, on plain examples."""
import pytest

from search.query_features import GROUPS, LENGTH_KEYS, WORD_KEYS, length_group, query_features, words


@pytest.mark.parametrize("n, group", [(0, "words_1_5"), (1, "words_1_5"), (5, "words_1_5"), (6, "words_6_10"),
                                      (10, "words_6_10"), (11, "words_11_15"), (15, "words_11_15"),
                                      (16, "words_16_plus"), (80, "words_16_plus")])
def test_length_buckets_have_inclusive_upper_bounds(n, group):
    assert length_group(n) == group
    assert query_features(" ".join(["dog"] * n)).length == group


@pytest.mark.parametrize("text, groups", [
    ("A dog runs on the beach.", ()),
    ("Two dogs play in the snow", ("counts",)),
    ("a man holding 3 balloons", ("counts",)),
    ("a red bus", ("colours",)),
    ("A GREY cat", ("colours",)),
    ("the cup left of the plate", ("spatial",)),
    ("a boy standing in front of a door", ("spatial",)),
    ("a room with no people", ("negation",)),
    ("the street isn't busy", ("negation",)),
    ("a table without chairs", ("negation",)),
    ("three blue birds above a tree, none of them flying", ("counts", "colours", "spatial", "negation")),
    ("someone frontward in the picture", ()),  # "front" only counts as "in front"
    ("a redhead someone", ()),  # whole words only: "redhead" is no colour word
])
def test_word_groups(text, groups):
    assert query_features(text).groups == groups


def test_words_and_all_groups():
    assert words("The dog's ball, 2 cats_and A-B") == ["the", "dog's", "ball", "2", "cats", "and", "a", "b"]
    features = query_features("two black cats sleeping")
    assert features.n_words == 4 and features.all_groups == ("words_1_5", "counts", "colours")


def test_group_keys_are_unique_and_cover_both_kinds():
    keys = [key for key, _ in GROUPS]
    assert len(keys) == len(set(keys)) == len(LENGTH_KEYS) + len(WORD_KEYS)
