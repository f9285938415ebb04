"""Serving on a GPU (serve/device.py): the choice of ONNX Runtime's providers, and every refusal, with the real
onnxruntime of this machine.

Where this onnxruntime is the CPU build (CI), asking it for CUDA shows both refusals for real: the provider is
missing from `get_available_providers()`, and a session asked for it anyway is built on the CPU with a warning
(ONNX Runtime's own fallback), which the predictor refuses. Those tests skip where CUDA is present, and the
`gpu` test at the end serves and proves a model on it instead. A made-up provider list is used only where this
machine's onnxruntime cannot show the case (a CUDA build without TensorRT's libraries): said at each.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from torchferry.contract import GOLDEN_GPU_ATOL, GOLDEN_GPU_RTOL, golden_inputs, read_golden, tolerance_ratio
from torchferry.serve.app import create_app
from torchferry.serve.device import (
    GPU_BATCH_WINDOW_MS,
    DeviceRefused,
    check_available,
    check_session,
    golden_bound,
    providers,
)
from torchferry.serve.predictor import Predictor
from torchferry.serve.settings import ServeSettings, exit_on_bad_settings

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
cpu_build_only = pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA: the refusal cannot be shown")


def test_device_setting_takes_three_values_and_refuses_others_in_one_line(capsys: pytest.CaptureFixture) -> None:
    assert ServeSettings.load().device == "cpu" and ServeSettings.load({"DEVICE": "CUDA"}).device == "cuda"
    assert ServeSettings.load(environ={"TORCHFERRY_DEVICE": "tensorrt", "TORCHFERRY_DEVICE_ID": "1"}).device_id == 1
    with pytest.raises(ValueError, match="TORCHFERRY_DEVICE='gpu' is not one of cpu, cuda, tensorrt"):
        ServeSettings.load(environ={"TORCHFERRY_DEVICE": "gpu"})
    with pytest.raises(ValueError, match="TORCHFERRY_DEVICE_ID=-1 cannot work"):
        ServeSettings.load(environ={"TORCHFERRY_DEVICE_ID": "-1"})
    with pytest.raises(SystemExit) as stop:
        exit_on_bad_settings({"TORCHFERRY_DEVICE": "gpu"})
    assert stop.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_each_device_asks_onnxruntime_for_its_providers_in_order() -> None:
    assert providers("cpu") == ["CPUExecutionProvider"]
    cuda = providers("cuda", 3)
    assert cuda[0][0] == "CUDAExecutionProvider" and cuda[0][1]["device_id"] == "3"
    assert cuda[1:] == ["CPUExecutionProvider"]
    trt = providers("tensorrt", 1)
    assert [p if isinstance(p, str) else p[0] for p in trt] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert trt[0][1] == {"device_id": "1", "trt_fp16_enable": "False"} and trt[1][1]["device_id"] == "1"
    with pytest.raises(DeviceRefused, match="unknown device 'gpu'"):
        providers("gpu")


def test_micro_batching_is_on_by_default_on_a_gpu_and_the_operator_setting_wins() -> None:
    assert ServeSettings.load().batch_window() == 0.0
    assert ServeSettings.load({"DEVICE": "cuda"}).batch_window() == GPU_BATCH_WINDOW_MS > 0
    assert ServeSettings.load({"DEVICE": "tensorrt"}).batch_window() == GPU_BATCH_WINDOW_MS
    assert ServeSettings.load({"DEVICE": "cuda", "BATCH_WINDOW_MS": 0}).batch_window() == 0.0
    assert ServeSettings.load(environ={"TORCHFERRY_DEVICE": "cuda", "TORCHFERRY_BATCH_WINDOW_MS": "0"}).batch_window() == 0
    assert ServeSettings.load({"BATCH_WINDOW_MS": 5}).batch_window() == 5.0


@cpu_build_only
def test_a_gpu_missing_from_onnxruntime_is_refused_before_anything_loads(capsys: pytest.CaptureFixture) -> None:
    for device in ("cuda", "tensorrt"):
        with pytest.raises(DeviceRefused, match=r"needs ONNX Runtime's \w+ExecutionProvider, which this onnxruntime"):
            check_available(device)
    check_available("cpu")
    with pytest.raises(SystemExit) as stop:  # gunicorn's master, before any worker starts
        exit_on_bad_settings({"TORCHFERRY_DEVICE": "cuda"})
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "install onnxruntime-gpu" in err, err


def test_tensorrt_needs_its_own_provider_not_only_cuda() -> None:
    # A made-up list: this machine's onnxruntime cannot show a CUDA build without TensorRT's libraries.
    with pytest.raises(DeviceRefused, match="TensorrtExecutionProvider"):
        check_available("tensorrt", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    check_available("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    check_available("tensorrt", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])


@cpu_build_only
@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_a_session_that_fell_back_to_the_cpu_is_refused(exported_model: dict, device: str) -> None:
    model = str(exported_model["model"])
    # ONNX Runtime itself, asked for the provider it lacks, builds the session on the CPU and only warns:
    with pytest.warns(UserWarning, match="not in available provider names"):
        session = ort.InferenceSession(model, providers=providers(device))
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(DeviceRefused, match="refused rather than serve on the CPU"):
        check_session(session, device)
    with pytest.raises(DeviceRefused, match=f"did not start .*TORCHFERRY_DEVICE={device}"):
        Predictor(model, device=device)


def test_the_cpu_session_says_which_provider_runs_it(exported_model: dict) -> None:
    predictor = Predictor(str(exported_model["model"]))
    assert predictor.providers == ["CPUExecutionProvider"] and predictor.device == "cpu"
    client = create_app({"MODEL": str(exported_model["model"]), "LOAD_SYNC": True}).test_client()
    assert client.get("/healthz").json == {"status": "ok", "device": "cpu", "providers": ["CPUExecutionProvider"]}
    ready = client.get("/readyz").json
    assert ready["device"] == "cpu" and ready["providers"] == ["CPUExecutionProvider"]
    assert client.get("/metadata").json["proof"]["providers"] == ["CPUExecutionProvider"]


@cpu_build_only
def test_a_gunicorn_worker_whose_gpu_session_fell_back_ends_with_one_line(
        exported_model: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHFERRY_MODEL", str(exported_model["model"]))
    monkeypatch.setenv("TORCHFERRY_DEVICE", "cuda")
    with pytest.raises(DeviceRefused, match="did not start CUDAExecutionProvider"):
        create_app({"LOAD_FIRST": True})
    # The worker's app factory, in a process of its own (it ends the process with os._exit):
    proc = subprocess.run([sys.executable, "-c", "from torchferry.serve.app import gunicorn_app; gunicorn_app()"],
                          cwd=REPO, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3  # gunicorn's WORKER_BOOT_ERROR: the master stops instead of starting another
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "did not start CUDAExecutionProvider" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@cpu_build_only
def test_the_servers_refuse_a_gpu_this_onnxruntime_lacks_in_one_line(exported_model: dict, tmp_path: Path) -> None:
    dev = subprocess.run([sys.executable, "-m", "serve", "--model", str(exported_model["model"]), "--device", "cuda",
                          "--port", "9"], cwd=REPO, check=False, capture_output=True, text=True, timeout=120)
    assert dev.returncode == 2 and dev.stderr.startswith("error: TORCHFERRY_DEVICE=cuda needs ONNX Runtime's "
                                                         "CUDAExecutionProvider"), dev.stderr
    assert dev.stderr.count("\n") == 1 and "Traceback" not in dev.stderr
    env = {"TORCHFERRY_MODEL": str(exported_model["model"]), "TORCHFERRY_DEVICE": "tensorrt",
           "TORCHFERRY_BIND": "127.0.0.1:9", "PATH": str(Path(sys.executable).parent)}
    gun = subprocess.run([sys.executable, "-m", "gunicorn", "-c", str(REPO / "torchferry/serve/gunicorn.conf.py")],
                         cwd=REPO, check=False, capture_output=True, text=True, timeout=120, env=env)
    assert gun.returncode == 2 and gun.stderr.count("\n") == 1, gun.stderr
    assert "TORCHFERRY_DEVICE=tensorrt needs ONNX Runtime's TensorrtExecutionProvider" in gun.stderr


def test_on_a_gpu_the_proof_is_held_to_the_gpu_bound_not_the_files(exported_model: dict) -> None:
    predictor = Predictor(str(exported_model["model"]))
    golden = predictor.info.metadata["golden"]
    shape = [int(predictor.info.preprocess["channels"]), *predictor.info.preprocess["size"]]
    _, expected, atol, rtol = read_golden(golden, shape, len(predictor.info.classes))
    assert (atol, rtol) == (golden["atol"], golden["rtol"])  # on the CPU: the file's stricter bound
    assert golden_bound("cpu") is None and golden_bound("cuda") == golden_bound("tensorrt")
    _, _, atol, rtol = read_golden(golden, shape, len(predictor.info.classes), golden_bound("cuda"))
    assert (atol, rtol) == (GOLDEN_GPU_ATOL, GOLDEN_GPU_RTOL)
    # What TF32 does to a logit (~1e-2 of its size) passes the GPU bound and not the file's; another model fails both.
    tf32_like = expected * (1 + 5e-3) + 5e-3
    assert tolerance_ratio(tf32_like, expected, atol, rtol) <= 1 < tolerance_ratio(
        tf32_like, expected, golden["atol"], golden["rtol"])
    other = predictor.run(golden_inputs(list(expected.shape[:1]) + shape, seed=1))
    assert tolerance_ratio(other, expected, atol, rtol) > 1


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
def test_serves_and_proves_on_cuda(exported_model: dict) -> None:
    predictor = Predictor(str(exported_model["model"]), device="cuda")
    assert predictor.providers[0] == "CUDAExecutionProvider"
    assert predictor.prove() <= GOLDEN_GPU_ATOL
    client = create_app({"MODEL": str(exported_model["model"]), "DEVICE": "cuda", "LOAD_SYNC": True}).test_client()
    assert client.get("/healthz").json["providers"][0] == "CUDAExecutionProvider"
    x = golden_inputs([4, *predictor.info.input_shape[1:]])
    assert np.argmax(predictor.run(x), 1).tolist() == np.argmax(Predictor(str(exported_model["model"])).run(x), 1).tolist()


def _serve_gpu_pin(name: str) -> str:
    """`name==version` as pyproject's [serve-gpu] pins it, extras left out."""
    import tomllib
    from packaging.requirements import Requirement

    reqs = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve-gpu"]
    req = next(r for r in map(Requirement, reqs) if r.name == name)
    return f"{req.name}{req.specifier}"


# The onnxruntime-gpu wheel (~250 MB) comes from a local folder, never the network during a test: .ci/run fetches
# it with `pip download` before the suite (an install step) and names the folder here.
WHEELS = os.environ.get("TORCHFERRY_TEST_WHEELS")


@pytest.mark.slow
@cpu_build_only
@pytest.mark.skipif(not WHEELS, reason="set TORCHFERRY_TEST_WHEELS to a folder holding the [serve-gpu] onnxruntime-gpu "
                                       "wheel (pip download --no-deps -d DIR onnxruntime-gpu==PIN), as .ci/run does")
def test_onnxruntime_gpu_on_a_machine_without_a_gpu_stops_gunicorn_after_one_worker(
        exported_model: dict, tmp_path: Path) -> None:
    """The serve-gpu image's own onnxruntime-gpu wheel (from PyPI, without NVIDIA's libraries) on this GPU-less
    machine: it lists CUDAExecutionProvider, so the master's check passes, and ONNX Runtime builds each session on
    the CPU instead (it only warns). Each worker refuses, gunicorn stops without starting another, and no request
    is ever answered from the CPU."""
    target = tmp_path / "ort-gpu"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                          "--no-index", "--find-links", str(WHEELS), "--target", str(target),
                          _serve_gpu_pin("onnxruntime-gpu")],
                         check=False, capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": f"{target}:{REPO}", "HOME": str(tmp_path),
           "TORCHFERRY_MODEL": str(exported_model["model"]), "TORCHFERRY_DEVICE": "cuda", "TORCHFERRY_WORKERS": "2"}
    listed = subprocess.run([sys.executable, "-c", "import onnxruntime as o; print(o.get_available_providers())"],
                            check=True, capture_output=True, text=True, env=env, timeout=120).stdout
    assert "CUDAExecutionProvider" in listed, listed
    from helpers import free_port

    env["TORCHFERRY_BIND"] = f"127.0.0.1:{free_port()}"
    # Bounded: before os._exit, every worker aborted in ONNX Runtime's teardown and gunicorn started another, forever.
    gun = subprocess.run([sys.executable, "-m", "gunicorn", "-c", str(REPO / "torchferry/serve/gunicorn.conf.py")],
                         cwd=REPO, check=False, capture_output=True, text=True, timeout=120, env=env)
    log = gun.stdout + gun.stderr
    assert gun.returncode == 3 and "Reason: Worker failed to boot." in log, log[-3000:]  # gunicorn's boot error
    assert log.count("error: ONNX Runtime did not start CUDAExecutionProvider") == 1  # the first worker says it
    assert "Traceback" not in log and "SIGABRT" not in log and log.count("Booting worker") == 2  # none restarted
    dev = subprocess.run([sys.executable, "-m", "serve", "--device", "cuda", "--port", "9"], cwd=REPO, check=False,
                         capture_output=True, text=True, timeout=120, env=env)
    assert dev.returncode == 1 and dev.stderr.rstrip().splitlines()[-1].startswith(
        "error: ONNX Runtime did not start CUDAExecutionProvider"), dev.stderr[-2000:]
