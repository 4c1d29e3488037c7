"""Safe image decoding shared by the indexer (files) and query paths (files, uploads).

`load_image` returns an RGB PIL image fully decoded, or raises ImageReadError with a one-line reason: missing,
empty, not an image, truncated/corrupt, or larger than the megapixel limit (checked from the header, before any
pixels are decoded, so a decompression bomb costs nothing).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageReadError

DEFAULT_MAX_MEGAPIXELS = 100.0
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif"})

# Every open in this project goes through load_image, which enforces max_megapixels from the header; PIL's own global
# guard would otherwise refuse images a user explicitly allowed with --max-megapixels.
Image.MAX_IMAGE_PIXELS = None

try:  # HEIC/HEIF photos (iPhones) when the optional pillow-heif package is installed
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:
    pass

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


def _describe(source: ImageSource) -> str:
    if isinstance(source, (bytes, bytearray)):
        return "uploaded image"
    if isinstance(source, Image.Image):
        return "image"
    return str(source)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale down instead of clipping to white
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def load_image(source: ImageSource, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
               min_side: int | None = None, name: str | None = None) -> Image.Image:
    """Decode `source` (path, bytes or PIL image) into an upright RGB image; ImageReadError on any failure.

    With `min_side`, a JPEG is decoded at the smallest power-of-two reduction that keeps both sides >= min_side
    (libjpeg scales in the DCT domain: several times faster for photos); `image.info["source_size"]` then holds the
    upright size of the file itself."""
    name = name or _describe(source)
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise ImageReadError(f"{name}: empty file")
            handle = io.BytesIO(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageReadError(f"{name}: file not found")
            if path.stat().st_size == 0:
                raise ImageReadError(f"{name}: empty file")
            handle = path.open("rb")
        with handle:
            image = Image.open(handle)
            megapixels = image.width * image.height / 1e6
            if megapixels > max_megapixels:
                raise ImageReadError(
                    f"{name}: {image.width}x{image.height} is {megapixels:.0f} megapixels, over the limit of "
                    f"{max_megapixels:g} (raise it with --max-megapixels)")
            full_width = image.width
            if min_side and image.format == "JPEG":
                image.draft("RGB", (min_side, min_side))
            scale = full_width / image.width
            image.load()  # decode now, while the file is open, so truncation is caught here
            image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
        rgb.info["source_size"] = (round(rgb.width * scale), round(rgb.height * scale))
        return rgb
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"{name}: not an image file (format not recognised)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: cannot decode ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
