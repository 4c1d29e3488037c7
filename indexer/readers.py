"""Dataset readers: each turns an annotation file (or a folder) into `Sample`s — an image path relative to the
image root plus its captions. Readers only parse; whether an image can actually be decoded is the pipeline's call.
"""
from __future__ import annotations

import csv
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from search.errors import DatasetError
from search.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Sample:
    image: str  # POSIX path relative to the image root
    captions: tuple[str, ...] = ()
    split: str | None = None  # the dataset's split of the image (train, val, test, restval); None when unknown


def _load_json(path: Path) -> dict:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None


def _require(annotations: Path | None, fmt: str) -> Path:
    if annotations is None:
        raise DatasetError(f"--format {fmt} needs --annotations")
    return Path(annotations)


def _grouped(pairs, splits: dict[str, str] | None = None) -> list[Sample]:
    """(image, caption-or-None) pairs → one Sample per image, first-seen order, captions in order; `splits`: image →
    its split."""
    grouped: OrderedDict[str, list[str]] = OrderedDict()
    for image, caption in pairs:
        captions = grouped.setdefault(image, [])
        if caption and caption.strip():
            captions.append(caption.strip())
    return [Sample(image, tuple(captions), (splits or {}).get(image)) for image, captions in grouped.items()]


def read_karpathy(annotations: Path | None, images: Path, split: str | None) -> list[Sample]:
    """Karpathy split JSON: images[].filename, optional filepath, split, sentences[].raw."""
    path = _require(annotations, "karpathy")
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: not a Karpathy split file (no 'images' list)")
    samples = []
    for entry in data["images"]:
        if split is not None and entry.get("split") != split:
            continue
        name = entry["filename"]
        # COCO entries carry a sub-folder (val2014/...); accept both that layout and a flat folder of images
        if entry.get("filepath") and (Path(images) / entry["filepath"] / name).exists():
            name = f"{entry['filepath']}/{name}"
        captions = tuple(s["raw"].strip() for s in entry.get("sentences", []) if s.get("raw", "").strip())
        samples.append(Sample(name, captions, entry.get("split") or None))
    return samples


FLICKR8K_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}


def read_flickr8k(annotations: Path | None, images: Path, split: str | None) -> list[Sample]:
    """Flickr8k.token.txt (`name.jpg#N<TAB>caption`), split lists Flickr_8k.{train,dev,test}Images.txt beside it
    (each image's split from them, also when all are read; the dev list is split "val")."""
    path = _require(annotations, "flickr8k")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    if split is not None and not (path.parent / FLICKR8K_SPLIT_FILES[split]).is_file():
        raise DatasetError(f"split '{split}' needs {FLICKR8K_SPLIT_FILES[split]} beside {path.name}")
    lists = {name: {line.strip() for line in (path.parent / file_name).read_text(encoding="utf-8").splitlines()
                    if line.strip()}
             for name, file_name in FLICKR8K_SPLIT_FILES.items() if (path.parent / file_name).is_file()}
    keep = None if split is None else lists[split]
    splits = {image: split or name for name, images in lists.items() for image in images}
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        if not sep:
            raise DatasetError(f"{path}:{number}: expected 'image.jpg#N<TAB>caption'")
        image = key.rsplit("#", 1)[0]
        if keep is None or image in keep:
            pairs.append((image, caption))
    return _grouped(pairs, splits)


def read_coco(annotations: Path | None, images: Path, split: str | None) -> list[Sample]:
    """MS-COCO captions JSON (captions_val2017.json): images[{id, file_name}], annotations[{image_id, caption}]."""
    path = _require(annotations, "coco")
    if split is not None:
        raise DatasetError("--split does not apply to --format coco: choose the annotation file of the split")
    data = _load_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DatasetError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
    names = {img["id"]: img["file_name"] for img in data["images"]}
    pairs = [(names[img["id"]], None) for img in data["images"]]
    for ann in data["annotations"]:
        if ann.get("image_id") in names:
            pairs.append((names[ann["image_id"]], ann.get("caption", "")))
    return _grouped(pairs)


def read_folder(annotations: Path | None, images: Path, split: str | None,
                include_hidden: bool = False) -> list[Sample]:
    """Every image file below `images`, recursively, sorted; symlinked folders are not entered (no loops), hidden
    files and folders only with `include_hidden`."""
    root = Path(images)
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found")
    found = []
    visible = (lambda name: True) if include_hidden else (lambda name: not name.startswith("."))
    for folder, dirs, files in os.walk(root):  # followlinks=False: a symlink loop cannot trap the walk
        dirs[:] = sorted(d for d in dirs if visible(d))
        for name in files:
            if visible(name) and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((Path(folder) / name).relative_to(root).as_posix())
    return [Sample(name) for name in sorted(found)]


IMAGE_COLUMNS = ("image", "image_path", "filepath", "filename", "file", "path", "url")
CAPTION_COLUMNS = ("caption", "text", "title", "sentence", "description", "raw")


def _pick(columns: list[str], wanted: tuple[str, ...]) -> str | None:
    lowered = {c.strip().lower(): c for c in columns}
    return next((lowered[w] for w in wanted if w in lowered), None)


def read_csv(annotations: Path | None, images: Path, split: str | None) -> list[Sample]:
    """CSV, TSV or JSONL rows of (image, caption). Header names like image/filepath and caption/text are recognised;
    without a header the first two columns are taken as image, caption."""
    path = _require(annotations, "csv")
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        pairs = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise DatasetError(f"{path}:{number}: not a JSON object") from None
            image_key, caption_key = _pick(list(row), IMAGE_COLUMNS), _pick(list(row), CAPTION_COLUMNS)
            if image_key is None:
                raise DatasetError(f"{path}:{number}: no image field (one of {', '.join(IMAGE_COLUMNS)})")
            pairs.append((str(row[image_key]), row.get(caption_key) if caption_key else None))
        return _grouped(pairs)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as handle:
        rows = [row for row in csv.reader(handle, delimiter=delimiter) if any(cell.strip() for cell in row)]
    if not rows:
        raise DatasetError(f"{path}: no rows")
    image_col, caption_col = _pick(rows[0], IMAGE_COLUMNS), _pick(rows[0], CAPTION_COLUMNS)
    if image_col is not None:
        header, rows = rows[0], rows[1:]
        image_at = header.index(image_col)
        caption_at = header.index(caption_col) if caption_col is not None else None
    else:
        image_at, caption_at = 0, 1
    pairs = []
    for row in rows:
        caption = row[caption_at] if caption_at is not None and caption_at < len(row) else None
        pairs.append((row[image_at].strip(), caption))
    return _grouped(pairs)


def dataset_source(fmt: str, annotations: Path | None, images: Path, split: str | None, **extra) -> dict:
    """What a manifest or training run records about its data: enough for `indexer update` to read it again."""
    return {"format": fmt, "annotations": str(Path(annotations).resolve()) if annotations else None,
            "images": str(Path(images).resolve()), "split": split, **extra}


READERS: dict[str, Callable[[Path | None, Path, str | None], list[Sample]]] = {
    "karpathy": read_karpathy, "flickr8k": read_flickr8k, "coco": read_coco, "folder": read_folder, "csv": read_csv,
}
SPLITS = {"karpathy": ("train", "val", "test", "restval"), "flickr8k": ("train", "val", "test")}


def read_dataset(fmt: str, annotations: Path | None, images: Path, split: str | None = None,
                 include_hidden: bool = False) -> list[Sample]:
    """Parse a dataset; DatasetError for unknown formats/splits, unreadable annotations or an empty result."""
    if fmt not in READERS:
        raise DatasetError(f"unknown format '{fmt}' (choose {', '.join(READERS)})")
    if split == "dev":
        split = "val"
    if split is not None and fmt in SPLITS and split not in SPLITS[fmt]:
        raise DatasetError(f"unknown split '{split}' for {fmt} (choose {', '.join(SPLITS[fmt])})")
    if split is not None and fmt in ("folder", "csv"):
        raise DatasetError(f"--split does not apply to --format {fmt}")
    if not Path(images).is_dir():
        raise DatasetError(f"{images}: image folder not found")
    try:
        if fmt == "folder":
            samples = read_folder(annotations, Path(images), split, include_hidden)
        else:
            samples = READERS[fmt](annotations, Path(images), split)
    except (KeyError, TypeError, AttributeError) as exc:
        raise DatasetError(f"{annotations}: unexpected structure for --format {fmt} ({exc!r})") from None
    if not samples:
        where = f" in split '{split}'" if split else ""
        raise DatasetError(f"no images listed{where} by {annotations or images}")
    return samples
