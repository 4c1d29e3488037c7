"""search/query_features.py: the groups a caption falls into, on plain examples."""
import pytest

from search.query_features import (GROUPS, LANGUAGES, LENGTH_KEYS, WORD_KEYS, caption_language, length_group,
                                   query_features, words)


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


@pytest.mark.parametrize("text, language, groups", [
    ("两个红色的小圆在左边", "zh", ("counts", "colours", "spatial")),
    ("一张沙色的图片，三个十字在下面", "zh", ("counts", "spatial")),
    ("紫色的三角形", "zh", ("colours",)),  # 三 of 三角形 (triangle) and 十 of 十字 (cross) are no counts
    ("只有一个大方块，没有别的", "zh", ("counts", "negation")),
    ("a red bus", "en", ("colours",)),
    ("a photo of 北京", "zh", ()),  # any Han character makes a caption Chinese
    ("カメラ ラーメン", "en", ()),  # kana are no Han: only Chinese is told apart
])
def test_language_and_chinese_word_groups(text, language, groups):
    features = query_features(text)
    assert (caption_language(text), features.language, features.groups) == (language, language, groups)


def test_each_han_character_is_a_word():
    assert words("两个red圆 ok") == ["两", "个", "red", "圆", "ok"]
    assert query_features("两个红色的小圆在左边").n_words == 10
    assert [code for code, _ in LANGUAGES] == ["en", "zh"]


def test_words_and_all_groups():
    assert words("The dog's ball, 2 cats_and A-B") == ["the", "dog's", "ball", "2", "cats", "and", "a", "b"]
    features = query_features("two black cats sleeping")
    assert features.n_words == 4 and features.all_groups == ("words_1_5", "counts", "colours")


def test_group_keys_are_unique_and_cover_both_kinds():
    keys = [key for key, _ in GROUPS]
    assert len(keys) == len(set(keys)) == len(LENGTH_KEYS) + len(WORD_KEYS)
