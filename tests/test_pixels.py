"""search/pixels.py's PixelRecipe against the oracle, open_clip's own inference transform: np.array_equal (bit for bit),
on real photos, awkward generated sizes and image modes, across the configs open_clip builds; the recipe read off a
transform (search/openclip/recipe.py), its JSON, and the torch-free import."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torchvision.transforms as T
from open_clip import constants
from open_clip.transform import ResizeKeepRatio
from PIL import Image

from search.errors import ImageReadError, ModelLoadError
from search.openclip.recipe import pixel_recipe
from search.pixels import RESIZE_MODES, PixelRecipe

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "open_clip")


def model_size(name: str):
    return open_clip.get_model_config(name)["vision_cfg"]["image_size"]


# open_clip's inference transforms (what create_model_and_transforms builds for these settings; the slow test below
# checks that for the two model configs). Between them they use every resize mode and both crop steps.
CONFIGS = {
    "ViT-B-32": lambda: open_clip.image_transform(model_size("ViT-B-32"), is_train=False),
    "ViT-B-32-256": lambda: open_clip.image_transform(model_size("ViT-B-32-256"), is_train=False),
    "squash-siglip": lambda: open_clip.image_transform(model_size("ViT-B-32"), is_train=False, resize_mode="squash",
                                                       mean=constants.INCEPTION_MEAN, std=constants.INCEPTION_STD),
    "squash-bilinear-imagenet": lambda: open_clip.image_transform(
        model_size("ViT-B-32"), is_train=False, resize_mode="squash", interpolation="bilinear",
        mean=constants.IMAGENET_MEAN, std=constants.IMAGENET_STD),
    "shortest-bilinear-mean0-std1": lambda: open_clip.image_transform(  # MobileCLIP's
        model_size("ViT-B-32"), is_train=False, interpolation="bilinear", mean=(0., 0., 0.), std=(1., 1., 1.)),
    "shortest-non-square": lambda: open_clip.image_transform((224, 160), is_train=False),
    "longest-fill-128": lambda: open_clip.image_transform(224, is_train=False, resize_mode="longest", fill_color=128),
}

SIZES = [(1, 1), (7, 300), (300, 7), (223, 224), (224, 224), (225, 224), (1000, 333), (333, 1000), (101, 77),
         (255, 257), (2, 3), (640, 480)]  # (width, height)
MODES = ("L", "RGBA", "P", "I;16", "CMYK", "1", "LA")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def config(request):
    preprocess = CONFIGS[request.param]()
    recipe = pixel_recipe(preprocess)
    assert recipe is not None, request.param
    return request.param, preprocess, recipe


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise over gradients and hard edges: every resampling filter tap and rounding case shows."""
    rng = np.random.default_rng(seed + 7 * width + height)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), ((x // 5 + y // 3) % 2) * 255], -1)
    noisy = base + rng.integers(-40, 41, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def in_mode(image: Image.Image, mode: str) -> Image.Image:
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=37)
    if mode == "I;16":  # 16-bit grey, the full range
        return Image.fromarray((np.asarray(image.convert("L"), np.uint16) * 257).astype(np.uint16))
    return image.convert(mode)


def saved(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def assert_bit_identical(recipe: PixelRecipe, preprocess, image: Image.Image, label) -> None:
    ours = recipe.apply(image)
    theirs = preprocess(image).numpy()
    assert ours.dtype == np.float32 and ours.shape == (3, *recipe.size) == theirs.shape, label
    assert np.array_equal(ours, theirs), (label, int((ours != theirs).sum()), float(np.abs(ours - theirs).max()))


def test_the_configs_cover_every_resize_mode_and_both_crops():
    recipes = [pixel_recipe(make()) for make in CONFIGS.values()]
    assert {r.resize_mode for r in recipes} == set(RESIZE_MODES)
    assert {r.crop_size is None for r in recipes} == {True, False} and {r.crop_fill for r in recipes} == {0, 128}
    b32, b32_256 = pixel_recipe(CONFIGS["ViT-B-32"]()), pixel_recipe(CONFIGS["ViT-B-32-256"]())
    assert (b32.size, b32_256.size) == ((224, 224), (256, 256))
    assert (b32.resize_mode, b32.interpolation) == ("shortest", "bicubic")
    assert b32.mean == open_clip.OPENAI_DATASET_MEAN and b32.std == open_clip.OPENAI_DATASET_STD


def test_generated_images_of_awkward_sizes(config, tmp_path):
    name, preprocess, recipe = config
    for width, height in SIZES:
        path = saved(picture(width, height), tmp_path / f"{width}x{height}.png")
        assert_bit_identical(recipe, preprocess, Image.open(path).convert("RGB"), (name, width, height))


@pytest.mark.parametrize("name", ["ViT-B-32", "shortest-non-square", "longest-fill-128", "squash-siglip"])
def test_image_modes(name, tmp_path):
    preprocess = CONFIGS[name]()
    recipe = pixel_recipe(preprocess)
    for mode in MODES:
        for width, height in ((1, 1), (7, 30), (225, 224), (101, 77)):
            path = saved(in_mode(picture(width, height, seed=1), mode),
                         tmp_path / f"{width}x{height}-{mode.replace(';', '_')}.{'jpg' if mode == 'CMYK' else 'png'}")
            with Image.open(path) as opened:
                assert opened.mode == mode
                # the oracle line: preprocess(Image.open(p).convert("RGB")); and the mode as decoded, unconverted
                assert_bit_identical(recipe, preprocess, opened.convert("RGB"), (name, mode, width, height))
                assert_bit_identical(recipe, preprocess, opened, (name, mode, width, height, "unconverted"))


def photos_from_scikit_image():
    data = pytest.importorskip("skimage.data")
    return {name: getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                                                     "camera")}  # camera is grey (2-D)


def test_real_photos_from_scikit_image(config, tmp_path):
    name, preprocess, recipe = config
    for photo, array in photos_from_scikit_image().items():
        path = saved(Image.fromarray(array), tmp_path / f"{photo}.jpg")
        assert_bit_identical(recipe, preprocess, Image.open(path).convert("RGB"), (name, photo))


def test_real_photos_from_scikit_learn(config, tmp_path):
    datasets = pytest.importorskip("sklearn.datasets")
    name, preprocess, recipe = config
    for i, array in enumerate(datasets.load_sample_images().images):
        path = saved(Image.fromarray(array), tmp_path / f"sample_{i}.jpg")
        assert_bit_identical(recipe, preprocess, Image.open(path).convert("RGB"), (name, i))


def test_to_tensor_divides_and_a_reciprocal_multiply_would_not_match():
    """Why apply divides: torchvision's to-tensor is x / 255; x * (1/255) rounds twice and differs for some bytes."""
    values = np.arange(256, dtype=np.uint8)
    theirs = T.ToTensor()(Image.fromarray(values.reshape(16, 16))).numpy().reshape(-1)
    assert np.array_equal(theirs, values.astype(np.float32) / np.float32(255))
    assert not np.array_equal(theirs, values.astype(np.float32) * np.float32(1 / 255))


def test_create_model_and_transforms_preprocess_is_the_same(tiny_encoder):
    """The tiny model's preprocess comes from open_clip.create_model_and_transforms through search/openclip/loading.py;
    OpenClipEncoder.preprocess_image (the recipe) equals it bit for bit."""
    assert tiny_encoder.recipe is not None and tiny_encoder.recipe.size == (32, 32)
    for width, height in ((300, 200), (31, 77), (32, 32), (1, 1), (7, 300)):
        image = picture(width, height, seed=2)
        assert np.array_equal(tiny_encoder.preprocess_image(image), tiny_encoder.preprocess(image).numpy())
    grey = picture(40, 60, seed=3).convert("L")
    assert np.array_equal(tiny_encoder.preprocess_image(grey), tiny_encoder.preprocess(grey).numpy())


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ViT-B-32", "ViT-B-32-256"])
def test_the_configs_match_what_create_model_and_transforms_builds(model, tmp_path):
    preprocess = open_clip.create_model_and_transforms(model, pretrained=None)[2]
    recipe = pixel_recipe(preprocess)
    assert recipe == pixel_recipe(CONFIGS[model]())
    squashed = open_clip.create_model_and_transforms(model, pretrained=None, image_resize_mode="squash",
                                                     image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))[2]
    assert pixel_recipe(squashed).resize_mode == "squash" and pixel_recipe(squashed).mean == (0.5, 0.5, 0.5)
    path = saved(picture(640, 480, seed=4), tmp_path / "photo.png")
    for transform in (preprocess, squashed):
        assert_bit_identical(pixel_recipe(transform), transform, Image.open(path).convert("RGB"), model)


# -- the recipe's JSON ------------------------------------------------------------------------------------------------

def test_json_round_trip(config):
    name, preprocess, recipe = config
    stored = json.loads(json.dumps(recipe.to_json()))
    again = PixelRecipe.from_json(stored)
    assert again == recipe and again.to_json() == recipe.to_json()
    image = picture(333, 250, seed=5)
    assert np.array_equal(again.apply(image), preprocess(image).numpy())


@pytest.mark.parametrize("change, message", [
    ({"resize_mode": "bogus"}, "resize_mode 'bogus'"),
    ({"interpolation": "magic"}, "interpolation 'magic'"),
    ({"resize_size": [224, 224]}, "resize_size"),
    ({"crop_size": None}, "needs a crop_size"),
    ({"crop_size": [224]}, "crop_size"),
    ({"std": [0.5, 0.0, 0.5]}, "std non-zero"),
    ({"mean": [0.5, 0.5]}, "mean"),
    ({"longest": 2.0}, "longest"),
    ({"extra_step": "sharpen"}, "keys"),
    ({"mean": None}, "pixel recipe"),
])
def test_unreadable_json_is_a_model_load_error(change, message):
    data = {**pixel_recipe(CONFIGS["ViT-B-32"]()).to_json(), **change}
    with pytest.raises(ModelLoadError, match=message) as caught:
        PixelRecipe.from_json(data)
    assert "\n" not in str(caught.value)


def test_a_missing_key_is_a_model_load_error():
    data = pixel_recipe(CONFIGS["ViT-B-32"]()).to_json()
    del data["crop_fill"]
    with pytest.raises(ModelLoadError, match="keys"):
        PixelRecipe.from_json(data)
    with pytest.raises(ModelLoadError):
        PixelRecipe.from_json([])


# -- what pixel_recipe refuses ----------------------------------------------------------------------------------------

def _with(steps, index, step, replace=False):
    steps = list(steps)
    steps[index:index + 1 if replace else index] = [step]
    return T.Compose(steps)


class _Sharper(T.Resize):
    """A subclass may change what it does: matched by exact type only."""


def test_transforms_it_cannot_reproduce_give_none():
    steps = CONFIGS["ViT-B-32"]().transforms
    resize = steps[0]
    refused = {
        "an extra unknown step": _with(steps, 2, lambda image: image.rotate(1)),
        "an extra torchvision step": _with(steps, 1, T.Grayscale(3)),
        "no normalise": T.Compose(steps[:-1]),
        "no convert": T.Compose(steps[:2] + steps[3:]),
        "max_size": _with(steps, 0, T.Resize(224, max_size=300), replace=True),
        "a Resize subclass": _with(steps, 0, _Sharper(224, interpolation=resize.interpolation), replace=True),
        "random scale": _with(steps, 0, ResizeKeepRatio(224, random_scale_prob=0.5), replace=True),
        "shortest without a crop": T.Compose(steps[:1] + steps[2:]),
        "crop before resize": T.Compose([steps[1], steps[0], *steps[2:]]),
        "the training transform": open_clip.image_transform(224, is_train=True),
        "an unknown step in the crop's place": _with(steps, 1, T.Grayscale(3), replace=True),
        "an unknown step in the convert's place": _with(steps, 2, lambda image: image.convert("RGB"), replace=True),
        "not a Compose": lambda image: image,
    }
    assert {name: pixel_recipe(transform) for name, transform in refused.items()} == dict.fromkeys(refused)
    # what it does accept: torchvision maps a PIL filter number to its mode, and a list size [n] is the shorter side
    accepted = _with(steps, 0, T.Resize([224], interpolation=3), replace=True)
    assert pixel_recipe(accepted) == pixel_recipe(T.Compose(steps))


def test_too_thin_for_keep_ratio_is_an_image_read_error():
    preprocess = CONFIGS["longest-fill-128"]()
    thin = picture(1, 1000)  # 224 / 1000 of one pixel rounds to 0: open_clip fails as well
    with pytest.raises(ValueError):
        preprocess(thin)
    with pytest.raises(ImageReadError, match="1x1000 image is too thin"):
        pixel_recipe(preprocess).apply(thin)


# -- torch-free --------------------------------------------------------------------------------------------------------

USER_SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
from search.pixels import PixelRecipe
recipe = PixelRecipe.from_json(json.load(open("recipe.json")))
np.save("pixels.npy", recipe.apply(Image.open("photos/photo.jpg").convert("RGB")))
print(sorted(m for m in {heavy!r} if m in sys.modules))
"""


def test_a_fresh_process_applies_a_stored_recipe_without_torch(tmp_path):
    """What the torch-free query path does: read the recipe JSON beside an export and preprocess a photo, from another
    working directory with relative paths, never importing torch, torchvision or open_clip."""
    preprocess = CONFIGS["ViT-B-32"]()
    (tmp_path / "recipe.json").write_text(json.dumps(pixel_recipe(preprocess).to_json()))
    (tmp_path / "photos").mkdir()
    path = saved(picture(640, 480, seed=6), tmp_path / "photos" / "photo.jpg")
    done = subprocess.run([sys.executable, "-c", USER_SCRIPT.format(heavy=HEAVY)], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert np.array_equal(np.load(tmp_path / "pixels.npy"), preprocess(Image.open(path).convert("RGB")).numpy())
