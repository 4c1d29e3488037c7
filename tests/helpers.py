"""Test data: a tiny open_clip config, generated captioned images and annotation files in each real format."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "purple": (140, 40, 180), "orange": (250, 140, 0), "white": (250, 250, 250), "black": (10, 10, 10)}
SHAPES = ("circle", "square", "triangle", "bar")
BACKGROUNDS = {"grey": (128, 128, 128), "pale": (235, 225, 200), "dark": (40, 40, 60)}


def draw(shape: str, colour: str, background: str, size: int = 48, jitter: int = 0) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    a, b = 8 + jitter, size - 8 - jitter
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse((a, a, b, b), fill=fill)
    elif shape == "square":
        pen.rectangle((a, a, b, b), fill=fill)
    elif shape == "triangle":
        pen.polygon([(size // 2, a), (a, b), (b, b)], fill=fill)
    else:
        pen.rectangle((a, size // 2 - 5, b, size // 2 + 5), fill=fill)
    return image


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, tuple[str, ...], tuple[str, str, str]]]:
    """n distinct (file name, captions, (shape, colour, background)) triples, deterministic from seed."""
    combos = [(s, c, bg) for s in SHAPES for c in COLOURS for bg in BACKGROUNDS]
    random.Random(seed).shuffle(combos)
    if n > len(combos):
        raise ValueError(f"at most {len(combos)} distinct pairs")
    pairs = []
    for i, (shape, colour, bg) in enumerate(combos[:n]):
        captions = (f"a {colour} {shape} on a {bg} background", f"{colour} {shape}", f"the {shape} is {colour}")
        pairs.append((f"img_{i:03d}.png", captions, (shape, colour, bg)))
    return pairs


def write_images(folder: Path, pairs, subfolder: str = "") -> Path:
    target = Path(folder) / subfolder
    target.mkdir(parents=True, exist_ok=True)
    for name, _, (shape, colour, bg) in pairs:
        draw(shape, colour, bg).save(target / name)
    return Path(folder)


def write_karpathy(path: Path, pairs, splits: list[str], filepath: str | None = None) -> Path:
    images = []
    for (name, captions, _), split in zip(pairs, splits):
        entry = {"filename": name, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
        if filepath:
            entry["filepath"] = filepath
        images.append(entry)
    Path(path).write_text(json.dumps({"images": images, "dataset": "test"}))
    return Path(path)


def write_flickr8k(folder: Path, pairs, splits: list[str]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "Flickr8k.token.txt"
    token.write_text("".join(f"{name}#{i}\t{c}\n" for name, caps, _ in pairs for i, c in enumerate(caps)))
    for split, file_name in (("train", "Flickr_8k.trainImages.txt"), ("dev", "Flickr_8k.devImages.txt"),
                             ("test", "Flickr_8k.testImages.txt")):
        (folder / file_name).write_text("".join(f"{name}\n" for (name, _, _), s in zip(pairs, splits) if s == split))
    return token


def write_coco(path: Path, pairs) -> Path:
    images = [{"id": 1000 + i, "file_name": name, "width": 48, "height": 48} for i, (name, _, _) in enumerate(pairs)]
    annotations = [{"id": 5000 + 10 * i + j, "image_id": 1000 + i, "caption": c}
                   for i, (_, caps, _) in enumerate(pairs) for j, c in enumerate(caps)]
    Path(path).write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return Path(path)


def write_csv(path: Path, pairs, header: bool = True, delimiter: str = ",") -> Path:
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        if header:
            writer.writerow(["filepath", "caption"])
        for name, caps, _ in pairs:
            for c in caps:
                writer.writerow([name, c])
    return Path(path)


def reference_recall(image_vectors: np.ndarray, caption_vectors: np.ndarray, caption_image_ids, k: int,
                     ties: str = "strict"):
    """Independent recall@k (percent; text→image, image→text): per query, sort all candidates by score and look for a
    correct one in the first k. Among equal scores, "strict" puts wrong candidates before correct ones, "position"
    the lower index first. Scores are CLIP_benchmark's: one float32 torch product `captions @ images.T`."""
    import torch

    scores = (torch.from_numpy(np.asarray(caption_vectors, np.float32))
              @ torch.from_numpy(np.asarray(image_vectors, np.float32)).T).numpy()

    def first_k(n, score, correct):
        tie = (lambda c: correct(c)) if ties == "strict" else (lambda c: 0)
        return sorted(range(n), key=lambda c: (-score(c), tie(c), c))[:k]

    t2i = []
    for j, truth in enumerate(caption_image_ids):
        t2i.append(truth in first_k(len(image_vectors), lambda i: scores[j, i], lambda i: i == truth))
    i2t = []
    for i in range(len(image_vectors)):
        own = {j for j, img in enumerate(caption_image_ids) if img == i}
        if own:
            i2t.append(bool(own & set(first_k(len(caption_vectors), lambda j: scores[j, i], lambda j: j in own))))
    return 100 * float(np.mean(t2i)), 100 * float(np.mean(i2t))


def build_test_index(root: Path, pairs, model_spec: str, name: str = "index") -> Path:
    """Images + a Karpathy file (all 'test') under root, indexed with `model_spec` through the real CLI."""
    from indexer.cli import main as indexer_main

    images = write_images(Path(root) / "images", pairs)
    ann = write_karpathy(Path(root) / "k.json", pairs, ["test"] * len(pairs))
    out = Path(root) / name
    code = indexer_main(["build", "--format", "karpathy", "--annotations", str(ann), "--images", str(images),
                         "--out", str(out), "--model", model_spec, "--quiet"])
    assert code == 0, f"test index build failed with exit code {code}"
    return out


def build_photo_index(root: Path, pairs, model_spec: str) -> tuple[Path, Path]:
    """A folder of photos without captions (root/photos) indexed through the real CLI: (photos, index)."""
    from indexer.cli import main as indexer_main

    photos = write_images(Path(root) / "photos", pairs)
    index = Path(root) / "photos-index"
    assert indexer_main(["build", "--format", "folder", "--images", str(photos), "--out", str(index), "--model",
                         model_spec, "--quiet"]) == 0
    return photos, index


def build_flickr8k_index(work: Path, model_spec: str, n: int = 9) -> Path:
    """n captioned images in Flickr8k's layout under `work`, indexed as `work/index` by the real CLI run from `work`
    (relative --out)."""
    import subprocess
    import sys

    pairs = make_pairs(n, seed=2)
    write_images(work / "images", pairs)
    token = write_flickr8k(work, pairs, ["train"] * len(pairs))
    done = subprocess.run([sys.executable, "-m", "indexer", "build", "--format", "flickr8k", "--annotations",
                           str(token), "--images", str(work / "images"), "--out", "index", "--model", model_spec,
                           "--quiet"], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return work
