"""serve/images.py: guarded decoding, and preprocessing equal to the checkpoint's torchvision eval transform."""

from __future__ import annotations

import io
from pathlib import Path

import hostile
import numpy as np
import pytest
from helpers import jpeg, png_bomb
from PIL import Image

from torchferry.distributed.data import load_image
from torchferry.distributed.presets import build_eval_transform
from torchferry.serve.errors import HTTPError as ImageError
from torchferry.serve.images import PixelBudget, decode, prepare, preprocess

SPECS = [
    {"size": [16, 16], "resize": 18, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channels": 3},
    {"size": [224, 224], "resize": 256, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channels": 3},
    {"size": [32, 32], "resize": 32, "mean": [0.5], "std": [0.5], "channels": 1},
    {"size": [28, 20], "resize": 40, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "channels": 3},
]


def _images(tmp: Path) -> dict[str, Path]:
    """Real images of several sizes and modes, written by PIL."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (53, 37, 3), dtype=np.uint8), "RGB")
    made = {
        "rgb.png": rgb,
        "wide-l.png": Image.fromarray(rng.integers(0, 256, (30, 100), dtype=np.uint8), "L"),
        "rgba.png": Image.fromarray(rng.integers(0, 256, (40, 41, 4), dtype=np.uint8), "RGBA"),
        "palette.gif": rgb.convert("P"),
        "tiny.png": rgb.resize((7, 9)),
        "big.jpg": rgb.resize((640, 480)),
        "cmyk.jpg": rgb.convert("CMYK"),
        "la.png": Image.fromarray(rng.integers(0, 256, (20, 25, 2), dtype=np.uint8), "LA"),
    }
    paths = {}
    for name, img in made.items():
        paths[name] = tmp / name
        img.save(paths[name])
    i16 = Image.fromarray(rng.integers(0, 65536, (33, 44), dtype=np.uint16))
    i16.save(tmp / "gray16.png")
    paths["gray16.png"] = tmp / "gray16.png"
    return paths


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s['size'][0]}x{s['size'][1]}-c{s['channels']}")
def test_preprocessing_equals_torchvision_eval_transform(spec: dict, tmp_path: Path) -> None:
    reference = build_eval_transform({**spec, "interpolation": "bilinear"})
    for name, path in _images(tmp_path).items():
        expected = reference(load_image(str(path), spec["channels"])).numpy()
        for got in (preprocess(decode(path.read_bytes(), 10**8, name), spec),
                    prepare(path.read_bytes(), spec, 10**8, name, PixelBudget(10**8))):
            assert got.shape == expected.shape == (spec["channels"], *spec["size"]), name
            assert got.dtype == np.float32
            assert np.abs(got - expected).max() <= 1e-5, name


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "white.png")
    Image.fromarray(np.full((4, 4), 32896, np.uint16)).save(tmp_path / "mid.png")
    spec = {"size": [4, 4], "resize": 4, "mean": [0.0], "std": [1.0], "channels": 1}
    assert preprocess(decode((tmp_path / "white.png").read_bytes(), 100), spec).max() == pytest.approx(1.0)
    assert preprocess(decode((tmp_path / "mid.png").read_bytes(), 100), spec).max() == pytest.approx(128 / 255)
    assert prepare((tmp_path / "mid.png").read_bytes(), spec, 100).max() == pytest.approx(128 / 255)


def test_exif_rotation_and_first_frame() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    assert decode(jpeg(Image.new("RGB", (30, 10)), exif=exif), 10**6).size == (10, 30)
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    first = decode(buf.getvalue(), 10**6).convert("RGB")
    assert first.getpixel((0, 0))[0] > 200


@pytest.mark.parametrize("data,status,code", [
    (b"", 400, "empty_image"),
    (b"\x00\x01garbage" * 50, 400, "not_an_image"),
    (jpeg(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))[:2000], 400,
     "corrupt_image"),
    (png_bomb(), 413, "too_many_pixels"),
    (png_bomb(5000, 5000), 413, "too_many_pixels"),
    (png_bomb(10000, 10000), 413, "too_many_pixels"),  # between Pillow's warning and error limits
    (b"%PDF-1.4 not an image", 400, "not_an_image"),
])
def test_bad_images_are_refused_before_decoding(data: bytes, status: int, code: str) -> None:
    with pytest.raises(ImageError) as info:
        decode(data, max_pixels=1_000_000)
    assert (info.value.status, info.value.code) == (status, code)


def test_format_outside_the_allow_list_is_refused() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "ICO")
    with pytest.raises(ImageError) as info:
        decode(buf.getvalue(), 10**6)
    assert info.value.status == 400 and "accepted: JPEG, PNG" in info.value.message


SPEC_RGB = {"size": [224, 224], "resize": 256, "mean": [0.5] * 3, "std": [0.5] * 3, "channels": 3}


@pytest.mark.parametrize("width,height", [(1_000_000, 1), (1, 1_000_000), (5_000_000, 8), (3, 5_000_000)])
def test_extreme_aspect_ratio_resizes_only_what_the_crop_keeps(width: int, height: int) -> None:
    # The whole resize target of a 1,000,000 × 1 strip is 256,000,000 × 256 pixels: built whole, it is a
    # MemoryError (or gigabytes); only the crop's region is resized, so it answers like any image.
    out = prepare(hostile.png_strip(width, height), SPEC_RGB, 40_000_000)
    assert out.shape == (3, 224, 224) and np.isfinite(out).all()
    assert np.allclose(out, -1.0)  # black, normalised with mean 0.5 and std 0.5


@pytest.mark.parametrize("width,height", [(40_000_000, 1), (1, 40_000_000), (5_000_001, 2)])
def test_a_side_longer_than_the_pixel_cap_over_8_is_refused(width: int, height: int) -> None:
    # Pillow's 8-byte row pointers: 1 × 40,000,000 would hold 320 MB of them besides its 40 MB of pixels.
    with pytest.raises(ImageError) as info:
        prepare(hostile.png_strip(width, height), SPEC_RGB, 40_000_000)
    assert (info.value.status, info.value.code) == (413, "too_many_pixels") and "a side of" in info.value.message


def test_box_resize_matches_the_whole_resize_on_a_wide_image() -> None:
    # Just over FULL_RESIZE_MAX_PIXELS after resizing: the region path, compared with resize-then-crop.
    from torchferry.serve import images

    img = hostile.gray_noise(40_000, 7)
    assert 32 * (40_000 * 32 // 7) > images.FULL_RESIZE_MAX_PIXELS
    whole = images.center_crop(img.resize(images.resized_size(*img.size, 32), Image.Resampling.BILINEAR), 24, 40)
    got = images.resize_and_crop(img, 32, 24, 40)
    assert got.size == whole.size == (40, 24)
    assert np.abs(np.asarray(got, np.int16) - np.asarray(whole, np.int16)).max() <= 1  # one 8-bit step at most


def _count_seeks(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[int]:
    seeks: list[int] = []
    original = cls._seek

    def counted(self, frame, *args, **kwargs):
        seeks.append(frame)
        return original(self, frame, *args, **kwargs)

    monkeypatch.setattr(cls, "_seek", counted)
    return seeks


@pytest.mark.parametrize("kind", ["tiff", "gif"])
def test_only_the_first_frame_is_ever_read(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import GifImagePlugin, TiffImagePlugin

    if kind == "tiff":  # 20,000 pages: counting them (n_frames) walks every IFD, quadratic in Pillow
        data, seeks = hostile.tiff_pages(20_000), _count_seeks(monkeypatch, TiffImagePlugin.TiffImageFile)
    else:
        data, seeks = hostile.gif_frames(100_000), _count_seeks(monkeypatch, GifImagePlugin.GifImageFile)
    assert prepare(data, SPEC_RGB, 10**6).shape == (3, 224, 224)
    assert decode(data, 10**6).size == (1, 1)
    assert len(seeks) <= 4 and max(seeks) == 0


def test_png_with_a_million_empty_chunks_is_refused_before_pillow_walks_them() -> None:
    with pytest.raises(ImageError) as info:
        prepare(hostile.png_many_chunks(1_000_000), SPEC_RGB, 10**6)
    assert (info.value.status, info.value.code) == (400, "too_many_chunks")
    # A real PNG written in many small IDAT chunks (8 KiB, libpng's default) still decodes.
    img = hostile.gray_noise(600, 600)
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=0)
    assert len(buf.getvalue()) // 8192 > 30
    assert prepare(buf.getvalue(), SPEC_RGB, 10**6).shape == (3, 224, 224)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("make", [hostile.tiff_lab, hostile.tiff_premultiplied_gray], ids=["lab", "premultiplied"])
def test_every_mode_pillow_opens_is_answered_or_refused_with_a_4xx(make, channels: int) -> None:
    spec = {"size": [8, 8], "resize": 8, "mean": [0.5] * channels, "std": [0.5] * channels, "channels": channels}
    for run in (lambda d: prepare(d, spec, 10**6), lambda d: preprocess(decode(d, 10**6), spec)):
        try:
            out = run(make())
        except ImageError as exc:
            assert (exc.status, exc.code) == (415, "unsupported_image_mode")
        else:
            assert out.shape == (channels, 8, 8)
    with pytest.raises(ImageError):
        prepare(hostile.tiff_premultiplied_gray(), spec, 10**6)


def test_a_phone_jpeg_with_a_second_frame_is_ajpeg() -> None:
    data = hostile.mpo()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = prepare(data, {"size": [8, 8], "resize": 8, "mean": [0.0] * 3, "std": [1.0] * 3, "channels": 3}, 10**6)
    assert out[0].mean() > 0.6 and out[2].mean() < 0.3  # the first image (red), not the second (blue)


def test_pixel_budget_lets_one_image_at_the_cap_through_and_makes_the_next_wait() -> None:
    budget = PixelBudget(100, timeout_s=0.05)
    budget.acquire(60)
    budget.acquire(40)
    with pytest.raises(ImageError) as info:
        budget.acquire(1)
    assert info.value.status == 503
    budget.release(60)
    budget.release(40)
    budget.acquire(500)  # more than the limit counts as the limit: one image at the cap always fits alone
    budget.release(500)
    assert budget.used == 0


# One image's memory at the pixel cap (40 MP): 8 bytes a pixel at most (4 decoded + 4 for RGB, which Pillow
# keeps in 4 bytes), 305 MiB, and the Python, numpy and Pillow working set; README "Security" states it.
REQUEST_BUDGET_MB = 320
_MEASURE = """
import sys
from torchferry.serve.images import PixelBudget, prepare

def status(key):  # this process's memory (VmRSS) or its peak since the last reset (VmHWM), in bytes
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

data = open(sys.argv[1], "rb").read()
spec = {"size": [224, 224], "resize": 256, "mean": [0.5] * 3, "std": [0.5] * 3, "channels": 3}
prepare(open(sys.argv[2], "rb").read(), spec, 40_000_000)  # warm: imports, Pillow's and numpy's first buffers
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the current RSS
before = status("VmRSS")
prepare(data, spec, 40_000_000, budget=PixelBudget(40_000_000))
print((status("VmHWM") - before) / 2**20)
"""


@pytest.mark.slow
@pytest.mark.parametrize("make", [lambda: hostile.png_strip(5_000_000, 8), lambda: hostile.png_strip(8, 5_000_000),
                                  lambda: hostile.png_gray16(6325, 6324), lambda: hostile.png_rgba(6325, 6324)],
                         ids=["5Mx8", "8x5M", "gray16-40M", "rgba-40M"])
def test_one_image_at_the_pixel_cap_stays_within_the_memory_budget(make, tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "image").write_bytes(make())
    (tmp_path / "small").write_bytes(hostile.save(hostile.gray_noise(300, 200), "PNG"))
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "image"), str(tmp_path / "small")],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip()) <= REQUEST_BUDGET_MB
