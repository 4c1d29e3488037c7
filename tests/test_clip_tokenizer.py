"""The torch-free CLIP tokenizer against open_clip's own (the external oracle), id for id."""
from __future__ import annotations

import gzip
import html
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest

from search.clip_tokenizer import VOCAB_FILE, ClipTokenizer, open_clip_vocab_path
from search.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 77
WORDS = ("a", "photo", "of", "dog", "cat", "two", "people", "riding", "bicycles", "down", "the", "street", "man",
         "woman", "holding", "umbrella", "in", "rain", "red", "double-decker", "bus", "parked", "near", "curb",
         "close-up", "pizza", "with", "mushrooms", "skateboarder", "mid-air", "trick", "giraffes", "grazing",
         "savannah", "sunset", "over", "ocean", "kitchen", "stainless", "steel", "appliances", "toddler", "eating",
         "banana", "snowboarder", "jumps", "mountain", "traffic", "lights", "at", "night", "vintage", "b&w",
         "selfie", "antidisestablishmentarianism", "xylophone", "jpeg", "4k", "hdr", "iPhone", "São", "Zürich",
         "naïve", "résumé", "Ærø", "straße", "İstanbul", "Ελλάδα", "Москва", "東京", "北京烤鸭", "ラーメン", "カメラ",
         "서울", "القاهرة", "مرحبا", "שלום", "हिन्दी", "ไทย", "😀", "🐶", "👩‍👩‍👧", "🇫🇷", "👍🏽", "❤️", "☕")
PUNCTUATION = ("", ".", ",", "!", "?", "...", ";", ":", "-", "—", "–", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d",
               "’s", "n't", "(", ")", "[", "]", "\"", "“", "”", "‘", "’", "«", "»", "#", "@", "%", "$", "€", "£",
               "&", "*", "/", "\\", "_", "~", "`", "^", "|", "<", ">", "=", "+", "°", "½", "²", "©", "™", "…")
SPACES = (" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", "\u200b", "\u200d", "\ufeff", "\u2028",
          "\x0b", "\x0c", "\x85", "\x1c", "\x1f", " \t\n ")
ENTITIES = ("&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&nbsp;", "&eacute;", "&#x1F600;", "&amp;amp;", "&amp;lt;",
            "&copy;", "&hellip;", "&mdash;", "&notanentity;", "&#233;", "&amp", "&lt")
# Hand-picked corners: the special tokens typed literally, case folding ('ſ', Kelvin sign, dotted İ, title-case
# digraphs), digits (split one by one), mixed scripts, control characters, combining marks.
CORNERS = ("", " ", "\t\n\u00a0 ", "<start_of_text>", "<end_of_text>", "hi <start_of_text> there<end_of_text>!",
           "<START_OF_TEXT>", "<ſtart_of_text>", "it'ſ", "IT'S", "'S 'T 'RE 'VE 'M 'LL 'D", "\u212a\u212b ǅ ǈ ﬁ ﬀ",
           "İİİ", "ΣΑΣ", "1234567890", "3.14159 1,000,000 ½ ² ٣ 七 ⅷ", "e\u0301 a\u0308 n\u0303", "a\x00b\x07c\x1bd",
           "don't won't y'all ma'am rock'n'roll", "“Smart” ‘quotes’ „low“ «guillemets»", "ðŸ˜€ cafÃ© naÃ¯ve",
           "â€œmojibakeâ€\x9d â€™s", "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt;", "ＦＵＬＬ　ＷＩＤＴＨ ｶﾀｶﾅ",
           "e-mail: someone@example.com, url: https://example.com/a?b=c&d=e#f", "C++ & C# > Java?",
           "\U0001F468\u200d\U0001F4BB\U0001F3FF", "\U000E0067\U000E0062 tags", "\ud7ff\ue000\uf8ff\ufffd\uffff",
           "a" * 300, "abc" * 200, "🙂" * 80, "東京" * 60, "x y " * 60)


def _mojibake(text: str, rng: random.Random) -> str:
    """UTF-8 read as cp1252/latin-1: what ftfy repairs (undecodable bytes fall back to latin-1, as real files do)."""
    data = text.encode("utf-8")
    if rng.random() < 0.5:
        return data.decode("latin-1")
    return "".join(bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in data)


def _random_unicode(rng: random.Random) -> str:
    """Code points from all over Unicode (surrogates excluded: they have no UTF-8), weighted towards busy blocks."""
    blocks = ((0x20, 0x7f), (0x0, 0x20), (0x80, 0x250), (0x300, 0x370), (0x370, 0x530), (0x590, 0x700),
              (0x900, 0xe00), (0x2000, 0x2070), (0x3000, 0x3100), (0x4e00, 0x9fff), (0xac00, 0xd7a3),
              (0xe000, 0xf900), (0xfe00, 0xfff0), (0x1f300, 0x1fad0), (0x10000, 0x10ffff))
    out = []
    for _ in range(rng.randint(1, 40)):
        low, high = rng.choice(blocks)
        code = rng.randrange(low, high)
        out.append(chr(code) if not 0xd800 <= code < 0xe000 else " ")
    return "".join(out)


def _caption(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 18)):
        word = rng.choice(WORDS)
        word = rng.choice((word, word, word.upper(), word.capitalize(), word.title()))
        parts.append(word + rng.choice(PUNCTUATION) * (rng.random() < 0.3))
        if rng.random() < 0.1:
            parts.append(rng.choice(ENTITIES))
        if rng.random() < 0.05:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 9))))
    text = "".join(p + rng.choice(SPACES if rng.random() < 0.2 else (" ",)) for p in parts)
    if rng.random() < 0.1:
        text = _mojibake(text, rng)
    if rng.random() < 0.05:
        text = html.escape(text)
    return text


def _exact_length(ids: int) -> str:
    """A text of exactly `ids` ids between start and end ("a" is one id, digits one id each)."""
    return " ".join(["a"] * ids)


def corpus() -> list[str]:
    rng = random.Random(11)
    texts = list(CORNERS)
    texts += [_exact_length(n) for n in (CONTEXT - 3, CONTEXT - 2, CONTEXT - 1, 30, 31, 32)]
    texts += ["9" * n for n in (CONTEXT - 3, CONTEXT - 2, CONTEXT - 1)]
    texts += [_caption(rng) for _ in range(1500)]
    texts += [_random_unicode(rng) for _ in range(600)]
    texts += ["".join(rng.choice(WORDS + PUNCTUATION + SPACES + ENTITIES) for _ in range(rng.randint(1, 30)))
              for _ in range(300)]
    texts += [" ".join(_caption(rng) for _ in range(12)) for _ in range(20)]  # long: cut to the context
    return texts


@pytest.fixture(scope="module")
def texts():
    return corpus()


@pytest.fixture(scope="module")
def ours():
    return ClipTokenizer(open_clip_vocab_path(), CONTEXT)


def _differences(ours: ClipTokenizer, reference, texts: list[str]) -> list[str]:
    a, b = ours(texts), reference(texts).numpy()
    assert a.dtype == np.int64 and a.shape == b.shape == (len(texts), ours.context_length)
    return [text for text, x, y in zip(texts, a, b) if not np.array_equal(x, y)]


def test_the_vocabulary_is_the_one_open_clip_uses():
    assert open_clip_vocab_path().resolve() == Path(open_clip.tokenizer.default_bpe()).resolve()
    assert open_clip_vocab_path().name == VOCAB_FILE


def test_the_ids_equal_open_clips_on_varied_texts(ours, texts):
    reference = open_clip.get_tokenizer("ViT-B-32")
    assert type(reference).__name__ == "SimpleTokenizer" and reference.context_length == CONTEXT
    assert len(texts) >= 2000
    assert _differences(ours, reference, texts) == []
    assert (ours.sot_id, ours.eot_id, ours.vocab_size) == (reference.sot_token_id, reference.eot_token_id,
                                                            reference.vocab_size)


def test_the_corpus_reaches_the_corners_it_is_meant_to(texts):
    """Guards the test above against a corpus that silently stopped covering truncation, exact fits and padding."""
    reference = open_clip.get_tokenizer("ViT-B-32")
    encoded = [reference.encode(t) for t in texts]
    lengths = [len(ids) for ids in encoded]
    assert CONTEXT - 2 in lengths and CONTEXT - 1 in lengths  # exactly full; one id too many
    assert sum(n > CONTEXT - 2 for n in lengths) > 20 and max(lengths) > 3 * CONTEXT and lengths.count(0) >= 3
    typed = {i for ids in encoded[:len(CORNERS)] for i in ids}
    assert {reference.sot_token_id, reference.eot_token_id} <= typed  # the special tokens written in a text


@pytest.mark.parametrize("context", [32, 1, 2])
def test_another_context_length(texts, context):
    reference = open_clip.get_tokenizer("ViT-B-32", context_length=context)
    assert _differences(ClipTokenizer(open_clip_vocab_path(), context), reference, texts[::4]) == []


def test_the_demos_chinese_captions_equal_open_clips_and_fit_the_demo_models_context():
    """Chinese is byte-level BPE in CLIP's vocabulary (2–3 ids a character): the demo's captions must neither differ
    from open_clip's ids nor be cut at the demo model's context length."""
    from demo.prepare import DEMO_MODEL_CONFIG
    from demo.scenes import captions_zh, random_scene

    context = json.loads(DEMO_MODEL_CONFIG.read_text())["model_cfg"]["text_cfg"]["context_length"]
    rng = random.Random(5)
    chinese = [c for _ in range(600) for c in captions_zh(random_scene(rng), rng)]
    chinese += ["两个红色的小圆在左边", "两个红色的小圆在左边，一个蓝色的大方块在右边", "三个紫色的十字", "沒有綠色的三角形"]
    reference = open_clip.get_tokenizer("ViT-B-32", context_length=context)
    assert _differences(ClipTokenizer(open_clip_vocab_path(), context), reference, chinese) == []
    lengths = [len(reference.encode(c)) + 2 for c in chinese]  # with <start_of_text> and <end_of_text>
    assert max(lengths) <= context and max(lengths) > 2 * len(max(chinese, key=len))  # bytes, not characters
    # at CLIP's 77 the longest are cut, mid-character: still id for id
    assert max(lengths) > CONTEXT
    assert _differences(ClipTokenizer(open_clip_vocab_path(), CONTEXT), open_clip.get_tokenizer("ViT-B-32"),
                        [c for c, n in zip(chinese, lengths) if n > CONTEXT - 10]) == []


def test_a_batch_equals_its_texts_one_by_one_and_a_lone_string_is_one_text(ours, texts):
    sample = texts[:40] + texts[-5:]
    assert np.array_equal(ours(sample), np.concatenate([ours([t]) for t in sample]))
    assert np.array_equal(ours("a dog"), ours(["a dog"])) and ours([]).shape == (0, CONTEXT)


def test_a_bad_vocabulary_or_context_is_a_one_line_model_load_error(tmp_path):
    for path, content in (("missing.txt.gz", None), ("plain.txt.gz", b"not gzip"), ("short.txt.gz", "gz")):
        target = tmp_path / path
        if content == "gz":
            target.write_bytes(gzip.compress(b"#version: 0.2\na b\n"))
        elif content is not None:
            target.write_bytes(content)
        with pytest.raises(ModelLoadError) as caught:
            ClipTokenizer(target)
        assert str(target) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ModelLoadError):
        ClipTokenizer(open_clip_vocab_path(), 0)


def test_importing_and_using_it_loads_neither_torch_nor_open_clip(tmp_path):
    """Run as the ONNX query path does: a fresh interpreter, from another working directory."""
    script = ("import sys; from search.clip_tokenizer import ClipTokenizer, open_clip_vocab_path; "
              "ids = ClipTokenizer(open_clip_vocab_path())(['a photo of a dog']); "
              "print(ids.shape, ids[0, :3].tolist(), sorted({'torch', 'open_clip'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    expected = open_clip.get_tokenizer("ViT-B-32")(["a photo of a dog"]).numpy()
    assert done.stdout.split("\n")[0] == f"(1, {CONTEXT}) {expected[0, :3].tolist()} []"
