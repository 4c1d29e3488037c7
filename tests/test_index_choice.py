import json

import numpy as np
import pytest

from indexer.cli import main as indexer_main
from search.cli import main as search_main
from search.errors import EngineError
from search.index_choice import build_tuned, estimate_bytes, parse_size, plan_factory, recall_at_k
from search.store import open_index
from search.vector_index import VectorIndex

from .helpers import build_test_index, make_pairs


def clustered(n, d=32, centres=200, seed=0):
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, d)).astype(np.float32)
    x = middle[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_plan_follows_size_and_budget():
    assert plan_factory(5_000, 512) == "Flat"
    assert plan_factory(100_000, 512) == "IVF1024,Flat"
    assert plan_factory(1_000_000, 512) == "IVF4096,Flat"
    assert plan_factory(50_000_000, 512, parse_size("4GB")) == "IVF32768_HNSW32,PQ64"
    for n, budget in ((1_000_000, "1GB"), (1_000_000, "200MB"), (1_000_000, "50MB"), (20_000, "10MB")):
        factory = plan_factory(n, 512, parse_size(budget))
        assert estimate_bytes(factory, n, 512) <= parse_size(budget), (factory, budget)
    assert plan_factory(1_000_000, 512, parse_size("1GB")) == "IVF4096,SQ8"
    with pytest.raises(EngineError, match="do not fit in a memory budget"):
        plan_factory(1_000_000, 512, parse_size("1MB"))


def test_parse_size():
    assert parse_size("2GB") == 2 * 1024 ** 3 and parse_size("512m") == 512 * 1024 ** 2 and parse_size("1000") == 1000
    with pytest.raises(EngineError, match="cannot read the size"):
        parse_size("lots")


def test_tuning_reaches_the_target_recall_against_exact_search():
    base, queries = clustered(40_000), clustered(300, seed=1)
    index, report = build_tuned(base, target_recall=0.98, queries=clustered(500, seed=2))
    assert report.factory == "IVF1024,Flat" and report.params["nprobe"] >= 1 and report.recall_at_10 >= 0.98
    exact = VectorIndex.build(base).search(queries, 10)[1]
    assert recall_at_k(index.search(queries, 10)[1], exact) >= 0.95  # fresh queries: close to the tuned recall
    assert report.params["nprobe"] < 1024  # tuning found something cheaper than scanning every list


def test_params_survive_save_and_memory_mapped_load(tmp_path):
    base = clustered(5_000)
    index, report = build_tuned(base, factory="IVF64,Flat", target_recall=0.9)
    index.save(tmp_path / "x.faiss")
    for mmap in (False, True):
        loaded = VectorIndex.load(tmp_path / "x.faiss", "IVF64,Flat", "ip", report.params, mmap=mmap)
        assert loaded.params == report.params
        np.testing.assert_array_equal(loaded.search(base[:20], 10)[1], index.search(base[:20], 10)[1])


def test_build_records_the_chosen_index_and_eval_reports_both(tmp_path, tiny_model_spec, capsys):
    pairs = make_pairs(90, seed=2)
    root = tmp_path / "data"
    build_test_index(root, pairs, tiny_model_spec)  # default: Flat
    out = tmp_path / "ivf"
    assert indexer_main(["build", "--format", "karpathy", "--annotations", str(root / "k.json"), "--images",
                         str(root / "images"), "--out", str(out), "--model", tiny_model_spec, "--index-type",
                         "IVF4,Flat", "--target-recall", "0.9", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_factory"] == "IVF4,Flat" and manifest["indexes"]["images"]["params"]["nprobe"] >= 1
    assert manifest["indexes"]["images"]["recall_at_10"] >= 0.9
    assert open_index(out).images.params == manifest["indexes"]["images"]["params"]
    capsys.readouterr()
    assert search_main(["eval", "--index", str(root / "index"), "--json"]) == 0
    flat = json.loads(capsys.readouterr().out)
    assert flat["index_search"]["factories"] == {"images": "Flat", "captions": "Flat"}
    for direction in ("text_to_image", "image_to_text"):  # exact index: the same recall both ways
        assert flat["index_search"][direction]["R@10"] == pytest.approx(flat[direction]["R@10"], abs=1.2)
    assert search_main(["eval", "--index", str(out)]) == 0
    assert "through the indexes in use (images: IVF4,Flat {'nprobe'" in capsys.readouterr().out
    assert indexer_main(["build", "--format", "folder", "--images", str(root / "images"), "--out",
                         str(tmp_path / "bad"), "--model", tiny_model_spec, "--index-type", "IVF4096,Flat",
                         "--quiet"]) == 1
    assert "cannot build FAISS index 'IVF4096,Flat'" in capsys.readouterr().err
