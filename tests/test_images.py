import io

import pytest
from PIL import Image

from search.errors import ImageReadError
from search.images import load_image


def _jpeg_bytes(size=(40, 20), colour=(200, 10, 10), **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", **save_args)
    return buffer.getvalue()


def test_decodes_path_and_bytes(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpeg_bytes())
    for source in (tmp_path / "a.jpg", str(tmp_path / "a.jpg"), _jpeg_bytes()):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (40, 20)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"this is not an image at all", "not an image file"),
    (_jpeg_bytes((300, 300))[:400], "cannot decode"),
])
def test_bad_files_raise_one_line_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as error:
        load_image(path)
    assert reason in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="file not found"):
        load_image(tmp_path / "nope.png")


def test_megapixel_limit_is_checked_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (12000, 12000)).save(path)  # 144 MP but a tiny file: a decompression bomb
    with pytest.raises(ImageReadError, match="144 megapixels, over the limit of 100"):
        load_image(path)
    with pytest.raises(ImageReadError, match="over the limit"):
        load_image(_jpeg_bytes((100, 100)), max_megapixels=0.005)


def test_exif_orientation_and_alpha_are_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    rotated = load_image(_jpeg_bytes((40, 20), exif=exif.tobytes()))
    assert rotated.size == (20, 40)
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buffer, "PNG")
    assert load_image(buffer.getvalue()).getpixel((0, 0)) == (255, 255, 255)  # transparent → white, not black


def test_draft_decoding_keeps_the_source_size_and_enough_pixels():
    exif = Image.Exif()
    exif[0x0112] = 6
    image = load_image(_jpeg_bytes((1600, 1200), exif=exif.tobytes()), min_side=224)
    assert image.info["source_size"] == (1200, 1600)  # upright size of the file
    assert min(image.size) >= 224 and image.size[0] < 1200  # decoded smaller, never below the model's input
    assert load_image(_jpeg_bytes((300, 200)), min_side=224).info["source_size"] == (300, 200)
