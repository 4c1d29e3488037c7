"""Keyword search (issue 13 item 4): the catalog's FTS5 index over captions and file names, against an independent
Python BM25 over the catalog rows (FTS5's formula: k1 = 1.2, b = 0.75, document length over all columns), with user
text that is never FTS syntax."""
from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
from PIL import Image

from indexer.pipeline import BuildConfig, build_index
from indexer.readers import Sample
from search.catalog import Catalog, CatalogWriter
from search.keywords import STOPWORDS
from search.store import open_index

VOCAB = ["dog", "cat", "beach", "snow", "red", "blue", "ball", "tree", "car", "boat", "sunset", "2019", "2020",
         "holiday", "river", "house"]
FILLER = ["a", "the", "on", "in", "with", "of"]


def tokens(text: str) -> list[str]:
    return [t.lower() for t in re.findall(r"[A-Za-z0-9]+", text)]


def query_words(text: str) -> list[str]:
    found = list(dict.fromkeys(tokens(text)))
    return [w for w in found if w not in STOPWORDS] or found


def bm25(docs: dict[int, list[str]], words: list[str], excluded: list[str] = ()) -> dict[int, float]:
    """FTS5's bm25() (higher is better here): per query word IDF = ln((N - n + 0.5) / (n + 0.5)), at least 1e-6;
    tf saturation k1 = 1.2, length normalisation b = 0.75 by the document's token count over the average."""
    n_docs = len(docs)
    average = sum(len(d) for d in docs.values()) / n_docs
    idf = {}
    for w in words:
        hits = sum(w in d for d in docs.values())
        idf[w] = max(math.log((n_docs - hits + 0.5) / (hits + 0.5)), 0) or 1e-6
    scores = {}
    for doc_id, doc in docs.items():
        if not any(w in doc for w in words) or any(x in doc for x in excluded):
            continue
        score = 0.0
        for w in words:
            f = doc.count(w)
            score += idf[w] * (f * 2.2) / (f + 1.2 * (1 - 0.75 + 0.75 * len(doc) / average))
        scores[doc_id] = score
    return scores


def ranked(scores: dict[int, float]) -> list[int]:
    return sorted(scores, key=lambda i: (-scores[i], i))


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """200 images with 0-4 captions from a small vocabulary (skewed: some words common) and paths of words joined
    by / _ - ."""
    rng = random.Random(11)
    weights = [1 / (rank + 1) for rank in range(len(VOCAB))]
    path = tmp_path_factory.mktemp("keywords") / "catalog.sqlite"
    writer = CatalogWriter(path)
    images, captions = [], []
    for i in range(200):
        folder = "/".join(rng.choices(VOCAB, weights, k=rng.randint(0, 2)))
        name = rng.choice("_-.").join(rng.choices(VOCAB, weights, k=rng.randint(1, 2))) + f"_{i}.jpg"
        path_text = f"{folder}/{name}" if folder else name
        texts = [" ".join(rng.choices(VOCAB, weights, k=rng.randint(1, 5)) + rng.sample(FILLER, 2))
                 for _ in range(rng.randint(0, 4))]
        writer.add(path_text, 10, 10, texts)
        images.append((path_text, texts))
        captions += [(i, t) for t in texts]
    writer.close()
    return Catalog(path), images, captions


def image_docs(images) -> dict[int, list[str]]:
    return {i: tokens(" ".join(texts)) + tokens(path) for i, (path, texts) in enumerate(images)}


QUERIES = ["dog", "sunset boat", "the dog on the beach", "river 2019", "zebra", "zebra house", "DOG Beach",
           "holiday holiday snow", "the", "a of"]


@pytest.mark.parametrize("text", QUERIES)
def test_keyword_images_rank_as_bm25_over_captions_and_file_names(collection, text):
    catalog, images, _ = collection
    expected = bm25(image_docs(images), query_words(text))
    found = catalog.keyword_images(text, 1000)
    assert [image_id for image_id, _, _ in found] == ranked(expected)
    np.testing.assert_allclose([score for _, score, _ in found], [expected[i] for i in ranked(expected)], rtol=1e-9)
    for image_id, _, fields in found:
        path, texts = images[image_id]
        words = set(query_words(text))
        assert fields == tuple(field for field, hit in (("caption", words & set(tokens(" ".join(texts)))),
                                                        ("file name", words & set(tokens(path)))) if hit)
    if text.startswith("zebra"):
        assert ("house" in text) == bool(found)  # OR: a word the collection lacks does not empty the answer
    limit = 7
    assert [i for i, _, _ in catalog.keyword_images(text, limit)] == ranked(expected)[:limit]


@pytest.mark.parametrize("text", ["dog", "sunset boat", "the red ball", "zebra"])
def test_keyword_captions_rank_as_bm25_over_captions(collection, text):
    catalog, _, captions = collection
    expected = bm25({cid: tokens(t) for cid, (_, t) in enumerate(captions)}, query_words(text))
    found = catalog.keyword_captions(text, 1000)
    assert [cid for cid, _, _ in found] == ranked(expected)
    assert [image_id for _, _, image_id in found] == [captions[cid][0] for cid in ranked(expected)]
    np.testing.assert_allclose([s for _, s, _ in found], [expected[c] for c in ranked(expected)], rtol=1e-9)


@pytest.mark.parametrize("text", ['dog" OR *', "NEAR(dog cat)", "captions: dog", "name:beach", "dog AND", "-dog",
                                  "^dog", '"', "*", "(", "dog)", "dog NOT cat", "{captions name}: snow", "d*g"])
def test_user_text_is_words_never_fts_syntax(collection, text):
    catalog, images, _ = collection
    expected = bm25(image_docs(images), query_words(text)) if tokens(text) else {}
    assert [i for i, _, _ in catalog.keyword_images(text, 1000)] == ranked(expected)


def test_excluded_words_leave_out_every_image_holding_one(collection):
    catalog, images, captions = collection
    docs = image_docs(images)
    expected = bm25(docs, ["dog", "beach"], ["snow", "car"])
    found = catalog.keyword_images("dog beach", 1000, exclude=["snow", "car"])
    assert [i for i, _, _ in found] == ranked(expected) and found
    assert not any({"snow", "car"} & set(docs[i]) for i, _, _ in found)
    found = catalog.keyword_captions("dog", 1000, exclude=["red"])
    assert found and not any("red" in tokens(captions[cid][1]) for cid, _, _ in found)


def test_allowed_images_restrict_the_ranking(collection):
    catalog, images, captions = collection
    allowed = np.arange(0, 200, 3)
    expected = [i for i in ranked(bm25(image_docs(images), ["dog"])) if i in set(allowed)]
    assert [i for i, _, _ in catalog.keyword_images("dog", 1000, allowed=allowed)] == expected
    assert [i for i, _, _ in catalog.keyword_images("dog", 5, allowed=allowed)] == expected[:5]
    assert catalog.keyword_images("dog", 5, allowed=np.array([], np.int64)) == []
    found = catalog.keyword_captions("dog", 1000, allowed_images=allowed)
    assert found and all(image_id % 3 == 0 for _, _, image_id in found)


def test_no_words_no_results(collection):
    catalog = collection[0]
    for text in ("", "   ", "!!! ???", "_-./"):
        assert catalog.keyword_images(text, 10) == [] and catalog.keyword_captions(text, 10) == []


def test_a_build_indexes_file_names_and_folders_as_words(tmp_path, tiny_encoder):
    photos = tmp_path / "photos"
    for name in ("holiday/beach_2019.jpg", "Café-Paris.png", "work/notes.2020.png", "plain.jpg"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (90, 120, 200)).save(photos / name)
    samples = [Sample("holiday/beach_2019.jpg", ("sand and sea",)), Sample("Café-Paris.png"),
               Sample("work/notes.2020.png", ("a beach towel",)), Sample("plain.jpg")]
    build_index(samples, photos, tiny_encoder, tmp_path / "index", BuildConfig(progress=False))
    catalog = open_index(tmp_path / "index").catalog

    def hits(text):
        return {catalog.images([i])[i].path: fields for i, _, fields in catalog.keyword_images(text, 10)}

    assert hits("beach") == {"holiday/beach_2019.jpg": ("file name",), "work/notes.2020.png": ("caption",)}
    assert hits("holiday 2019") == {"holiday/beach_2019.jpg": ("file name",)}
    assert hits("cafe") == hits("CAFÉ") == {"Café-Paris.png": ("file name",)}  # case and accents folded
    assert hits("jpg") == {"holiday/beach_2019.jpg": ("file name",), "plain.jpg": ("file name",)}
    assert hits("sea") == {"holiday/beach_2019.jpg": ("caption",)}
    assert [c for c, _, _ in catalog.keyword_captions("towel", 10)] == [1]


def test_common_words_drop_out_of_the_match_only_in_large_collections_and_only_beside_rarer_ones(tmp_path):
    """Lucene's cutoff frequency: a word in more than 5 % (and more than 1,000) of the images leaves the match when
    a rarer word remains; the BM25 order of the rarer words' matches is that of the rarer words alone."""
    path = tmp_path / "catalog.sqlite"
    writer = CatalogWriter(path)
    docs = {}
    for i in range(24_000):
        words = ["sand"] * (i % 4 == 0) + ["kite"] * (i % 97 == 0) + [VOCAB[i % len(VOCAB)]]
        writer.add(f"img{i}.jpg", 10, 10, [" ".join(words)])
        docs[i] = words + tokens(f"img{i}.jpg")
    writer.close()
    catalog = Catalog(path)
    found = catalog.keyword_images("sand kite", 100_000)  # sand: 6,000 images (25 %), kite: 248
    assert [i for i, _, _ in found] == ranked(bm25(docs, ["kite"]))
    alone = catalog.keyword_images("sand", 100_000)  # nothing rarer: the common word is searched
    assert len(alone) == 6000
    small = CatalogWriter(tmp_path / "small.sqlite")
    for i in range(200):
        small.add(f"s{i}.jpg", 10, 10, ["sand kite" if i % 50 == 0 else ("sand" if i % 4 == 0 else "grass")])
    small.close()
    assert len(Catalog(tmp_path / "small.sqlite").keyword_images("sand kite", 1000)) == sum(
        i % 50 == 0 or i % 4 == 0 for i in range(200))  # under 1,000 images: every word matches
