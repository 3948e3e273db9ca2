"""Image decoding for Stage1: GIF (or PNG/JPEG) file -> normalised float32 [3, H, W] (or uint8).

This runs ~160k times per full build, in worker processes, so it avoids torch and does as little
work as possible: palette GIFs are expanded to RGB once, large images are shrunk with PIL's
`reducing_gap` (a fast box pre-reduction, then bicubic; visually identical to plain bicubic).
JPEG `draft` decoding is deliberately not used: it would make `decode_image` differ from
`preprocess(load_gif(...))`, and WeatherQA images are GIFs. The shard builder and every evaluation path decode
through `decode_image`, so cached latents and fresh ones see the same pixels.

Every failure is an `ImageDecodeError` with `.path` and a short `.reason`:
"missing", "empty", "not_an_image" (no known image signature), "corrupt" (an image signature but
undecodable/truncated data), "bad_frame" (the requested frame does not exist).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.image_norm import IMAGE_MEAN, IMAGE_STD

RESAMPLE = Image.Resampling.BICUBIC
REDUCING_GAP = 3.0
DECODE_REASONS = ("missing", "empty", "not_an_image", "corrupt", "bad_frame")
_SIGNATURES = (b"GIF87a", b"GIF89a", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")

ImageSource = Union[str, os.PathLike, bytes, bytearray]


class ImageDecodeError(ValueError):
    """An image that cannot be used; `reason` is one of DECODE_REASONS."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}" + (f": {detail}" if detail else ""))

    def __reduce__(self):  # picklable across worker processes despite the custom __init__
        return type(self), (self.path, self.reason, self.detail)


def normalization() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel: the Stage1 encoder's (models.stage1), recorded in every manifest."""
    return tuple(float(x) for x in IMAGE_MEAN), tuple(float(x) for x in IMAGE_STD)


def _read_bytes(source: ImageSource) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), "<bytes>"
    else:
        name = str(source)
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise ImageDecodeError(name, "missing") from None
        except IsADirectoryError:
            raise ImageDecodeError(name, "not_an_image", "is a directory") from None
    if not data:
        raise ImageDecodeError(name, "empty", "0 bytes")
    return data, name


def load_gif(path: ImageSource, frame: int = 0) -> Image.Image:
    """Frame `frame` (default the first) of a GIF as an RGB image; PNG/JPEG work too (frame 0).

    `path` may also be the raw file bytes (e.g. a shard's `gif` field).
    """
    if frame < 0:
        raise ValueError(f"frame must be >= 0, got {frame}")
    data, name = _read_bytes(path)
    has_signature = data.startswith(_SIGNATURES)
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(name, "corrupt" if has_signature else "not_an_image", str(e)) from None
    num_frames = getattr(img, "n_frames", 1)
    if frame >= num_frames:
        raise ImageDecodeError(name, "bad_frame", f"frame {frame} requested, the image has {num_frames}")
    try:
        if frame:
            img.seek(frame)
        return img.convert("RGB")  # decodes the pixels: truncated data fails here
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(name, "corrupt", str(e)) from None


Stats = Optional[Sequence[float]]


def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


def resize_rgb(img: Image.Image, image_size: int) -> np.ndarray:
    """RGB image -> uint8 [3, image_size, image_size] (bicubic resize): the pixels before normalisation."""
    _check_size(image_size)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), RESAMPLE, reducing_gap=REDUCING_GAP)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def normalize_coefficients(mean: Stats = None, std: Stats = None) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift), float32 per channel, with normalised = uint8_pixel * scale + shift.

    /255 and the mean/std are folded into one multiply-add, so the same formula gives the same
    float32 values in numpy (`preprocess`) and in torch on the builder's GPU (build_shards' `normalize_pixels`).
    """
    if mean is None or std is None:
        default_mean, default_std = normalization()
        mean = default_mean if mean is None else mean
        std = default_std if std is None else std
    scale = np.asarray([1.0 / (255.0 * s) for s in std], dtype=np.float32)
    shift = np.asarray([-m / s for m, s in zip(mean, std)], dtype=np.float32)
    return scale, shift


def preprocess(img: Image.Image, image_size: int, mean: Stats = None, std: Stats = None) -> np.ndarray:
    """RGB image -> float32 [3, image_size, image_size]: bicubic resize, [0, 1], mean/std.

    `mean`/`std` default to `normalization()` (the Stage1 encoder's); the builder passes the
    manifest's explicitly.
    """
    chw = resize_rgb(img, image_size)
    scale, shift = normalize_coefficients(mean, std)
    return chw.astype(np.float32) * scale[:, None, None] + shift[:, None, None]


def decode_image(path: ImageSource, image_size: int, frame: int = 0, mean: Stats = None,
                 std: Stats = None) -> np.ndarray:
    """load_gif + preprocess; every failure of the image is an ImageDecodeError."""
    return _decoded(path, image_size, frame, lambda img: preprocess(img, image_size, mean, std))


def decode_image_uint8(path: ImageSource, image_size: int, frame: int = 0) -> np.ndarray:
    """load_gif + resize_rgb: uint8 [3, H, W]; `normalize_pixels` of it equals `decode_image`."""
    return _decoded(path, image_size, frame, lambda img: resize_rgb(img, image_size))


def _decoded(path: ImageSource, image_size: int, frame: int, convert) -> np.ndarray:
    _check_size(image_size)  # a bad argument is the caller's error, not the image's
    img = load_gif(path, frame)
    try:
        return convert(img)
    except (OSError, ValueError) as e:
        name = "<bytes>" if isinstance(path, (bytes, bytearray)) else str(path)
        raise ImageDecodeError(name, "corrupt", str(e)) from None
