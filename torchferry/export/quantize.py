"""INT8 variants with onnxruntime's quantization tools, and the accuracy they keep.

Static QDQ quantization (per-channel INT8 weights, UINT8 activations) calibrated on real training images
through the checkpoint's eval transform; dynamic quantization only where no data is reachable. The INT8
model is written beside the fp32 one with its measured top-1 accuracy: the user decides, the tool never
swaps it in.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from torchferry import contract
from torchferry.contract import INPUT_NAME
from torchferry.distributed import TorchferryError
from torchferry.export import metadata as meta
from torchferry.export.verify import ort_session

_logger = logging.getLogger(__name__)

CALIBRATION_IMAGES = 128


class _ImageReader(CalibrationDataReader):
    """Feeds calibration batches to onnxruntime's calibrator."""

    def __init__(self, batches: list[np.ndarray]):
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def _stack(dataset: Any, limit: int, batch: int = 32) -> tuple[list[np.ndarray], np.ndarray]:
    images, labels = [], []
    for i in range(min(len(dataset), limit)):
        x, y = dataset[i]
        images.append(x.numpy())
        labels.append(int(y))
    arr = np.stack(images).astype(np.float32)
    return [arr[i:i + batch] for i in range(0, len(arr), batch)], np.asarray(labels)


def top1(path: str, batches: list[np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX model on prepared batches."""
    session = ort_session(path)
    preds = np.concatenate([session.run(None, {INPUT_NAME: b})[0].argmax(1) for b in batches])
    return float(np.mean(preds == labels))


def quantize_static_qdq(fp32_path: str, out_path: str, calibration: list[np.ndarray]) -> None:
    """Static QDQ INT8: per-channel INT8 weights, UINT8 activations calibrated on `calibration` batches."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, out_path, _ImageReader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def quantize_int8(fp32_path: str, out_path: str, checkpoint: dict[str, Any], *, data: str | None = None,
                  max_images: int = 512) -> dict[str, Any]:
    """Write an INT8 model and return how it was made and its top-1 accuracy next to the fp32 model's."""
    from torchferry.distributed.data import checkpoint_datasets

    try:
        # Calibration uses training images through the eval transform: what the server will feed the model.
        rebuilt = checkpoint_datasets(checkpoint, data)
    except (TorchferryError, OSError, RuntimeError) as exc:
        _logger.warning("no training images reachable (%s): dynamic INT8 quantization, accuracy not measured", exc)
        quantize_dynamic(fp32_path, out_path, weight_type=QuantType.QInt8)
        _copy_metadata(fp32_path, out_path, "dynamic")
        return {"path": out_path, "method": "dynamic", "note": "accuracy not measured: no data reachable"}
    calibration, _ = _stack(rebuilt.train, CALIBRATION_IMAGES)
    quantize_static_qdq(fp32_path, out_path, calibration)
    _copy_metadata(fp32_path, out_path, "static")
    val_batches, labels = _stack(rebuilt.val, max_images)
    fp32, int8 = top1(fp32_path, val_batches, labels), top1(out_path, val_batches, labels)
    _logger.info("int8 (static, %d calibration images): top-1 %.4f vs fp32 %.4f on %d validation images",
                 sum(len(b) for b in calibration), int8, fp32, len(labels))
    return {"path": out_path, "method": "static", "calibration_images": sum(len(b) for b in calibration),
            "validation_images": len(labels), "fp32_top1": fp32, "int8_top1": int8,
            "top1_delta_pp": round(100 * (int8 - fp32), 3)}


def _copy_metadata(src: str, dst: str, method: str) -> None:
    """Give the INT8 file the fp32 model's metadata, with golden logits recomputed by the INT8 model itself."""
    source, target = onnx.load(src), onnx.load(dst)
    values = meta.read_metadata(source)
    golden = values["golden"]
    x, _, _, _ = contract.read_golden(golden, golden["shape"][1:], len(values["classes"]))
    logits = ort_session(dst).run(None, {INPUT_NAME: x})[0]
    # The INT8 golden logits come from ONNX Runtime itself; another CPU's integer kernels may round differently,
    # so they are held to the server's own bound rather than the fp32 export's.
    values["golden"] = contract.golden_record(logits, golden["shape"], f"onnxruntime-int8-{method}",
                                              contract.GOLDEN_ATOL, contract.GOLDEN_RTOL)
    values["quantization"] = f"int8-{method}"
    meta.set_metadata(target, values)
    onnx.save(target, dst)
