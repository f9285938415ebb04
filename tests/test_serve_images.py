"""serve/images.py: guarded decoding, and preprocessing equal to the checkpoint's torchvision eval transform."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import png_bomb
from PIL import Image

from distributed.data import load_image
from distributed.presets import build_eval_transform
from serve.images import ImageError, decode, preprocess

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
        got = preprocess(decode(path.read_bytes(), 10**8, name), spec)
        assert got.shape == expected.shape == (spec["channels"], *spec["size"]), name
        assert got.dtype == np.float32
        assert np.abs(got - expected).max() <= 1e-5, name


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "white.png")
    Image.fromarray(np.full((4, 4), 32896, np.uint16)).save(tmp_path / "mid.png")
    spec = {"size": [4, 4], "resize": 4, "mean": [0.0], "std": [1.0], "channels": 1}
    assert preprocess(decode((tmp_path / "white.png").read_bytes(), 100), spec).max() == pytest.approx(1.0)
    assert preprocess(decode((tmp_path / "mid.png").read_bytes(), 100), spec).max() == pytest.approx(128 / 255)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_exif_rotation_and_first_frame() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    assert decode(_jpeg(Image.new("RGB", (30, 10)), exif=exif), 10**6).size == (10, 30)
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    first = decode(buf.getvalue(), 10**6).convert("RGB")
    assert first.getpixel((0, 0))[0] > 200


@pytest.mark.parametrize("data,status,code", [
    (b"", 400, "empty_image"),
    (b"\x00\x01garbage" * 50, 400, "not_an_image"),
    (_jpeg(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))[:2000], 400,
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
