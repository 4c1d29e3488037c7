"""User words → an SQLite FTS5 match expression (search/catalog.py runs it).

What a user types is words, never FTS5 syntax: each word (a run of letters and digits, as the catalog's tokenizer
cuts them) is quoted, so `NEAR`, `OR`, column filters, `*`, `^` or a stray `"` are plain text and never a syntax error.
The words are OR-ed: BM25 ranks an image holding more of them, and rarer ones, higher, so a query with one word the
collection lacks still finds the rest (AND would return nothing). A few very common English words are dropped unless
the query has nothing else: they match nearly every caption, cost time and add no ranking signal. Excluded words
("without …") are NOT-ed: a document holding any of them is left out.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

WORD = re.compile(r"[^\W_]+")  # letters and digits; `_` and all punctuation separate words, as in the tokenizer
STOPWORDS = frozenset("a an and are as at be by for from in is it of on or the to with".split())
MAX_WORDS = 32  # longer texts are cut: the query stays cheap whatever is pasted in
# "common terms" (Lucene's cutoff frequency): a word in more than COMMON_SHARE of the documents, and in more than
# COMMON_MIN_DOCS of them, is left out of the match when the query has a rarer word. Its BM25 weight (IDF ≈ 1.4 at 25 %
# against ≈ 6.9 at 0.1 %) barely moves the ranking, but FTS5 scores every document it matches: at 100k images, one
# word in 16 % of captions makes a query 5× slower. Small collections are never affected.
COMMON_SHARE = 0.05
COMMON_MIN_DOCS = 1000


def words(text: str) -> list[str]:
    """The distinct words of `text`, lower-cased, in order of first appearance."""
    return list(dict.fromkeys(w.lower() for w in WORD.findall(text or "")))


def match_expression(text: str, exclude: Sequence[str] = (), frequency: Callable[[str], int] | None = None,
                     n_docs: int = 0) -> str | None:
    """`"w1" OR "w2" …` (then `NOT ("x1" OR …)` for the excluded words); None when `text` holds no word.
    `frequency(word)` (documents holding it, of `n_docs`) lets common words drop out when rarer ones remain."""
    wanted = words(text)
    wanted = [w for w in wanted if w not in STOPWORDS] or wanted
    if not wanted:
        return None
    if frequency is not None:
        limit = max(COMMON_SHARE * n_docs, COMMON_MIN_DOCS)
        wanted = [w for w in wanted if frequency(w) <= limit] or wanted
    expression = _any(wanted[:MAX_WORDS])
    unwanted = [w for w in words(" ".join(exclude)) if w not in wanted][:MAX_WORDS]
    return f"({expression}) NOT ({_any(unwanted)})" if unwanted else expression


def _any(quoted_words: list[str]) -> str:
    return " OR ".join(f'"{w}"' for w in quoted_words)  # a word holds no `"`: WORD matches letters and digits only
