"""open_clip's inference image transform in numpy and PIL alone: `PixelRecipe`.

A recipe is resize → optional centre crop → convert("RGB") → to-tensor → normalise, each step done with the same PIL
calls and the same float32 arithmetic as torchvision's transforms on a PIL image, so `apply` gives open_clip's
own `preprocess(image)` bit for bit (tests/test_pixels.py checks it with np.array_equal). Imports neither torch nor
torchvision nor open_clip: the torch-free path (search/onnxrt/) preprocesses with it. search/openclip/recipe.py reads
a recipe off an open_clip transform; `to_json` / `from_json` store it beside an exported model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageReadError, ModelLoadError

SHORTEST, SQUASH, KEEP_RATIO = "shortest", "squash", "keep_ratio"
RESIZE_MODES = (SHORTEST, SQUASH, KEEP_RATIO)
# torchvision's InterpolationMode values → the PIL filter torchvision resizes PIL images with (its pil_modes_mapping)
INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "nearest-exact": Image.Resampling.NEAREST,
                  "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
                  "lanczos": Image.Resampling.LANCZOS}
CHANNELS = 3
UINT8_MAX = np.float32(255)
_FIELDS = ("resize_mode", "resize_size", "longest", "interpolation", "crop_size", "crop_fill", "mean", "std")


@dataclass(frozen=True)
class PixelRecipe:
    """How an image becomes the model's float32 [3, H, W] input.

    resize_mode   SHORTEST:   torchvision Resize(n): the shorter side becomes resize_size == (n,), the longer
                              int(n * long / short) (truncated)
                  SQUASH:     torchvision Resize((h, w)): exactly resize_size == (h, w), aspect ratio ignored
                  KEEP_RATIO: open_clip's ResizeKeepRatio(resize_size == (h, w), longest): both sides divided by
                              max_ratio * longest + min_ratio * (1 - longest), rounded (Python's round); longest 0 is
                              open_clip's 'shortest' for a non-square size, 1 its 'longest'
    interpolation torchvision's interpolation name ("bicubic", "bilinear", ...), applied as its PIL filter
    crop_size     (h, w) of torchvision's CenterCrop / open_clip's CenterCropOrPad (padding with crop_fill first when
                  the image is smaller), or None (only with SQUASH, so the output size never depends on the image)
    mean, std     per-channel Normalize after to-tensor's division by 255
    """
    resize_mode: str
    resize_size: tuple[int, ...]
    interpolation: str
    crop_size: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    longest: float = 0.0
    crop_fill: int = 0

    def __post_init__(self):
        problem = self._problem()
        if problem:
            raise ValueError(f"invalid pixel recipe: {problem}")

    def _problem(self) -> str | None:
        def ints(value, count):
            return isinstance(value, tuple) and len(value) == count and \
                all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)

        if self.resize_mode not in RESIZE_MODES:
            return f"resize_mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}"
        if not ints(self.resize_size, 1 if self.resize_mode == SHORTEST else 2):
            return f"resize_size {self.resize_size!r} does not fit resize_mode {self.resize_mode!r}"
        if self.interpolation not in INTERPOLATIONS:
            return f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
        if self.crop_size is None and self.resize_mode != SQUASH:
            return f"resize_mode {self.resize_mode!r} needs a crop_size (else the output size varies)"
        if self.crop_size is not None and not ints(self.crop_size, 2):
            return f"crop_size {self.crop_size!r} is not a (height, width) pair"
        if not (isinstance(self.crop_fill, int) and not isinstance(self.crop_fill, bool)):
            return f"crop_fill {self.crop_fill!r} is not an integer"
        if not isinstance(self.longest, float) or not 0.0 <= self.longest <= 1.0:
            return f"longest {self.longest!r} is not a float in [0, 1]"
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not (isinstance(values, tuple) and len(values) == CHANNELS and all(type(v) is float for v in values)):
                return f"{name} {values!r} is not {CHANNELS} floats"
        if not all(np.isfinite(self.mean)) or not all(np.isfinite(self.std)) or \
                not np.all(np.asarray(self.std, np.float32) != 0):
            return "mean and std must be finite and std non-zero in float32"
        return None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of every output."""
        return self.crop_size if self.crop_size is not None else self.resize_size

    # -- storage ------------------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"resize_mode": self.resize_mode, "resize_size": list(self.resize_size), "longest": self.longest,
                "interpolation": self.interpolation,
                "crop_size": None if self.crop_size is None else list(self.crop_size), "crop_fill": self.crop_fill,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: dict) -> "PixelRecipe":
        """The recipe `to_json` wrote. Raises ModelLoadError when `data` is not one (an unknown key is refused too:
        a step this reader does not know would change the pixels)."""
        try:
            if not isinstance(data, dict) or set(data) != set(_FIELDS):
                raise ValueError(f"its keys are not {', '.join(_FIELDS)}")
            crop = data["crop_size"]
            return cls(resize_mode=data["resize_mode"], resize_size=tuple(data["resize_size"]),
                       interpolation=data["interpolation"], crop_size=None if crop is None else tuple(crop),
                       mean=tuple(data["mean"]), std=tuple(data["std"]), longest=data["longest"],
                       crop_fill=data["crop_fill"])
        except (ValueError, TypeError) as error:
            raise ModelLoadError(f"unreadable pixel recipe ({error})") from None

    # -- the transform ------------------------------------------------------------------------------------------------

    def apply(self, image: Image.Image) -> np.ndarray:
        """float32 [3, H, W]: open_clip's preprocess(image), bit for bit."""
        image = self._resize(image)
        if self.crop_size is not None:
            image = _center_crop(image, self.crop_size, self.crop_fill)
        # bytes to [C, H, W] first: the float work then runs in place on contiguous memory (about 3x faster)
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), np.uint8).transpose(2, 0, 1)).astype(np.float32)
        pixels /= UINT8_MAX  # to-tensor divides: x * (1 / 255) would round twice and differ in the last bit
        mean, std = (np.asarray(values, np.float32).reshape(CHANNELS, 1, 1) for values in (self.mean, self.std))
        pixels -= mean  # Normalize: subtract, then divide, each rounded to float32
        pixels /= std
        return pixels

    def _resize(self, image: Image.Image) -> Image.Image:
        height, width = image.height, image.width
        if self.resize_mode == SHORTEST:  # torchvision's _compute_resized_output_size for one int
            requested = self.resize_size[0]
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = requested, int(requested * long / short)
            new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        elif self.resize_mode == SQUASH:
            new_height, new_width = self.resize_size
        else:  # open_clip's ResizeKeepRatio.get_params without its random scale and aspect
            ratio_h, ratio_w = height / self.resize_size[0], width / self.resize_size[1]
            ratio = max(ratio_h, ratio_w) * self.longest + min(ratio_h, ratio_w) * (1. - self.longest)
            new_height, new_width = (round(side * 1. / ratio) for side in (height, width))
            if not (new_height and new_width):  # open_clip fails here too (PIL's ValueError)
                raise ImageReadError(f"a {width}x{height} image is too thin to resize into "
                                     f"{self.resize_size[1]}x{self.resize_size[0]}")
        if (new_height, new_width) == (height, width):
            return image  # torchvision returns the image itself, not a resampled copy
        return image.resize((new_width, new_height), INTERPOLATIONS[self.interpolation])


def _center_crop(image: Image.Image, size: tuple[int, int], fill: int) -> Image.Image:
    """torchvision's center_crop (fill 0) and open_clip's center_crop_or_pad on a PIL image."""
    crop_height, crop_width = size
    height, width = image.height, image.width
    if crop_width > width or crop_height > height:
        wider, taller = crop_width > width, crop_height > height
        padding = ((crop_width - width) // 2 if wider else 0, (crop_height - height) // 2 if taller else 0,
                   (crop_width - width + 1) // 2 if wider else 0, (crop_height - height + 1) // 2 if taller else 0)
        image = _pad(image, padding, fill)
        height, width = image.height, image.width
        if (crop_height, crop_width) == (height, width):
            return image
    top = int(round((height - crop_height) / 2.0))
    left = int(round((width - crop_width) / 2.0))
    return image.crop((left, top, left + crop_width, top + crop_height))


def _pad(image: Image.Image, padding: tuple[int, int, int, int], fill: int) -> Image.Image:
    """torchvision's constant pad of a PIL image (left, top, right, bottom): the fill per band, a palette kept."""
    bands = len(image.getbands())
    colour = tuple([fill] * bands) if bands > 1 else fill
    if image.mode == "P":
        palette = image.getpalette()
        padded = ImageOps.expand(image, border=padding, fill=colour)
        if palette is not None:
            padded.putpalette(palette)
        return padded
    return ImageOps.expand(image, border=padding, fill=colour)
