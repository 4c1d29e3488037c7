"""The index format's owners: the manifest stores each FAISS factory once (and still reads the earlier form), the
catalog module runs the SQL the writer and verify need, writes go through write_atomic, and a build reports the time
of each stage."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from indexer.loader import STAGES
from indexer.pipeline import BuildConfig, build_index
from indexer.readers import Sample
from indexer.verify import info
from search.atomic import write_atomic
from search.catalog import Catalog, CatalogWriter
from search.layout import KINDS, MANIFEST_NAME
from search.store import open_index

from .helpers import build_test_index, make_pairs, write_images

PAIRS = make_pairs(6, seed=41)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_model_spec):
    return build_test_index(tmp_path_factory.mktemp("format"), PAIRS, tiny_model_spec)


def test_the_manifest_holds_each_factory_once(index_dir):
    data = json.loads((index_dir / MANIFEST_NAME).read_text())
    assert data["image_factory"] == "Flat" and data["caption_factory"] == "Flat"
    assert set(data["indexes"]) == set(KINDS) and all("factory" not in data["indexes"][k] for k in KINDS)
    assert all("params" in data["indexes"][k] for k in KINDS)  # the rest of what the build chose stays
    assert [entry["factory"] for entry in info(index_dir)["indexes"].values()] == ["Flat", "Flat"]


def test_a_manifest_in_the_earlier_form_still_opens(index_dir, tmp_path):
    """Earlier manifests (same format version) also kept the factory inside `indexes`, first of each entry."""
    old = tmp_path / "old"
    old.mkdir()
    for path in index_dir.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    data = json.loads((old / MANIFEST_NAME).read_text())
    data["indexes"] = {kind: {"factory": data[f"{kind[:-1]}_factory"], **entry}
                       for kind, entry in data["indexes"].items()}
    (old / MANIFEST_NAME).write_text(json.dumps(data, indent=2))

    index = open_index(old)
    assert index.images.factory == "Flat" and index.captions.factory == index.manifest.factory("captions")
    assert "factory" not in index.manifest.indexes["images"]  # one copy in memory too
    assert info(old)["indexes"] == info(index_dir)["indexes"]
    index.manifest.write(old)  # written again: in the current form
    assert json.loads((old / MANIFEST_NAME).read_text())["indexes"] == json.loads(
        (index_dir / MANIFEST_NAME).read_text())["indexes"]
    result = subprocess.run([sys.executable, "-m", "indexer", "verify", "--index", "old", "--no-model"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "all" in result.stdout and "checks passed" in result.stdout


def test_the_catalog_answers_what_verify_asks(index_dir):
    catalog = Catalog(index_dir / "catalog.sqlite")
    n_images = len(catalog.all_images())
    assert catalog.image_ids() == list(range(n_images)) == [r.id for r in catalog.all_images()]
    links = catalog.caption_links()
    assert [image_id for _, image_id in links] == catalog.caption_image_ids()
    assert [caption_id for caption_id, _ in links] == list(range(len(links)))


def test_a_continued_catalog_drops_the_rows_no_progress_record_reached(tmp_path):
    path = tmp_path / "catalog.sqlite"
    writer = CatalogWriter(path)
    for i in range(5):
        writer.add(f"{i}.png", 4, 4, [f"caption {i}", f"another {i}"])
    writer.close()  # 5 images were written, but only 3 (6 captions) had reached the progress record
    writer = CatalogWriter(path, 3, 6)
    writer.add("new.png", 2, 2, ["fresh"])
    writer.close()
    catalog = Catalog(path)
    assert [r.path for r in catalog.all_images()] == ["0.png", "1.png", "2.png", "new.png"]
    assert catalog.caption_links() == [(i, i // 2) for i in range(6)] + [(6, 3)]


def test_a_build_times_each_stage(tmp_path, tiny_encoder):
    photos = write_images(tmp_path / "photos", PAIRS)
    (photos / "broken.jpg").write_bytes(b"not an image")
    samples = [Sample(name, captions) for name, captions, _ in PAIRS] + [Sample("broken.jpg", ("x",))]
    report = build_index(samples, photos, tiny_encoder, tmp_path / "index",
                         BuildConfig(batch_size=4, workers=2, progress=False))
    assert tuple(report.stage_seconds) == STAGES and report.n_images == len(PAIRS) and len(report.skipped) == 1
    assert all(seconds > 0 for seconds in report.stage_seconds.values())
    summary = report.summary()
    assert all(f"{stage} " in summary for stage in STAGES) and "skipped 1" in summary


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "data.json"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_text() == "second"

    def save(tmp):
        with open(tmp, "wb") as out:
            np.save(out, np.arange(3))

    write_atomic(tmp_path / "array.npy", save)
    assert np.load(tmp_path / "array.npy").tolist() == [0, 1, 2]

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(target, fails)
    assert target.read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["array.npy", "data.json"]
    plain = tmp_path / "plain"
    plain.write_text("x")  # the permissions an ordinary write gives (mkstemp's would be 0600)
    assert target.stat().st_mode == plain.stat().st_mode
