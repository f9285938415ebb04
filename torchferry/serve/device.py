"""Where ONNX Runtime runs the model: the CPU (the default), a CUDA GPU, or TensorRT on it (TORCHFERRY_DEVICE).

A GPU is opt-in and never a guess. `check_available` refuses, before anything loads, a device whose execution
provider this onnxruntime lacks (the CPU wheel `onnxruntime` has no CUDA; `onnxruntime-gpu` has CUDA and
TensorRT, the latter only where TensorRT's libraries are installed). `check_session` refuses a session that did
not get the provider it was asked for: ONNX Runtime's Python API, when a GPU provider fails to initialise (no
visible GPU, a missing CUDA or cuDNN library), warns and builds the session on the CPU instead, and a server
asked to serve on a GPU must not quietly answer from the CPU. Both raise `DeviceRefused`, which stops the
server with one line (serve/settings.py, serve/app.py).

The golden proof runs on the device that serves (serve/predictor.py), held to the contract's GPU bound
(`torchferry.contract.GOLDEN_GPU_ATOL`, `GOLDEN_GPU_RTOL`, where the reasons are written) instead of the CPU's.
Light on purpose: onnxruntime is imported only by the functions that ask it.
"""

from __future__ import annotations

import functools
from typing import Any

from torchferry.contract import GOLDEN_GPU_ATOL, GOLDEN_GPU_RTOL, TorchferryError

DEVICES = ("cpu", "cuda", "tensorrt")
# The provider that must run the model on each device; the rest of a device's list takes what that one cannot
# (TensorRT leaves unsupported nodes to CUDA, CUDA leaves a few shape computations to the CPU).
PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
NEEDED = {"cpu": ("CPUExecutionProvider",), "cuda": ("CUDAExecutionProvider",),
          "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider")}
# Micro-batching's window on a GPU unless TORCHFERRY_BATCH_WINDOW_MS says otherwise: a GPU answers a batch of 32
# in little more than the time of one image, so waiting up to 2 ms (about one resnet50 call at batch 1) to
# gather concurrent requests pays there; on the CPU a batch costs what its images cost, so it stays off.
GPU_BATCH_WINDOW_MS = 2.0
# Under gunicorn with a GPU device: a file that only the first worker whose device refuses creates
# (torchferry/serve/gunicorn.conf.py names it, serve/app.py's gunicorn_app creates it).
REFUSAL_MARK_ENV = "TORCHFERRY_REFUSAL_MARK"


class DeviceRefused(TorchferryError):
    """The device asked for cannot run the model here: its provider is missing or the session did not get it."""


def is_gpu(device: str) -> bool:
    """True for the devices that run on a GPU."""
    return device != "cpu"


def default_batch_window_ms(device: str) -> float:
    """Micro-batching's window when the operator set none: on on a GPU, off on the CPU."""
    return GPU_BATCH_WINDOW_MS if is_gpu(device) else 0.0


def golden_bound(device: str) -> tuple[float, float] | None:
    """The (atol, rtol) the golden proof is held to on `device`, or None for the contract's CPU rule (the
    reader's bound, or the file's where stricter)."""
    return (GOLDEN_GPU_ATOL, GOLDEN_GPU_RTOL) if is_gpu(device) else None


def providers(device: str, device_id: int = 0) -> list[Any]:
    """ONNX Runtime's `providers` argument for `device`: (name, options) pairs, the one that must run first."""
    if device not in DEVICES:
        raise DeviceRefused(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    cuda = ("CUDAExecutionProvider", {"device_id": str(device_id),
                                      # cuDNN's fastest convolution for each shape, searched once per shape.
                                      "cudnn_conv_algo_search": "EXHAUSTIVE"})
    if device == "cuda":
        return [cuda, "CPUExecutionProvider"]
    if device == "tensorrt":
        # fp32 engines (TensorRT may still use TF32 on Ampere and later: hence the GPU bound); no fp16 unless
        # the model was exported so.
        return [("TensorrtExecutionProvider", {"device_id": str(device_id), "trt_fp16_enable": "False"}), cuda,
                "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def check_available(device: str, available: list[str] | None = None) -> None:
    """DeviceRefused when this onnxruntime lacks a provider `device` needs (`available`: the providers it has,
    onnxruntime.get_available_providers() by default)."""
    if device not in DEVICES:
        raise DeviceRefused(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if not is_gpu(device):
        return
    import onnxruntime as ort

    have = ort.get_available_providers() if available is None else list(available)
    missing = [name for name in NEEDED[device] if name not in have]
    if missing:
        package = "onnxruntime-gpu with TensorRT's libraries" if device == "tensorrt" else "onnxruntime-gpu"
        raise DeviceRefused(
            f"TORCHFERRY_DEVICE={device} needs ONNX Runtime's {missing[0]}, which this onnxruntime "
            f"{ort.__version__} does not have (it has {', '.join(have)}); install {package} (the serve-gpu "
            "image) or serve with TORCHFERRY_DEVICE=cpu")


@functools.cache
def load_gpu_libraries() -> None:
    """ONNX Runtime's own loading of the CUDA and cuDNN libraries installed as NVIDIA's wheels (the serve-gpu
    image has them there, not on the loader's path), once per process; before the first GPU session."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21; a CPU build returns at once
        ort.preload_dlls()


def check_session(session: Any, device: str) -> list[str]:
    """The session's providers, or DeviceRefused when the one `device` needs is not among them (ONNX Runtime
    fell back to the CPU)."""
    got = list(session.get_providers())
    want = PROVIDER[device]
    if want not in got:
        raise DeviceRefused(
            f"ONNX Runtime did not start {want} for TORCHFERRY_DEVICE={device} (the session got "
            f"{', '.join(got) or 'no provider'}): refused rather than serve on the CPU; its warnings above say why "
            "(no visible GPU, a missing CUDA, cuDNN or TensorRT library)")
    return got
