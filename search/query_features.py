"""Features of a caption's text that retrieval models are known to trip over — its length, number words, colour
words, spatial words, negation — as named groups, so that recall can be sliced by them ("counting fails") and
failures filtered (the /eval page), and its language, so that recall can be reported per language. Pure text rules:
no model, no index.

A caption belongs to exactly one length group (by its word count), to any number of word groups and to one language:
"zh" when it holds a Han (CJK) character, else "en". In Chinese, which has no spaces, every Han character counts as a
word, and the word groups are found by characters and short words (红, 左边, 两…).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# (group key, label, most words): a caption of n words is in the first bucket with n <= most words
LENGTH_BUCKETS = (("words_1_5", "≤5 words", 5), ("words_6_10", "6–10 words", 10),
                  ("words_11_15", "11–15 words", 15), ("words_16_plus", ">15 words", None))

NUMBER_WORDS = frozenset("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                         "sixteen seventeen eighteen nineteen twenty thirty forty fifty hundred dozen dozens "
                         "couple pair several".split())
COLOUR_WORDS = frozenset("red orange yellow green blue purple pink brown black white grey gray silver gold golden "
                         "beige tan violet teal turquoise navy maroon crimson cyan magenta blond blonde "
                         "colorful colourful".split())
SPATIAL_WORDS = frozenset("left right top bottom above below behind beneath under underneath over beside "
                          "between".split())
SPATIAL_PHRASES = (("in", "front"), ("next", "to"))
NEGATION_WORDS = frozenset("no not without nothing none never nobody neither nor".split())
# Chinese: substrings of the caption (no word boundaries to rely on)
NUMBERS_ZH = tuple("一二两三四五六七八九十百几双对")
NOT_NUMBERS_ZH = ("三角", "十字")  # triangle, cross: number characters inside a shape's name
COLOURS_ZH = tuple("红橙黄绿蓝紫粉棕黑白灰银金青") + ("颜色", "彩色")
SPATIAL_ZH = ("左", "右", "上面", "下面", "上方", "下方", "上边", "下边", "前面", "后面", "旁边", "之间", "中间")
NEGATION_ZH = ("不", "没", "无", "非", "别的")

# (language code, label): the caption languages told apart, in the order pages show them
LANGUAGES = (("en", "English"), ("zh", "Chinese"))

# (group key, label, what it means): the word groups, in the order pages show them
WORD_GROUPS = (("counts", "counts", "number words or digits"), ("colours", "colours", "colour words"),
               ("spatial", "left/right", "spatial words: left, right, above, below, behind, in front…"),
               ("negation", "negation", "no, not, without, nothing, none…"))
GROUPS = tuple((key, label) for key, label, _ in LENGTH_BUCKETS) + tuple((key, label) for key, label, _ in
                                                                          WORD_GROUPS)
LABELS = dict(GROUPS)
LENGTH_KEYS = tuple(key for key, _, _ in LENGTH_BUCKETS)
WORD_KEYS = tuple(key for key, _, _ in WORD_GROUPS)

_HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"  # CJK ideographs and their extensions
# one Han character, or letters and digits (no Han) with inner apostrophes ("isn't" is one word)
_WORD = re.compile(rf"[{_HAN}]|[^\W_{_HAN}]+(?:'[^\W_{_HAN}]+)*")
_HAN_CHAR = re.compile(rf"[{_HAN}]")


def caption_language(text: str) -> str:
    """"zh" for a text with a Han character in it, else "en"."""
    return "zh" if _HAN_CHAR.search(text) else "en"


def words(text: str) -> list[str]:
    """The caption's words, lower-cased; each Han character is a word of its own."""
    return _WORD.findall(text.lower())


def length_group(n_words: int) -> str:
    for key, _, most in LENGTH_BUCKETS:
        if most is None or n_words <= most:
            return key
    raise AssertionError("the last bucket has no upper bound")


@dataclass(frozen=True)
class QueryFeatures:
    """`length`: the length group's key; `groups`: the word groups' keys (in WORD_GROUPS order); `n_words`;
    `language`: a code of LANGUAGES."""
    n_words: int
    length: str
    groups: tuple[str, ...]
    language: str = "en"

    @property
    def all_groups(self) -> tuple[str, ...]:
        """The length group, then the word groups: every slice the caption counts in."""
        return (self.length, *self.groups)


def query_features(text: str) -> QueryFeatures:
    """The groups a caption belongs to."""
    found = words(text)
    present = set(found)
    pairs = set(zip(found, found[1:]))
    has = {
        "counts": bool(present & NUMBER_WORDS) or any(any(c.isdigit() for c in w) for w in found),
        "colours": bool(present & COLOUR_WORDS),
        "spatial": bool(present & SPATIAL_WORDS) or any(p in pairs for p in SPATIAL_PHRASES),
        # contractions ("isn't", "doesn't") negate as "not" does
        "negation": bool(present & NEGATION_WORDS) or any(w.endswith("n't") for w in found),
    }
    language = caption_language(text)
    if language == "zh":
        for key, markers in (("counts", NUMBERS_ZH), ("colours", COLOURS_ZH), ("spatial", SPATIAL_ZH),
                             ("negation", NEGATION_ZH)):
            within = text if key != "counts" else re.sub("|".join(NOT_NUMBERS_ZH), " ", text)
            has[key] = has[key] or any(marker in within for marker in markers)
    return QueryFeatures(len(found), length_group(len(found)), tuple(key for key in WORD_KEYS if has[key]), language)
