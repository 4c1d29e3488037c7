"""Features of a caption's text that retrieval models are known to trip over — its length, number words, colour
words, spatial words, negation — as named groups, so that recall can be sliced by them ("counting fails") and
failures filtered (the /eval page). Pure text rules: no model, no index.

A caption belongs to exactly one length group (by its word count) and to any number of word groups.
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

# (group key, label, what it means): the word groups, in the order pages show them
WORD_GROUPS = (("counts", "counts", "number words or digits"), ("colours", "colours", "colour words"),
               ("spatial", "left/right", "spatial words: left, right, above, below, behind, in front…"),
               ("negation", "negation", "no, not, without, nothing, none…"))
GROUPS = tuple((key, label) for key, label, _ in LENGTH_BUCKETS) + tuple((key, label) for key, label, _ in
                                                                          WORD_GROUPS)
LABELS = dict(GROUPS)
LENGTH_KEYS = tuple(key for key, _, _ in LENGTH_BUCKETS)
WORD_KEYS = tuple(key for key, _, _ in WORD_GROUPS)

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # letters and digits, with inner apostrophes ("isn't" is one word)


def words(text: str) -> list[str]:
    """The caption's words, lower-cased."""
    return _WORD.findall(text.lower())


def length_group(n_words: int) -> str:
    for key, _, most in LENGTH_BUCKETS:
        if most is None or n_words <= most:
            return key
    raise AssertionError("the last bucket has no upper bound")


@dataclass(frozen=True)
class QueryFeatures:
    """`length`: the length group's key; `groups`: the word groups' keys (in WORD_GROUPS order); `n_words`."""
    n_words: int
    length: str
    groups: tuple[str, ...]

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
    return QueryFeatures(len(found), length_group(len(found)), tuple(key for key in WORD_KEYS if has[key]))
