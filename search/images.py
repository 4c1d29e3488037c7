"""Safe image decoding shared by the indexer (files) and query paths (files, uploads).

`load_image` returns an RGB PIL image fully decoded, or raises ImageReadError with a one-line reason: missing,
empty, not an image, in a format outside ALLOWED_FORMATS, truncated/corrupt, or larger than the megapixel limit
(checked from the header, before any pixels are decoded, so a decompression bomb costs nothing).

Only the decoders in ALLOWED_FORMATS ever run: Pillow knows ~40 formats, some decoded by external programs (EPS by
Ghostscript) or by rarely exercised parsers, and a file's name says nothing about its content. Refused formats are
named from their magic bytes alone, so no parser of theirs runs either.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

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

Image.init()  # register every plugin now, so the allow-list below sees which optional ones exist
# The formats whose decoders may run, passed as `formats=` to every Image.open. HEIF (pillow-heif) and AVIF (Pillow's
# own plug-in, when built with libavif) only when registered. A JPEG with multi-picture data opens as MPO through
# the JPEG opener: same decoder.
ALLOWED_FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF") if f in Image.OPEN)
_SAME_DECODER = {"MPO": "JPEG"}
SNIFF_BYTES = 32
_DOCUMENTS = frozenset({"PDF"})  # recognised, but not images at all
_ISO_BRANDS = {b"heic": "HEIF", b"heix": "HEIF", b"heim": "HEIF", b"heis": "HEIF", b"mif1": "HEIF",
               b"msf1": "HEIF", b"hevc": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}
# Magic bytes of the formats an image file may be in (allowed or not), only to name them in error messages.
_SIGNATURES = (
    ("JPEG", (b"\xff\xd8\xff",)), ("PNG", (b"\x89PNG\r\n\x1a\n",)), ("GIF", (b"GIF87a", b"GIF89a")),
    ("BMP", (b"BM",)), ("TIFF", (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),
    ("EPS", (b"%!PS", b"\xc5\xd0\xd3\xc6")), ("PDF", (b"%PDF",)), ("PSD", (b"8BPS",)),
    ("ICNS", (b"icns",)),
    ("JPEG2000", (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  \r\n\x87\n")), ("QOI", (b"qoif",)),
    ("DDS", (b"DDS ",)), ("SGI", (b"\x01\xda",)), ("SUN", (b"\x59\xa6\x6a\x95",)), ("FITS", (b"SIMPLE",)),
    ("BLP", (b"BLP1", b"BLP2")), ("FTEX", (b"FTEX",)), ("MSP", (b"DanM", b"LinS")), ("DCX", (b"\xb1\x68\xde\x3a",)),
    ("WMF", (b"\xd7\xcd\xc6\x9a",)), ("XPM", (b"/* XPM */",)), ("XBM", (b"#define",)), ("IM", (b"Image type:",)),
    ("SVG", (b"<svg", b"<?xml")),
    ("PPM", tuple(b"P" + c for c in (b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"F", b"f"))),
    ("PCX", tuple(bytes((10, version, 1)) for version in (0, 2, 3, 4, 5))),
)


def sniff_format(prefix: bytes) -> str | None:
    """The format name a file's first SNIFF_BYTES announce (allowed or not), or None. Compares bytes only."""
    if prefix[:4] == b"RIFF" and prefix[8:12] == b"WEBP":
        return "WEBP"
    if prefix[4:8] == b"ftyp":
        return _ISO_BRANDS.get(prefix[8:12])
    if prefix[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"):  # ICO/CUR, or a TGA header (no image count)
        return None if prefix[4:6] == b"\x00\x00" else ("ICO" if prefix[2] == 1 else "CUR")
    text = prefix.lstrip()
    for fmt, magics in _SIGNATURES:
        if any(prefix.startswith(m) or (fmt in ("XBM", "SVG") and text.startswith(m)) for m in magics):
            return fmt
    return None


def _refused(name: str, fmt: str) -> ImageReadError:
    return ImageReadError(f"{name}: unsupported image format ({fmt}); allowed: {', '.join(ALLOWED_FORMATS)}")


def _open(handle, name: str) -> Image.Image:
    """Image.open restricted to ALLOWED_FORMATS (reads the header only); a refused file is named by its magic."""
    try:
        return Image.open(handle, formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        handle.seek(0)
        fmt = sniff_format(handle.read(SNIFF_BYTES))
    if fmt is None or fmt in _DOCUMENTS:
        raise ImageReadError(f"{name}: not an image file ({fmt or 'format not recognised'}; allowed: "
                             f"{', '.join(ALLOWED_FORMATS)})")
    if fmt in ALLOWED_FORMATS:
        raise ImageReadError(f"{name}: cannot decode (broken {fmt} header)")
    raise _refused(name, fmt)


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """The size after EXIF orientation, from the header alone (no pixels decoded)."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size


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

    Exact by default: the pixels are those of `ImageOps.exif_transpose(Image.open(p)).convert("RGB")`, so a model's
    preprocessing gives the same input as open_clip's reference `preprocess(Image.open(p).convert("RGB"))` for an
    upright file. `min_side` opts into fast decoding: a JPEG is decoded at the smallest power-of-two reduction that
    keeps both sides >= min_side (libjpeg scales in the DCT domain: several times faster for photos, slightly
    different pixels). `image.info["source_size"]` always holds the upright size of the file itself."""
    name = name or _describe(source)
    if isinstance(source, Image.Image):
        if source.format and _SAME_DECODER.get(source.format, source.format) not in ALLOWED_FORMATS:
            raise _refused(name, source.format)  # opened by the caller but not yet decoded (load() is lazy)
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
            image = _open(handle, name)
            megapixels = image.width * image.height / 1e6
            if megapixels > max_megapixels:
                raise ImageReadError(
                    f"{name}: {image.width}x{image.height} is {megapixels:.0f} megapixels, over the limit of "
                    f"{max_megapixels:g} (raise it with --max-megapixels)")
            source_size = None
            if min_side and image.format in ("JPEG", "MPO"):
                source_size = _upright_size(image)  # from the header: the draft's size is rounded
                image.draft("RGB", (min_side, min_side))
            image.load()  # decode now, while the file is open, so truncation is caught here
            image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
        rgb.info["source_size"] = source_size or rgb.size
        return rgb
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"{name}: not an image file (format not recognised)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: cannot decode ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
