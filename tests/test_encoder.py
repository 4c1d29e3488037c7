import numpy as np
import pytest
import torch
from PIL import Image

from search.encoders import EncoderSpec, create_encoder
from search.errors import ModelLoadError
from search.openclip.encoder import _encode_text_trimmed

TEXTS = ["a", "a red circle on a grey background", "", "two small blue squares to the left of " * 3,
         "the quick brown fox jumps over the lazy dog " * 10]  # the last is longer than the context: truncated


def test_outputs_are_normalised_float32_rows(tiny_encoder):
    images = [Image.new("RGB", (50, 30), (i * 40, 0, 0)) for i in range(3)]
    for vectors, n in ((tiny_encoder.encode_images(images), 3), (tiny_encoder.encode_texts(TEXTS), len(TEXTS))):
        assert vectors.shape == (n, tiny_encoder.dim) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert tiny_encoder.encode_texts([]).shape == (0, tiny_encoder.dim)
    assert tiny_encoder.encode_images([]).shape == (0, tiny_encoder.dim)


def test_trimmed_text_encoding_equals_full_length(tiny_encoder):
    assert tiny_encoder.trim_text
    model = tiny_encoder.model
    with torch.inference_mode():
        tokens = tiny_encoder.tokenize(TEXTS)
        full = model.encode_text(tokens)
        trimmed = _encode_text_trimmed(model, tokens)
        one = _encode_text_trimmed(model, tiny_encoder.tokenize(["a red circle"]))
    assert float((full - trimmed).abs().max()) < 1e-5
    torch.testing.assert_close(one[0], model.encode_text(tiny_encoder.tokenize(["a red circle"]))[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_each_cpu_precision_loads_runs_and_stays_close(tiny_model_spec, tiny_encoder, precision):
    encoder = create_encoder(EncoderSpec.from_args(tiny_model_spec, None), "torch", precision=precision)
    assert encoder.precision == precision and encoder.fingerprint == tiny_encoder.fingerprint
    images = [Image.new("RGB", (40, 40), (200, 30 * i, 10)) for i in range(4)]
    for got, want in ((encoder.encode_images(images), tiny_encoder.encode_images(images)),
                      (encoder.encode_texts(TEXTS), tiny_encoder.encode_texts(TEXTS))):
        assert got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-3)
        assert float(np.mean(np.sum(got * want, axis=1))) > 0.98


def test_fp16_loads(tiny_model_spec):
    encoder = create_encoder(EncoderSpec.from_args(tiny_model_spec, None), precision="fp16")
    assert encoder.encode_texts(["x"]).shape == (1, 32)


def test_unknown_precision(tiny_model_spec):
    with pytest.raises(ModelLoadError, match="unknown precision 'int4'"):
        create_encoder(EncoderSpec.from_args(tiny_model_spec, None), precision="int4")


def test_fast_preprocessing_equals_open_clips_transform(tiny_encoder):
    assert tiny_encoder.recipe is not None
    rng = np.random.default_rng(0)
    for size, mode in (((300, 200), "RGB"), ((31, 77), "RGB"), ((64, 64), "L")):
        image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
        fast = tiny_encoder.preprocess_image(image)
        reference = tiny_encoder.preprocess(image.convert("RGB")).numpy()
        assert fast.dtype == np.float32 and fast.shape == reference.shape
        assert np.array_equal(fast, reference)  # bit-identical (search/pixels.py)
