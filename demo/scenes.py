"""A generator of captioned scenes for the offline demo, written in the Flickr8k file layout.

Each scene holds one or two groups of objects. A group is 1–3 objects of one shape, colour and size; two groups sit
left/right or top/bottom of each other, on a textured background. Five differently worded captions describe each
scene in English, and five in Chinese naming the same facts (a grammar of their own, not a translation of each
sentence), so that one model learns queries in both. A share of scenes comes with a twin that differs in exactly one
factor (sides swapped, count, colour, shape or size), so retrieval among them needs colour, shape, count, size and
position all learnt, not any one alone.
Everything is deterministic from the seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from search.errors import DatasetError

COLOURS = {"red": (215, 35, 35), "green": (40, 170, 50), "blue": (40, 70, 225), "yellow": (245, 215, 30),
           "purple": (145, 50, 190), "orange": (250, 135, 20), "white": (250, 250, 250), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
BACKGROUNDS = {"grey": (125, 125, 125), "sand": (196, 180, 140), "slate": (70, 85, 110)}
NUMBERS = {1: "one", 2: "two", 3: "three"}
SIZES = ("small", "large")
LAYOUTS = ("left-right", "top-bottom")
TWIN_SHARE = 0.3
LANGUAGES = ("en", "zh")  # caption languages the generator writes, each image's captions in this order
# the Chinese grammar's words for the same factors
COLOURS_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
              "white": "白色", "black": "黑色"}
SHAPES_ZH = {"circle": "圆", "square": "方块", "triangle": "三角形", "diamond": "菱形", "cross": "十字"}
BACKGROUNDS_ZH = {"grey": "灰色", "sand": "沙色", "slate": "青灰色"}
NUMBERS_ZH = {1: "一", 2: "两", 3: "三"}
SIZES_ZH = {"small": "小", "large": "大"}
SIDES_ZH = {"left": "左边", "right": "右边", "top": "上面", "bottom": "下面"}
IMAGE_DIR = "Flicker8k_Dataset"  # the name Flickr8k's archive unpacks to


@dataclass(frozen=True)
class Group:
    count: int
    colour: str
    shape: str
    size: str

    def phrase(self, with_size: bool = True, digits: bool = False) -> str:
        size = f"{self.size} " if with_size else ""
        noun = self.shape + ("es" if self.shape == "cross" and self.count > 1 else "s" if self.count > 1 else "")
        number = str(self.count) if digits else ("a" if self.count == 1 else NUMBERS[self.count])
        return f"{number} {size}{self.colour} {noun}"

    def phrase_zh(self, with_size: bool = True, digits: bool = False) -> str:
        """'两个红色的小圆': number and measure word 个, colour, 的, size, shape (Chinese nouns have no plural)."""
        number = str(self.count) if digits else NUMBERS_ZH[self.count]
        size = SIZES_ZH[self.size] if with_size else ""
        return f"{number}个{COLOURS_ZH[self.colour]}的{size}{SHAPES_ZH[self.shape]}"


@dataclass(frozen=True)
class Scene:
    groups: tuple[Group, ...]  # one group (centred) or two (first = left or top)
    layout: str  # "centre", "left-right" or "top-bottom"
    background: str


def random_group(rng: random.Random) -> Group:
    return Group(rng.randint(1, 3), rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES))


def random_scene(rng: random.Random) -> Scene:
    background = rng.choice(list(BACKGROUNDS))
    if rng.random() < 0.2:
        return Scene((random_group(rng),), "centre", background)
    first, second = random_group(rng), random_group(rng)
    while (first.colour, first.shape) == (second.colour, second.shape):
        second = random_group(rng)
    return Scene((first, second), rng.choice(LAYOUTS), background)


def twin(scene: Scene, rng: random.Random) -> Scene:
    """The same scene with exactly one factor changed."""
    groups = list(scene.groups)
    options = ["count", "colour", "shape", "size"] + (["swap"] if len(groups) == 2 else [])
    change = rng.choice(options)
    if change == "swap":
        return replace(scene, groups=(groups[1], groups[0]))
    i = rng.randrange(len(groups))
    group = groups[i]
    while True:
        if change == "count":
            new = replace(group, count=rng.choice([c for c in NUMBERS if c != group.count]))
        elif change == "colour":
            new = replace(group, colour=rng.choice([c for c in COLOURS if c != group.colour]))
        elif change == "shape":
            new = replace(group, shape=rng.choice([s for s in SHAPES if s != group.shape]))
        else:
            new = replace(group, size="large" if group.size == "small" else "small")
        others = [g for j, g in enumerate(groups) if j != i]
        if all((new.colour, new.shape) != (g.colour, g.shape) for g in others):
            groups[i] = new
            return replace(scene, groups=tuple(groups))


def captions(scene: Scene, rng: random.Random) -> tuple[str, ...]:
    """Five differently worded descriptions, each naming every factor except, sometimes, size or background."""
    bg = scene.background
    if scene.layout == "centre":
        g = scene.groups[0]
        lines = [f"{g.phrase()} on a {bg} background", f"a picture of {g.phrase(with_size=False)} in the middle",
                 f"{g.phrase(digits=True)} in the centre of a {bg} image", f"there is {g.phrase()} and nothing else",
                 f"{g.phrase()}"]
    else:
        a, b = scene.groups
        first, second = ("left", "right") if scene.layout == "left-right" else ("top", "bottom")
        relation = "to the left of" if first == "left" else "above"
        inverse = "to the right of" if first == "left" else "below"
        lines = [f"{a.phrase()} on the {first} and {b.phrase()} on the {second}",
                 f"{b.phrase()} on the {second}, {a.phrase(with_size=False)} on the {first}",
                 f"{a.phrase(digits=True)} {relation} {b.phrase(digits=True)} on a {bg} background",
                 f"{first}: {a.phrase()}. {second}: {b.phrase()}",
                 f"a {bg} picture with {b.phrase()} {inverse} {a.phrase()}"]
    rng.shuffle(lines)
    return tuple(lines)


def captions_zh(scene: Scene, rng: random.Random) -> tuple[str, ...]:
    """The Chinese grammar: five wordings naming the same facts as `captions` (its wordings one for one: without
    size, digits, order swapped, the relation to the other group, the background)."""
    bg = BACKGROUNDS_ZH[scene.background]
    if scene.layout == "centre":
        g = scene.groups[0]
        lines = [f"{bg}背景上有{g.phrase_zh()}", f"一张图片，中间有{g.phrase_zh(with_size=False)}",
                 f"{bg}图片的中央有{g.phrase_zh(digits=True)}", f"只有{g.phrase_zh()}，没有别的", g.phrase_zh()]
    else:
        a, b = scene.groups
        first, second = (SIDES_ZH[side] for side in (("left", "right") if scene.layout == "left-right"
                                                     else ("top", "bottom")))
        lines = [f"{a.phrase_zh()}在{first}，{b.phrase_zh()}在{second}",
                 f"{b.phrase_zh()}在{second}，{a.phrase_zh(with_size=False)}在{first}",
                 f"{bg}背景上，{a.phrase_zh(digits=True)}在{b.phrase_zh(digits=True)}的{first}",
                 f"{first}：{a.phrase_zh()}。{second}：{b.phrase_zh()}",
                 f"一张{bg}的图片，{b.phrase_zh()}在{a.phrase_zh()}的{second}"]
    rng.shuffle(lines)
    return tuple(lines)


def render(scene: Scene, rng: random.Random, size: int = 64, supersample: int = 3) -> Image.Image:
    """Draw at `supersample`× and downscale, for smooth edges; the background carries a gradient and noise."""
    big = size * supersample
    base = np.array(BACKGROUNDS[scene.background], np.float32)
    ramp = np.linspace(-18, 18, big, dtype=np.float32)
    gradient = ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (big, big, 3)).astype(np.float32)
    pixels = np.clip(base + gradient + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    pen = ImageDraw.Draw(image)
    if scene.layout == "centre":
        regions = [(0, 0, big, big)]
    elif scene.layout == "left-right":
        regions = [(0, 0, big // 2, big), (big // 2, 0, big, big)]
    else:
        regions = [(0, 0, big, big // 2), (0, big // 2, big, big)]
    for group, region in zip(scene.groups, regions):
        for box in _places(group, region, rng, big):
            _draw_shape(pen, group.shape, box, COLOURS[group.colour])
    return image.resize((size, size), Image.LANCZOS)


def _places(group: Group, region, rng: random.Random, big: int) -> list[tuple[int, int, int, int]]:
    """Boxes for the group's objects inside its region, spread along the region's long side, not overlapping."""
    x0, y0, x1, y1 = region
    side = int(big * (0.26 if group.size == "large" else 0.15) * rng.uniform(0.9, 1.1))
    horizontal = (x1 - x0) >= (y1 - y0)
    length = (x1 - x0) if horizontal else (y1 - y0)
    slot = length / group.count
    boxes = []
    for i in range(group.count):
        along_lo = int(i * slot + max(2, (slot - side) * 0.15))
        along_hi = int((i + 1) * slot - side - max(2, (slot - side) * 0.15))
        along = rng.randint(along_lo, max(along_lo, along_hi))
        across_span = ((y1 - y0) if horizontal else (x1 - x0)) - side
        across = rng.randint(int(across_span * 0.15), max(int(across_span * 0.15), int(across_span * 0.85)))
        x, y = (x0 + along, y0 + across) if horizontal else (x0 + across, y0 + along)
        boxes.append((x, y, x + side, y + side))
    return boxes


def _draw_shape(pen: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy, w = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, y0), (x0, y1), (x1, y1)], fill=fill)
    elif shape == "diamond":
        pen.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        t = w * 0.17
        pen.rectangle((x0, cy - t, x1, cy + t), fill=fill)
        pen.rectangle((cx - t, y0, cx + t, y1), fill=fill)


def generate(out: Path, n_train: int = 10000, n_val: int = 500, n_test: int = 1000, seed: int = 0,
             size: int = 64, languages: tuple[str, ...] = LANGUAGES) -> Path:
    """Write images, Flickr8k.token.txt and Flickr_8k.{train,dev,test}Images.txt under `out`; returns the token
    file. Scenes are distinct across the whole dataset, so test images and captions are never seen in training.
    Each image gets five captions per language of `languages` ("en", "zh"), numbered #0… in that order."""
    unknown = set(languages) - set(LANGUAGES)
    if unknown or not languages:
        raise DatasetError(f"caption languages are some of {LANGUAGES}, not {sorted(unknown) or 'none'}")
    rng = random.Random(seed)
    zh_rng = random.Random(f"{seed}/zh")  # its own stream: the English captions and images stay as without Chinese
    out = Path(out)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    seen: set[Scene] = set()
    splits = {"train": n_train, "dev": n_val, "test": n_test}
    token_lines, split_lists = [], {}
    for split, count in splits.items():
        names = []
        while len(names) < count:
            scene = random_scene(rng)
            batch = [scene] + ([twin(scene, rng)] if rng.random() < TWIN_SHARE and len(names) + 1 < count else [])
            for s in batch:
                if s in seen:
                    continue
                seen.add(s)
                name = f"scene_{split}_{len(names):05d}.jpg"
                render(s, rng, size).save(out / IMAGE_DIR / name, quality=92)
                english = captions(s, rng)  # drawn always, so that the images do not depend on `languages`
                lines = english if "en" in languages else ()
                lines += captions_zh(s, zh_rng) if "zh" in languages else ()
                token_lines += [f"{name}#{i}\t{c}" for i, c in enumerate(lines)]
                names.append(name)
        split_lists[split] = names
    token = out / "Flickr8k.token.txt"
    token.write_text("\n".join(token_lines) + "\n", encoding="utf-8")
    for split, names in split_lists.items():
        (out / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    return token
