"""Hostile images and request bodies, built here in a few KB to a few MB each (for the serving tests)."""

from __future__ import annotations

import functools
import gzip
import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png(width: int, height: int, depth: int, colour: int, rows: bytes, before_idat: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + before_idat
            + png_chunk(b"IDAT", zlib.compress(rows, 9)) + png_chunk(b"IEND", b""))


def _zero_rows(width: int, height: int, bytes_per_pixel: int) -> bytes:
    row = b"\x00" * (1 + width * bytes_per_pixel)
    return row * height


@functools.cache
def png_strip(width: int, height: int) -> bytes:
    """An 8-bit gray PNG of width × height, all black: a 1,000,000 × 1 strip is about 1 KB."""
    return _png(width, height, 8, 0, _zero_rows(width, height, 1))


@functools.cache
def png_gray16(width: int, height: int) -> bytes:
    """A 16-bit gray PNG, mid-gray: 40 M pixels in about 80 KB."""
    row = b"\x00" + b"\x80\x80" * width
    return _png(width, height, 16, 0, row * height)


@functools.cache
def png_rgba(width: int, height: int) -> bytes:
    """An 8-bit RGBA PNG, transparent black: the most bytes a decoded pixel takes."""
    return _png(width, height, 8, 6, _zero_rows(width, height, 4))


@functools.cache
def png_many_chunks(count: int) -> bytes:
    """A 2 × 2 PNG with `count` empty private chunks before its pixels (12 bytes each)."""
    return _png(2, 2, 8, 0, _zero_rows(2, 2, 1), before_idat=png_chunk(b"zzZz", b"") * count)


@functools.cache
def tiff_pages(pages: int, width: int = 1, height: int = 1) -> bytes:
    """A little-endian TIFF of `pages` gray pages, each IFD pointing at the next (about 110 bytes a page),
    claiming width × height with one byte of pixel data (1 × 1 is whole; larger is a header bomb)."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 3, 1, 1), (279, 4, 1, 1)]
    ifd_size = 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 9) + b"\x7f")  # header, first IFD at 9, one pixel at 8
    for page in range(pages):
        offset = 9 + page * ifd_size
        nxt = offset + ifd_size if page + 1 < pages else 0
        out += struct.pack("<H", len(entries))
        for tag, kind, count, value in entries:
            out += struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3
                                                             else struct.pack("<I", value))
        out += struct.pack("<I", nxt)
    return bytes(out)


@functools.cache
def gif_frames(frames: int) -> bytes:
    """A 1 × 1 GIF with `frames` frames (about 20 bytes each)."""
    head = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    frame = (b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 1/100 s
             + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00")
    return head + loop + frame * frames + b"\x3b"


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def tiff_lab() -> bytes:
    """A CIELab TIFF (Pillow opens it as mode LAB)."""
    return save(Image.new("LAB", (8, 8), (50, 10, 10)), "TIFF")


def tiff_premultiplied_gray() -> bytes:
    """A gray TIFF whose extra sample is associated (premultiplied) alpha: Pillow's mode La."""
    data = bytearray(save(Image.new("LA", (8, 8), (100, 200)), "TIFF"))
    # ExtraSamples (tag 338, SHORT, count 1): 2 = unassociated alpha → 1 = associated alpha.
    tag = struct.pack("<HHI", 338, 3, 1) + struct.pack("<H", 2)
    at = data.find(tag)
    assert at > 0, "ExtraSamples tag not found"
    data[at + 8:at + 10] = struct.pack("<H", 1)
    return bytes(data)


def mpo() -> bytes:
    """A JPEG with a second image after it (Multi-Picture Format), as phones write."""
    first, second = Image.new("RGB", (16, 12), (200, 30, 30)), Image.new("RGB", (16, 12), (30, 30, 200))
    return save(first, "MPO", save_all=True, append_images=[second])


def gray_noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8), "L")


def gzip_members(*parts: bytes) -> bytes:
    """A multi-member gzip stream: each part compressed on its own, the members concatenated (RFC 1952)."""
    return b"".join(gzip.compress(p) for p in parts)


def tiny_model(path, classes: int = 3, channels: int = 3, size: int = 32, graph_classes: int | None = None,
               graph_channels: int | None = None, graph_size: int | None = None, golden: dict | None = None,
               sidecar: bool = False, meta: dict | None = None, **fields) -> str:
    """A self-describing classifier ONNX file in the export's format, built with onnx.helper (no torch):
    GlobalAveragePool → Flatten → Gemm, with golden logits computed by ONNX Runtime. The graph_* arguments
    give the graph other sizes than its metadata says; `golden` updates the golden record, `meta` and
    `fields` replace metadata fields."""
    import hashlib
    import json

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from torchferry.serve.predictor import golden_inputs

    k = graph_classes or classes
    c, s = graph_channels or channels, graph_size or size
    rng = np.random.default_rng(7)
    weight = numpy_helper.from_array(rng.normal(size=(c, k)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.normal(size=(k,)).astype(np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, s, s])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    shape = [2, channels, size, size]
    record = {"seed": 20261126, "range": [-2.0, 2.0], "shape": shape, "source": "onnxruntime", "atol": 1e-4}
    if c == channels and s == size:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = golden_inputs(shape, record["seed"], *record["range"])
        record["logits"] = session.run(None, {"input": x})[0].tolist()
    else:
        record["logits"] = np.zeros((2, classes), np.float32).tolist()
    record.update(golden or {})
    values = {"classes": [f"c{i}" for i in range(classes)],
              "preprocess": {"size": [size, size], "resize": size, "mean": [0.5] * channels, "std": [0.25] * channels,
                             "channels": channels},
              "arch": "tiny", "golden": record, **fields, **(meta or {})}
    for key, value in values.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value if isinstance(value, str) else json.dumps(value)
    data = model.SerializeToString()
    with open(path, "wb") as f:
        f.write(data)
    if sidecar:
        with open(f"{path}.sha256", "w") as f:
            f.write(hashlib.sha256(data).hexdigest() + "  model.onnx\n")
    return str(path)
