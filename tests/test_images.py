"""Image decoding: GIF frames, other formats, every failure reason, preprocessing numerics."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from data_prep.build_shards import normalize_pixels
from data_prep.images import (
    ImageDecodeError,
    decode_image,
    decode_image_uint8,
    load_gif,
    normalization,
    preprocess,
)


def palette_frame(value: int, size=(40, 30)) -> Image.Image:
    """A palette ('P') image whose every pixel is palette entry `value` (a grey of that level)."""
    img = Image.new("P", size, color=value)
    img.putpalette(bytes(v for i in range(256) for v in (i, i, i)))
    return img


@pytest.fixture
def two_frame_gif(tmp_path):
    path = tmp_path / "md0001_20140512_18_shr6.gif"
    first, second = palette_frame(40), palette_frame(200)
    first.save(path, format="GIF", save_all=True, append_images=[second], duration=100, loop=0)
    return path


def test_load_gif_frames_are_rgb_and_distinct(two_frame_gif):
    f0, f1 = load_gif(two_frame_gif), load_gif(two_frame_gif, frame=1)
    assert f0.mode == f1.mode == "RGB" and f0.size == (40, 30)
    assert np.asarray(f0).mean() == pytest.approx(40, abs=1)
    assert np.asarray(f1).mean() == pytest.approx(200, abs=1)
    with pytest.raises(ValueError):
        load_gif(two_frame_gif, frame=-1)


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_png_and_jpeg(tmp_path, fmt, suffix):
    path = tmp_path / f"img{suffix}"
    Image.new("RGB", (20, 20), (10, 120, 250)).save(path, format=fmt)
    img = load_gif(path)
    assert img.mode == "RGB" and np.abs(np.asarray(img, dtype=int) - [10, 120, 250]).max() <= 3
    with pytest.raises(ImageDecodeError) as err:
        load_gif(path, frame=1)
    assert err.value.reason == "bad_frame"


def gif_bytes() -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), mode="L").convert("P")
    buf = io.BytesIO()
    img.save(buf, format="GIF")
    return buf.getvalue()


BAD_IMAGES = {
    "missing": None,
    "empty": b"",
    "not_an_image": b"<html>404 Not Found</html>",
    "corrupt_header_only": gif_bytes()[:40],
    "corrupt_truncated": gif_bytes()[: len(gif_bytes()) // 2],
    "corrupt_garbage": b"GIF89a" + bytes(range(256)) * 4,
    "corrupt_png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 50,
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_every_bad_image_raises_with_its_reason(tmp_path, kind):
    path = tmp_path / f"{kind}.gif"
    if BAD_IMAGES[kind] is not None:
        path.write_bytes(BAD_IMAGES[kind])
    expected = kind.split("_")[0] if kind.startswith("corrupt") else kind
    for call in (lambda: load_gif(path), lambda: decode_image(path, 32)):
        with pytest.raises(ImageDecodeError) as err:
            call()
        assert err.value.reason == expected
        assert err.value.path == str(path) and str(path) in str(err.value)
        assert isinstance(err.value, ValueError)


def test_bad_frame_and_error_pickles(two_frame_gif):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(two_frame_gif, 32, frame=2)
    assert err.value.reason == "bad_frame" and "has 2" in str(err.value)
    # Raised in builder worker processes: must survive pickling with its fields.
    again = pickle.loads(pickle.dumps(err.value))
    assert (again.path, again.reason, str(again)) == (err.value.path, err.value.reason, str(err.value))


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageDecodeError) as err:
        load_gif(tmp_path)
    assert err.value.reason == "not_an_image"


def test_preprocess_shape_and_normalisation():
    mean, std = normalization()
    colour = (30, 128, 240)
    out = preprocess(Image.new("RGB", (50, 70), colour), image_size=24)
    assert out.shape == (3, 24, 24) and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, mean, std)]
    np.testing.assert_allclose(out.reshape(3, -1).mean(1), expected, atol=1e-5)
    np.testing.assert_allclose(out.reshape(3, -1).std(1), 0, atol=1e-5)


def test_preprocess_keeps_the_layout():
    """Channel order and spatial orientation survive: a red left half stays red and on the left."""
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, :16, 0] = 255
    out = preprocess(Image.fromarray(arr), image_size=16)
    mean, std = normalization()
    red_hi, red_lo = (1 - mean[0]) / std[0], (0 - mean[0]) / std[0]
    assert out[0, :, :6].mean() == pytest.approx(red_hi, abs=0.05)
    assert out[0, :, -6:].mean() == pytest.approx(red_lo, abs=0.05)
    assert np.allclose(out[1], (0 - mean[1]) / std[1], atol=1e-5)


def test_decode_image_is_load_plus_preprocess(two_frame_gif):
    for frame in (0, 1):
        expected = preprocess(load_gif(two_frame_gif, frame), 16)
        np.testing.assert_array_equal(decode_image(two_frame_gif, 16, frame=frame), expected)
    # The raw bytes (e.g. a shard's `gif` field) decode the same as the file.
    np.testing.assert_array_equal(decode_image(two_frame_gif.read_bytes(), 16), decode_image(two_frame_gif, 16))


def test_explicit_statistics_override_the_default(two_frame_gif):
    plain = decode_image(two_frame_gif, 8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert plain.min() >= 0.0 and plain.max() <= 1.0
    np.testing.assert_allclose(plain, 40 / 255, atol=2 / 255)
    mean, std = normalization()
    np.testing.assert_array_equal(decode_image(two_frame_gif, 8, mean=mean, std=std), decode_image(two_frame_gif, 8))


def test_uint8_path_normalised_in_torch_equals_decode_image(two_frame_gif, tmp_path):
    """The shard builder ships uint8 pixels and normalises them in torch: bit-identical on CPU."""
    import torch

    rng = np.random.default_rng(0)
    noisy = tmp_path / "noise.gif"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(noisy)
    for path, frame in ((two_frame_gif, 1), (noisy, 0)):
        raw = decode_image_uint8(path, 24, frame=frame)
        assert raw.dtype == np.uint8 and raw.shape == (3, 24, 24)
        batch = torch.from_numpy(np.stack([raw, raw]))
        np.testing.assert_array_equal(normalize_pixels(batch)[1].numpy(), decode_image(path, 24, frame=frame))
