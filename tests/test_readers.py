import json
import os

import pytest

from indexer.readers import read_dataset
from search.errors import DatasetError

from .helpers import make_pairs, write_coco, write_csv, write_flickr8k, write_images, write_karpathy

PAIRS = make_pairs(6)
SPLITS = ["train", "train", "val", "test", "test", "restval"]


def test_karpathy_split_and_filepath(tmp_path):
    write_images(tmp_path / "img", PAIRS, subfolder="val2014")
    ann = write_karpathy(tmp_path / "dataset_coco.json", PAIRS, SPLITS, filepath="val2014")
    test = read_dataset("karpathy", ann, tmp_path / "img", "test")
    assert [s.image for s in test] == ["val2014/img_003.png", "val2014/img_004.png"]
    assert test[0].captions == PAIRS[3][1]
    assert len(read_dataset("karpathy", ann, tmp_path / "img")) == 6
    # a flat folder works too: filepath is used only when that layout exists
    write_images(tmp_path / "flat", PAIRS)
    assert read_dataset("karpathy", ann, tmp_path / "flat", "test")[0].image == "img_003.png"


def test_flickr8k_token_file_and_split_lists(tmp_path):
    splits = ["train", "train", "dev", "test", "test", "train"]
    token = write_flickr8k(tmp_path, PAIRS, splits)
    assert [s.image for s in read_dataset("flickr8k", token, tmp_path, "test")] == ["img_003.png", "img_004.png"]
    assert [s.image for s in read_dataset("flickr8k", token, tmp_path, "dev")] == ["img_002.png"]
    assert read_dataset("flickr8k", token, tmp_path, "val")[0].captions == PAIRS[2][1]
    assert len(read_dataset("flickr8k", token, tmp_path)) == 6
    (tmp_path / "Flickr_8k.testImages.txt").unlink()
    with pytest.raises(DatasetError, match="Flickr_8k.testImages.txt"):
        read_dataset("flickr8k", token, tmp_path, "test")


def test_coco_captions_json(tmp_path):
    ann = write_coco(tmp_path / "captions_val2017.json", PAIRS)
    samples = read_dataset("coco", ann, tmp_path)
    assert len(samples) == 6 and samples[1].image == "img_001.png" and samples[1].captions == PAIRS[1][1]
    with pytest.raises(DatasetError, match="--split does not apply"):
        read_dataset("coco", ann, tmp_path, "test")


@pytest.mark.parametrize("name, header, delimiter", [("p.csv", True, ","), ("p.csv", False, ","),
                                                     ("p.tsv", True, "\t")])
def test_csv_and_tsv(tmp_path, name, header, delimiter):
    ann = write_csv(tmp_path / name, PAIRS, header=header, delimiter=delimiter)
    samples = read_dataset("csv", ann, tmp_path)
    assert [s.image for s in samples] == [p[0] for p in PAIRS]
    assert samples[2].captions == PAIRS[2][1]


def test_jsonl(tmp_path):
    ann = tmp_path / "p.jsonl"
    ann.write_text("".join(json.dumps({"image": n, "text": c}) + "\n" for n, caps, _ in PAIRS for c in caps))
    assert read_dataset("csv", ann, tmp_path)[0].captions == PAIRS[0][1]


def test_folder_is_recursive_sorted_and_skips_hidden_and_symlink_loops(tmp_path):
    write_images(tmp_path, PAIRS[:2], subfolder="b")
    write_images(tmp_path, PAIRS[2:3], subfolder="a/deeper")
    write_images(tmp_path, PAIRS[3:4], subfolder=".hidden")
    (tmp_path / "notes.txt").write_text("not an image")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    assert [s.image for s in read_dataset("folder", None, tmp_path)] == [
        "a/deeper/img_002.png", "b/img_000.png", "b/img_001.png"]


@pytest.mark.parametrize("fmt, content, message", [
    ("karpathy", "{not json", "not valid JSON"),
    ("karpathy", '{"images": []}', "no images listed"),
    ("coco", '{"images": []}', "not a COCO captions file"),
    ("flickr8k", "no tab on this line\n", "expected 'image.jpg#N<TAB>caption'"),
])
def test_bad_annotations(tmp_path, fmt, content, message):
    ann = tmp_path / "ann.txt"
    ann.write_text(content)
    with pytest.raises(DatasetError, match=message):
        read_dataset(fmt, ann, tmp_path)


def test_argument_errors(tmp_path):
    with pytest.raises(DatasetError, match="annotation file not found"):
        read_dataset("karpathy", tmp_path / "missing.json", tmp_path)
    with pytest.raises(DatasetError, match="unknown split 'dev2'"):
        read_dataset("karpathy", tmp_path / "x.json", tmp_path, "dev2")
    with pytest.raises(DatasetError, match="image folder not found"):
        read_dataset("folder", None, tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="needs --annotations"):
        read_dataset("csv", None, tmp_path)
    with pytest.raises(DatasetError, match="no images listed"):
        read_dataset("folder", None, tmp_path)
