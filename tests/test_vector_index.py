import numpy as np
import pytest

from search.vector_index import VectorIndex


def _normalised(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 7, 300])
def test_flat_search_matches_numpy_brute_force(k):
    base, queries = _normalised(200, 24, 0), _normalised(5, 24, 1)
    scores, ids = VectorIndex.build(base).search(queries, k)
    expected = queries @ base.T
    order = np.argsort(-expected, axis=1)[:, :min(k, 200)]
    assert ids.shape == (5, min(k, 200))
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(scores, np.take_along_axis(expected, order, 1), rtol=1e-5, atol=1e-5)


def test_empty_index_and_single_vector_query():
    index = VectorIndex.build(np.zeros((0, 8), np.float32))
    scores, ids = index.search(np.ones(8, np.float32), 5)
    assert scores.shape == ids.shape == (1, 0)


@pytest.mark.parametrize("mmap", [False, True])
def test_save_and_load_round_trip(tmp_path, mmap):
    base = _normalised(50, 16, 2)
    VectorIndex.build(base).save(tmp_path / "x.faiss")
    loaded = VectorIndex.load(tmp_path / "x.faiss", "Flat", "ip", mmap=mmap)
    assert loaded.ntotal == 50 and loaded.dim == 16
    np.testing.assert_array_equal(loaded.search(base[:3], 4)[1], VectorIndex.build(base).search(base[:3], 4)[1])
