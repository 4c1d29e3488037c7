"""CLIP's byte-level BPE tokenizer without torch or open_clip: the same token ids as open_clip's `SimpleTokenizer`.

Queries on ONNX Runtime must not import torch, and open_clip's tokenizer module does; this module re-implements the
algorithm (OpenAI's CLIP tokenizer) on numpy:

1. clean: ftfy.fix_text, html.unescape twice, whitespace runs → one space, trimmed, lower-cased;
2. pre-split with CLIP's pattern (special tokens, the contractions 's 't 're 've 'm 'll 'd, letter runs, single
   digits, runs of anything else but whitespace);
3. each piece's UTF-8 bytes → printable stand-in characters (GPT-2's byte→unicode map), last one marked `</w>`;
4. merge adjacent symbols, always the pair with the lowest merge rank, until no ranked pair is left;
5. ids: <start_of_text>, the symbols' ids, <end_of_text>; longer than the context → cut to its length with the last
   id set to <end_of_text>; shorter → padded with 0.

The vocabulary file is open_clip's `bpe_simple_vocab_16e6.txt.gz` (a version line, then one merge "a b" per line;
only the first MERGES lines are CLIP's).
"""
from __future__ import annotations

import html
import importlib.util
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import ftfy
import numpy as np
import regex

from .errors import ModelLoadError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"  # the file name open_clip ships (and rclip copies)
DEFAULT_CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408  # CLIP's text embedding rows
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
MERGES = VOCAB_SIZE - 2 * 256 - len(SPECIAL_TOKENS)  # 48,894: ids are 256 bytes, 256 bytes+</w>, merges, specials
WORD_END = "</w>"
WORD_CACHE_SIZE = 65_536  # words remembered with their symbols (a long-lived server sees unbounded vocabularies)
READ_CHUNK = 1 << 16
# CLIP's pre-split. IGNORECASE is kept although the text is already lower-cased: characters such as 'ſ' (long s)
# stay as they are under lower() yet case-fold to 's', so "'ſ" is one piece here, as in CLIP.
PATTERN = "|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _byte_alphabet() -> list[str]:
    """The 256 stand-ins, indexed by byte: printable Latin-1 bytes stand for themselves, the other bytes (controls,
    space, 0x7f-0xa0, soft hyphen) take code points 256, 257, … in byte order, so no symbol is whitespace."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    alphabet = [""] * 256
    for b in printable:
        alphabet[b] = chr(b)
    for n, b in enumerate(others):
        alphabet[b] = chr(256 + n)
    return alphabet


def _base_symbols(alphabet: list[str]) -> list[str]:
    """The first 256 vocabulary entries in CLIP's order: printable bytes in byte order, then the remapped ones."""
    return sorted(alphabet, key=ord)


def open_clip_vocab_path() -> Path | None:
    """open_clip's packaged vocabulary file, found without importing open_clip (importing it imports torch);
    None when open_clip is not installed or lacks the file."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / VOCAB_FILE
        if path.is_file():
            return path
    return None


def _read_merges(path: Path) -> list[str]:
    """The first MERGES merge lines ("a b") after the version line; decompresses only as far as needed."""
    try:
        raw = path.read_bytes()
        inflate = zlib.decompressobj(zlib.MAX_WBITS | 16)  # gzip framing
        parts, lines, position = [], 0, 0
        while lines <= MERGES and position < len(raw):
            part = inflate.decompress(raw[position:position + READ_CHUNK])
            position += READ_CHUNK
            parts.append(part)
            lines += part.count(b"\n")
        text = b"".join(parts).decode("utf-8")
    except (OSError, zlib.error, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read the tokenizer vocabulary {path}: {exc}") from None
    merges = text.split("\n")[1:MERGES + 1]
    if len(merges) < MERGES or any(len(m.split()) != 2 for m in merges):
        raise ModelLoadError(f"{path} is not a CLIP BPE vocabulary ({MERGES} merge lines \"a b\" expected)")
    return merges


class ClipTokenizer:
    """Texts → int64 [len(texts), context_length] token ids, equal to open_clip's `SimpleTokenizer` (clean 'lower').

    Thread-safe: after construction the tables are only read, and the word cache is an lru_cache."""

    def __init__(self, vocab_path: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH):
        if int(context_length) < 1:
            raise ModelLoadError(f"the tokenizer's context length must be at least 1, not {context_length}")
        self.context_length = int(context_length)
        merges = _read_merges(Path(vocab_path))
        alphabet = _byte_alphabet()
        self._bytes = {b: alphabet[b] for b in range(256)}  # str.translate table, Latin-1 code point → stand-in
        base = _base_symbols(alphabet)
        vocab = [*base, *(s + WORD_END for s in base), *(m.replace(" ", "") for m in merges), *SPECIAL_TOKENS]
        self._ids = {symbol: i for i, symbol in enumerate(vocab)}  # a repeated symbol keeps its last id, as in CLIP
        self._ranks = {merge: rank for rank, merge in enumerate(merges)}  # keyed "first second", as the file spells
        self.sot_id, self.eot_id = (self._ids[t] for t in SPECIAL_TOKENS)
        self.vocab_size = len(vocab)
        self._pattern = regex.compile(PATTERN, regex.IGNORECASE)
        self._word_ids = lru_cache(maxsize=WORD_CACHE_SIZE)(self._bpe_ids)

    @staticmethod
    def clean(text: str) -> str:
        """CLIP's 'lower' cleaning: repair mojibake, decode HTML entities (twice), collapse whitespace, lower-case."""
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
        return " ".join(text.split()).lower()

    def _bpe_ids(self, piece: str) -> tuple[int, ...]:
        """The ids of one pre-split piece (already in stand-in characters)."""
        if piece in SPECIAL_TOKENS:  # typed literally, the special tokens keep their ids (as in CLIP)
            return (self._ids[piece],)
        word = [*piece[:-1], piece[-1] + WORD_END]
        ranks = self._ranks
        while len(word) > 1:
            best, best_rank = None, None
            for pair in zip(word, word[1:]):
                rank = ranks.get(f"{pair[0]} {pair[1]}")
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged, i = [], 0
            while i < len(word):  # every occurrence, left to right, never overlapping
                if word[i] == first and i + 1 < len(word) and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(self._ids[symbol] for symbol in word)

    def encode(self, text: str) -> list[int]:
        """The ids of one text, without <start_of_text>/<end_of_text>, padding or truncation."""
        ids: list[int] = []
        for piece in self._pattern.findall(self.clean(text)):
            ids.extend(self._word_ids(piece.encode("utf-8").decode("latin-1").translate(self._bytes)))
        return ids

    def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
        """int64 [len(texts), context_length]: <start_of_text> ids <end_of_text>, 0-padded; a text too long keeps its
        first context_length ids with the last one replaced by <end_of_text>. A lone str counts as one text."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id][:self.context_length]
            ids[-1] = self.eot_id  # a no-op unless the text was cut
            out[row, :len(ids)] = ids
        return out
