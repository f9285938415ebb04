"""Untrusted image bytes → the model's input, in PIL and numpy (no torch).

Decoding is guarded: an allow-list of formats, the header's width × height checked against our pixel cap
before any pixel is decoded, decompression-bomb warnings raised as errors, truncated files refused, only the
first frame ever read (never `n_frames`, which walks every page of a TIFF or GIF), a PNG's chunk count
bounded before Pillow walks it. The preprocessing re-implements the checkpoint's eval transform
(torchvision's Resize(int, bilinear) on a PIL image, CenterCrop, PILToTensor, ToDtype(scale=True),
Normalize) step for step; a test holds the two equal.

Memory is bounded by the pixel cap at every step (README "Security" states the budget). The decoded image
costs at most 4 bytes a pixel (RGBA, CMYK, 32-bit; Pillow keeps RGB in 4 bytes too), its conversion to L
or RGB at most 4 more, and nothing later is larger: the resize never builds an image bigger than the
decoded one or `FULL_RESIZE_MAX_PIXELS` (an extreme aspect ratio resizes only the region the center crop
keeps), 16-bit gray is scaled in strips of integers, gray stays gray until after the crop, and a side is
at most max_pixels / 8 (Pillow's row pointers). So one image at `max_pixels` holds at most 8 bytes ×
max_pixels (305 MiB at the default 40 MP), and `PixelBudget` lets a process decode at most `max_pixels`
pixels at a time, whatever its thread count.
"""

from __future__ import annotations

import io
import struct
import threading
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from torchferry.contract import SIXTEEN_BIT_MODES, eight_bit
from torchferry.serve.errors import HTTPError
from torchferry.serve.settings import ROW_COST_PIXELS

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# A JPEG with a second image after it (phones: depth maps, previews) is opened by Pillow as MPO: a JPEG.
OPENED_FORMATS = (*ALLOWED_FORMATS, "MPO")
# Pillow keeps an 8-byte pointer per row, so a 1 × 40,000,000 image costs 320 MB besides its pixels: a
# side may be at most max_pixels / ROW_COST_PIXELS (8; an EXIF rotation can turn a wide image into a tall one).
# Above this many pixels the resize target is not built whole: only the center crop's region is resized.
FULL_RESIZE_MAX_PIXELS = 1 << 22
# A PNG may hold this many chunks, plus one per 512 bytes of file (real encoders write IDAT of 8 KiB and
# more); Pillow walks chunks in Python, so a file of a million empty chunks is refused before it does.
PNG_BASE_CHUNKS, PNG_BYTES_PER_CHUNK = 1024, 512
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Rows per strip when 16-bit gray is scaled to 8 bits: a few MB of int32 at a time, not a float64 copy.
STRIP_PIXELS = 1 << 20


class PixelBudget:
    """At most `limit` pixels decoded at once in this process: a thread waits for its turn, up to `timeout_s`.

    One image of up to `limit` pixels always fits alone, so a worker's decoding memory is that of one image
    at the cap, whatever the number of threads; small images share the budget without waiting.
    """

    def __init__(self, limit: int, timeout_s: float = 60.0):
        self.limit, self.timeout_s, self.used = int(limit), timeout_s, 0
        self._cond = threading.Condition()

    def acquire(self, pixels: int) -> None:
        """Reserve `pixels` (at most the limit); HTTPError 503 when the process stays busy past the timeout."""
        pixels = min(int(pixels), self.limit)
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + pixels <= self.limit, timeout=self.timeout_s):
                raise HTTPError(503, "busy", "the server is decoding other large images; retry shortly")
            self.used += pixels

    def release(self, pixels: int) -> None:
        """Give back what `acquire` reserved."""
        with self._cond:
            self.used -= min(int(pixels), self.limit)
            self._cond.notify_all()


def check_png_chunks(data: bytes, name: str) -> None:
    """Refuse a PNG with more chunks than its size explains, walking only the chunk headers, at most the limit."""
    limit = PNG_BASE_CHUNKS + len(data) // PNG_BYTES_PER_CHUNK
    pos, count, end = len(PNG_SIGNATURE), 0, len(data)
    while pos + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        count += 1
        if count > limit:
            raise HTTPError(400, "too_many_chunks", f"{name}: a PNG of {len(data)} bytes with more than {limit} "
                             "chunks is refused")
        if kind == b"IEND":
            return
        pos += 12 + length


def _open(data: bytes, max_pixels: int, name: str) -> Image.Image:
    """Open untrusted bytes, header only: allow-listed format, pixel cap from the header; no pixel decoded yet."""
    if not data:
        raise HTTPError(400, "empty_image", f"{name}: empty body")
    if data.startswith(PNG_SIGNATURE):
        check_png_chunks(data, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            raise HTTPError(400, "not_an_image", f"{name}: not a recognised image (accepted: "
                             f"{', '.join(ALLOWED_FORMATS)})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise HTTPError(413, "too_many_pixels", f"{name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any failure to parse a header is the client's bad image
            raise HTTPError(400, "not_an_image", f"{name}: cannot read image header ({type(exc).__name__})") from None
    if img.format not in OPENED_FORMATS:
        raise HTTPError(415, "unsupported_image_format",
                         f"{name}: {img.format} images are not accepted; send one of {', '.join(ALLOWED_FORMATS)}")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise HTTPError(400, "not_an_image", f"{name}: image has no pixels")
    if width * height > max_pixels:
        raise HTTPError(413, "too_many_pixels",
                         f"{name}: {width}×{height} = {width * height} pixels is over the limit of {max_pixels}")
    longest = max_pixels // ROW_COST_PIXELS
    if max(width, height) > longest:
        raise HTTPError(413, "too_many_pixels", f"{name}: a side of {max(width, height)} pixels is over the "
                         f"limit of {longest} (the pixel limit / {ROW_COST_PIXELS})")
    return img


def _load(img: Image.Image, name: str) -> Image.Image:
    """Decode the frame Image.open positioned on, the first; other frames are never read (nor counted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise HTTPError(413, "too_many_pixels", f"{name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
            raise HTTPError(400, "corrupt_image", f"{name}: cannot decode image ({exc})") from None
    return img


def _guarded(step: str, name: str, fn, *args):
    """Run a conversion step on a decoded image; anything Pillow cannot do with it is the client's 4xx."""
    try:
        return fn(*args)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a CIELab or premultiplied-alpha TIFF Pillow cannot convert
        raise HTTPError(415, "unsupported_image_mode",
                         f"{name}: cannot {step} this image ({type(exc).__name__}: {exc}); send 8-bit or 16-bit "
                         "gray, RGB, RGBA, palette or CMYK") from None


def decode(data: bytes, max_pixels: int, name: str = "image") -> Image.Image:
    """Open untrusted bytes as an image: allow-listed format, pixel cap from the header, EXIF applied, frame 0."""
    img = _load(_open(data, max_pixels, name), name)
    return _guarded("orient", name, ImageOps.exif_transpose, img)


def _sixteen_to_eight(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) gray → 8-bit L by the contract's rule (`eight_bit`), in strips (no float64 copy)."""
    width, height = img.size
    out = np.empty((height, width), dtype=np.uint8)
    step = max(1, STRIP_PIXELS // max(width, 1))
    for top in range(0, height, step):
        strip = eight_bit(np.asarray(img.crop((0, top, width, min(height, top + step)))))
        out[top:top + strip.shape[0]] = strip
    return Image.fromarray(out, mode="L")


def to_model_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode → L or RGB, as training saw it; 16-bit gray is scaled to 8 bits, not clipped."""
    if img.mode in SIXTEEN_BIT_MODES:
        img = _sixteen_to_eight(img)
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
    top, left = round((h - height) / 2.0), round((w - width) / 2.0)
    return img.crop((left, top, left + width, top + height))


def _kept(resized: int, crop: int) -> tuple[int, int]:
    """[start, stop) of the resized axis that the center crop keeps (all of it when the crop pads)."""
    if crop > resized:
        return 0, resized
    start = round((resized - crop) / 2.0)
    return start, start + crop


def resize_and_crop(img: Image.Image, resize: int, height: int, width: int) -> Image.Image:
    """Resize the shorter side to `resize` (bilinear), then center-crop `height` × `width`, as torchvision does.

    When the resized image would hold more than FULL_RESIZE_MAX_PIXELS (a 1,000,000 × 1 strip asks for
    32,000,000 × 32), only the source region under the crop is resized (PIL's `box`), so the work and memory
    are those of the crop. Same sampling grid; values may differ from the whole resize by one 8-bit step
    from rounding, only on such images.
    """
    new_w, new_h = resized_size(img.width, img.height, resize)
    if (new_w, new_h) == img.size:
        return center_crop(img, height, width)
    if new_w * new_h <= FULL_RESIZE_MAX_PIXELS:
        return center_crop(img.resize((new_w, new_h), resample=Image.Resampling.BILINEAR), height, width)
    (x0, x1), (y0, y1) = _kept(new_w, width), _kept(new_h, height)
    sx, sy = img.width / new_w, img.height / new_h
    region = img.resize((x1 - x0, y1 - y0), resample=Image.Resampling.BILINEAR,
                        box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    return center_crop(region, height, width)  # pads when the crop is larger than the resized image


def normalise(img: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """An L or RGB image of the model's size → float32 [C, H, W], scaled to [0, 1] and normalised."""
    arr = np.asarray(img, dtype=np.float32)
    arr = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    arr = arr / np.float32(255.0)
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)


def preprocess(img: Image.Image, spec: dict[str, Any], name: str = "image") -> np.ndarray:
    """A decoded image → float32 [C, H, W], normalised: the checkpoint's eval transform in numpy/PIL."""
    img = _guarded("convert", name, to_model_mode, img, int(spec["channels"]))
    out_h, out_w = (int(v) for v in spec["size"])
    return normalise(resize_and_crop(img, int(spec["resize"]), out_h, out_w), spec)


def orientation(img: Image.Image) -> int:
    """The EXIF (or XMP) orientation, 1 to 8, as ImageOps.exif_transpose reads it; 1 when absent or odd."""
    value = img.getexif().get(0x0112, 1)
    return value if isinstance(value, int) and value in TRANSPOSE else 1


TRANSPOSE = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
             7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def prepare(data: bytes, spec: dict[str, Any], max_pixels: int, name: str = "image",
            budget: PixelBudget | None = None) -> np.ndarray:
    """Untrusted bytes → the model's float32 [C, H, W]: decode frame 0, convert, orient, resize, crop, normalise.

    Equal to `preprocess(decode(...))` with less memory: the decoded image is dropped once converted, and the
    orientation (a permutation of pixels) is applied to the converted, smaller image. With a `budget`, the
    image's pixels are reserved after its header is read and before any pixel is decoded.
    """
    channels, (out_h, out_w) = int(spec["channels"]), (int(v) for v in spec["size"])
    img = _open(data, max_pixels, name)
    pixels = img.width * img.height
    if budget is not None:
        budget.acquire(pixels)
    try:
        img = _load(img, name)
        turn = TRANSPOSE[_guarded("read the orientation of", name, orientation, img)]
        # Each step rebinds `img`, so the larger image before it is freed at once.
        if img.mode in SIXTEEN_BIT_MODES:
            img = _guarded("convert", name, _sixteen_to_eight, img)
        # Gray for an RGB model stays gray until after the crop: resizing three equal bands gives three equal
        # bands, so the result is the same, on a third of the memory.
        gray = img.mode == "L"
        if not gray or channels == 1:
            img = _guarded("convert", name, img.convert, "L" if channels == 1 else "RGB")
        if turn is not None:
            img = img.transpose(turn)
        img = resize_and_crop(img, int(spec["resize"]), out_h, out_w)
        return normalise(img.convert("RGB") if channels == 3 and gray else img, spec)
    finally:
        if budget is not None:
            budget.release(pixels)
