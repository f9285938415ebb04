"""Untrusted image bytes → the model's input, in PIL and numpy (no torch).

Decoding is guarded: an allow-list of formats, the header's width × height checked against our pixel cap
before any pixel is decoded, decompression-bomb warnings raised as errors, truncated files refused. The
preprocessing re-implements the checkpoint's eval transform (torchvision's Resize(int, bilinear) on a PIL
image, CenterCrop, PILToTensor, ToDtype(scale=True), Normalize) step for step; a test holds the two equal.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(Exception):
    """A client's image that cannot be used; carries the HTTP status and an error code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def decode(data: bytes, max_pixels: int, name: str = "image") -> Image.Image:
    """Open untrusted bytes as an image: allow-listed format, pixel cap from the header, EXIF applied, frame 0."""
    if not data:
        raise ImageError(400, "empty_image", f"{name}: empty body")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            raise ImageError(400, "not_an_image", f"{name}: not a recognised image (accepted: "
                             f"{', '.join(ALLOWED_FORMATS)})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(413, "too_many_pixels", f"{name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any failure to parse a header is the client's bad image
            raise ImageError(400, "not_an_image", f"{name}: cannot read image header ({type(exc).__name__})") from None
        if img.format not in ALLOWED_FORMATS:
            raise ImageError(415, "unsupported_image_format",
                             f"{name}: {img.format} images are not accepted; send one of {', '.join(ALLOWED_FORMATS)}")
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageError(400, "not_an_image", f"{name}: image has no pixels")
        if width * height > max_pixels:
            raise ImageError(413, "too_many_pixels",
                             f"{name}: {width}×{height} = {width * height} pixels is over the limit of {max_pixels}")
        try:
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # an animated image: its first frame
            img.load()
            img = ImageOps.exif_transpose(img)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageError(413, "too_many_pixels", f"{name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
            raise ImageError(400, "corrupt_image", f"{name}: cannot decode image ({exc})") from None
    return img


def to_model_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode → L or RGB, as training saw it; 16-bit gray is scaled to 8 bits, not clipped."""
    if img.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), mode="L")
    return img.convert("L" if channels == 1 else "RGB")


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) after resizing the shorter side to `size`, exactly as torchvision computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision's center crop of a PIL image, zero padding when the image is smaller."""
    w, h = img.size
    if height > h or width > w:
        pad_left, pad_top = (width - w) // 2 if width > w else 0, (height - h) // 2 if height > h else 0
        canvas = Image.new(img.mode, (max(w, width), max(h, height)), 0)
        canvas.paste(img, (pad_left, pad_top))
        img = canvas
        w, h = img.size
        if (w, h) == (width, height):
            return img
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return img.crop((left, top, left + width, top + height))


def preprocess(img: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """A decoded image → float32 [C, H, W], normalised: the checkpoint's eval transform in numpy/PIL."""
    channels = int(spec["channels"])
    img = to_model_mode(img, channels)
    new = resized_size(img.width, img.height, int(spec["resize"]))
    if new != img.size:
        img = img.resize(new, resample=Image.Resampling.BILINEAR)
    out_h, out_w = (int(v) for v in spec["size"])
    img = center_crop(img, out_h, out_w)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    arr = arr / np.float32(255.0)
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)
