"""One ONNX Runtime session per process, built from the model file alone, proven before it serves.

The model's metadata (written by `python -m export.onnx`) carries its task, the task's input spec (an image
classifier's classes and preprocessing; a table's features) and golden inputs with the outputs PyTorch gave
for them. At start-up the predictor checks the file's sha256 against its sidecar, refuses external-data
initializers, checks the metadata against the graph through the task (`serve/tasks.py`: for an image
classifier one float input [N, C, H, W] whose static sizes are the preprocessing's, one output [N, K] with K
the number of classes),
rebuilds the golden inputs with numpy and runs them: a model that does not reproduce them is never marked
ready. The file is untrusted: every value it carries is checked before use, and the tolerance of the
proof is the server's (`torchferry.contract.GOLDEN_ATOL`, `GOLDEN_RTOL`); a file may only ask for a stricter one.
The session runs on the device the settings name (serve/device.py): the CPU, or a GPU whose provider the session
must have got (never a silent fall back to the CPU), where the proof runs too, to the contract's GPU bound.
What a model file carries and how each value is checked is `torchferry.contract`'s.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from torchferry.contract import (
    GOLDEN_BATCH,
    MAX_GOLDEN_BATCH,
    TORCH_SAVE_MAGIC,
    ContractError,
    classes_problem,
    decode_metadata,
    error_line,
    folder_not_file,
    golden_inputs,  # noqa: F401 - the golden batch, for callers that build model files
    is_int,
    preprocess_problems,
    read_golden,
    recorded_sha256,
    shown_metadata_problem,
    task_of,
    tolerance_ratio,
)
from torchferry.serve.device import check_session, golden_bound, is_gpu, load_gpu_libraries, providers
from torchferry.serve.errors import HTTPError
from torchferry.serve.settings import ServeSettings
from torchferry.serve.tasks import ServeTask, serve_task, softmax, top_k_answers

_logger = logging.getLogger(__name__)


# Protobuf's limit on one message, so on a self-contained ONNX file (external data is refused).
MAX_MODEL_BYTES = 2**31 - 1


class ModelRefused(ContractError):
    """The model file cannot be served: missing, altered, external data, not ours, or failing its proof."""


__all__ = ["ModelInfo", "ModelRefused", "Predictor", "softmax"]


@dataclass
class ModelInfo:
    """What the model file says about itself: its task and the task's checked input spec (`spec`; an image
    classifier's `classes` and `preprocess` are also fields of their own, empty for other tasks)."""

    path: str
    sha256: str
    classes: list[str]
    preprocess: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    task: str = "image"
    spec: dict[str, Any] = field(default_factory=dict)
    shape: list[int] = field(default_factory=list)

    @property
    def input_shape(self) -> list[Any]:
        """The input's shape with N dynamic: [N, C, H, W] for images, [N, F] for tables."""
        if self.shape:
            return ["N", *self.shape]
        h, w = self.preprocess["size"]
        return ["N", int(self.preprocess["channels"]), int(h), int(w)]


def check_preprocess(spec: Any) -> dict[str, Any]:
    """The file's preprocessing spec, checked value by value (the contract's bounds, one mean/std per channel)."""
    for problem in preprocess_problems(spec):
        raise ModelRefused(f"metadata {problem}")
    return spec


def check_classes(classes: Any) -> list[str]:
    """The file's class names: a list of 2 or more non-empty strings."""
    problem = classes_problem(classes)
    if problem:
        raise ModelRefused(f"metadata {problem}")
    return classes


def read_model_file(model_path: str) -> bytes:
    """The model file's bytes, refused when missing or when they differ from its sha256 sidecar."""
    if os.path.isdir(model_path):
        raise ModelRefused(f"model file {model_path!r} {folder_not_file(model_path, 'model.onnx')}")
    if not os.path.exists(model_path):
        raise ModelRefused(f"model file {model_path!r} does not exist")
    if not os.path.isfile(model_path):  # a FIFO would block the read, a device never end it
        raise ModelRefused(f"model file {model_path!r} is not a regular file")
    # No more than a self-contained ONNX file can hold is read: a sparse file of 3 GB took 6 GiB to refuse.
    with open(model_path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_MODEL_BYTES:
            raise ModelRefused(f"model file {model_path!r} is over {MAX_MODEL_BYTES} bytes, the most a "
                               "self-contained ONNX file (one protobuf message) can hold")
        data = f.read(size)
        if f.read(1):  # the file grew while it was read: a copy still being written; looked at again when it changes
            raise ModelRefused(f"model file {model_path!r} changed while it was read")
    recorded = recorded_sha256(model_path)
    digest = hashlib.sha256(data).hexdigest()
    if recorded is not None and recorded != digest:
        raise ModelRefused(f"sha256 of {model_path} is {digest[:12]}…, its sidecar says {recorded[:12]}…: "
                           "the file is altered or truncated")
    return data


# ONNX Runtime's words when its CPU arena refuses an allocation past the cap (`capped_arena`).
ARENA_EXHAUSTED = "Available memory of"
_arena_lock = threading.Lock()
_arena_cap: list[int] = []  # the cap this process's shared CPU arena was registered with, once it was


def capped_arena(opts: ort.SessionOptions, cap: int) -> None:
    """Make the session `opts` builds take its CPU tensors from this process's one shared arena of at most `cap`
    bytes (ONNX Runtime's environment allocator, an OrtArenaCfg's max_mem): a model file then cannot make a
    request, or its proof, allocate without bound (a 219-byte ConstantOfShape graph asked for 2 GB); past the cap
    ONNX Runtime fails that run. Weights (initializers) are loaded outside the arena: the file's size bounds them.
    Constant folding is off for such sessions: it would compute that graph once at load, outside the arena, and
    keep its output as a weight (800 MB for a ConstantOfShape under its 1 GiB per-node limit); measured on our
    smallcnn and resnet18 exports, a run takes as long without it."""
    with _arena_lock:
        if _arena_cap != [cap]:
            arena = ort.OrtArenaCfg({"max_mem": cap, "arena_extend_strategy": 1})  # grow by what is asked, no more
            ort.create_and_register_allocator(
                ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT), arena)
            _arena_cap[:] = [cap]
    opts.add_session_config_entry("session.use_env_allocators", "1")
    opts.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")


class Predictor:
    """Loads, checks and runs one ONNX classifier; thread-safe (ORT sessions are)."""

    def __init__(self, model_path: str, intra_op_threads: int = 0, device: str = "cpu", device_id: int = 0,
                 data: bytes | None = None, memory_cap: int = 0, memory_setting: str = "TORCHFERRY_ORT_MEMORY_BYTES"):
        """Load `model_path` (its sha256 checked against the sidecar when there is one), or, given `data`, those
        bytes as the file that `model_path` names (a batch actor gets the file the driver read and checked).
        `memory_cap`: the bytes ONNX Runtime may hold for the tensors it computes (`capped_arena`; 0: no cap), set
        by `memory_setting`, which the refusals name."""
        if data is None:
            data = read_model_file(model_path)
        digest = hashlib.sha256(data).hexdigest()
        self.device, self.memory_cap, self.memory_setting = device, memory_cap, memory_setting
        if is_gpu(device):
            load_gpu_libraries()
        self.session = self._session(data, intra_op_threads, model_path, providers(device, device_id), memory_cap)
        self.providers = check_session(self.session, device)  # DeviceRefused when ORT fell back to the CPU
        meta = decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        try:
            problem = shown_metadata_problem(meta)
            if problem:
                raise ContractError(f"metadata {problem}")
            self.task: ServeTask = serve_task(task_of(meta))
            spec = self.task.read_spec(meta)
        except ContractError as exc:
            raise ModelRefused(f"{model_path}: {exc}") from None
        shape, columns = self.task.input_shape(spec), self.task.output_columns(spec)
        self.input_name, self.output_name = self._check_graph(shape, columns)
        self.info = ModelInfo(path=os.path.abspath(model_path), sha256=digest, classes=list(self.task.classes(spec)),
                              preprocess=dict(spec.get("preprocess", {})), metadata=meta, task=self.task.name,
                              spec=spec, shape=shape)
        self._lock = threading.Lock()

    def _check_graph(self, shape: list[int], columns: int) -> tuple[str, str]:
        """The input and output names, once the graph is seen to take what the metadata says it takes: one
        input [N, *shape] of the task's type, an output [N, columns]."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        want = ", ".join(["N", *map(str, shape)])
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelRefused(f"the graph has {len(inputs)} inputs and {len(outputs)} outputs; a {self.task.name} "
                               f"model has one input [{want}] and an output [N, {columns}]")
        inp, out = inputs[0], outputs[0]
        if inp.type != self.task.input_type:
            raise ModelRefused(f"the graph's input {inp.name!r} is {inp.type}; expected {self.task.input_type}")
        if len(inp.shape) != len(shape) + 1 or any(isinstance(d, int) and d != w for d, w in zip(inp.shape[1:], shape)):
            raise ModelRefused(f"the graph's input {inp.name!r} has shape {inp.shape}; the metadata "
                               f"gives [{want}]" + (" (channels, size)" if self.task.name == "image" else ""))
        if len(out.shape) != 2 or (isinstance(out.shape[1], int) and out.shape[1] != columns):
            what = f"names {columns} classes" if self.task.classifier else f"gives {columns} output column(s)"
            raise ModelRefused(f"the graph's output {out.name!r} has shape {out.shape}; the metadata {what}, "
                               f"so it must be [N, {columns}]")
        return inp.name, out.name

    @staticmethod
    def _session(data: bytes, threads: int, path: str, providers: list[Any], memory_cap: int) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if memory_cap > 0:
            capped_arena(opts, memory_cap)
        # Loaded from bytes with an empty folder for external data: a model whose initializers point at other
        # files (ONNX path traversal, CVE-2024-27318) fails to load instead of reading them.
        with tempfile.TemporaryDirectory(prefix="torchferry-noext-") as empty:
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
            try:
                return ort.InferenceSession(data, sess_options=opts, providers=providers)
            except Exception as exc:  # noqa: BLE001 - ORT's refusal, reported in one line
                text = str(exc)
                if "xternal data" in text:
                    raise ModelRefused(f"{path} references external data files; refused (only self-contained "
                                       "models are served)") from None
                if data.startswith(TORCH_SAVE_MAGIC):
                    raise ModelRefused(f"{path} is a PyTorch checkpoint, not an ONNX model: export it (python -m "
                                       f"export.onnx {path}) and pass the model.onnx it writes") from None
                raise ModelRefused(f"ONNX Runtime cannot load {path}: {error_line(exc)}") from None

    def golden(self, max_input_bytes: int = ServeSettings.max_input_bytes) -> tuple[np.ndarray, np.ndarray, float,
                                                                                      float]:
        """(inputs, expected logits, atol, rtol) from the file's golden record, every field checked first. More
        rows than the export's GOLDEN_BATCH must fit `max_input_bytes`, as a request's inputs do: the file asks
        for up to MAX_GOLDEN_BATCH (a 2048 px model's 8 are 384 MiB before the model's own work on them)."""
        golden = self.info.metadata.get("golden")
        shape = golden.get("shape") if isinstance(golden, dict) else None
        rows = shape[0] if isinstance(shape, list) and shape else None
        if is_int(rows, GOLDEN_BATCH + 1, MAX_GOLDEN_BATCH) and rows > self.items_per_request(rows, max_input_bytes):
            raise ModelRefused(f"golden.shape asks for {rows} inputs of {self.input_bytes() / 2**20:.3g} MiB; more "
                               f"than {GOLDEN_BATCH} must fit the {max_input_bytes / 2**20:.3g} MiB a request's inputs "
                               "may take (TORCHFERRY_MAX_INPUT_BYTES)")
        try:
            return read_golden(self.info.metadata.get("golden"), self.info.shape,
                               self.task.output_columns(self.info.spec), golden_bound(self.device))
        except ContractError as exc:
            raise ModelRefused(str(exc)) from None

    def prove(self, max_input_bytes: int = ServeSettings.max_input_bytes) -> float:
        """Recompute the golden outputs; raises ModelRefused when they do not match. Returns the max abs diff.

        Passes when |got - expected| <= atol + rtol * |expected| everywhere, with the contract's GOLDEN_ATOL and GOLDEN_RTOL
        unless the file records stricter ones (on a GPU: GOLDEN_GPU_ATOL, GOLDEN_GPU_RTOL). The output must have one
        column per class.
        """
        x, expected, atol, rtol = self.golden(max_input_bytes)
        try:
            got = self.run(x)
        except HTTPError:  # past the memory cap
            raise ModelRefused(f"the model needs more memory for its golden inputs than the {self.memory_cap / 2**20:g}"
                               f" MiB ONNX Runtime may hold ({self.memory_setting})") from None
        except Exception as exc:  # noqa: BLE001 - ORT's refusal of its own graph, in one line
            raise ModelRefused(f"the model fails on its golden inputs: {error_line(exc)}") from None
        columns = self.task.output_columns(self.info.spec)
        if got.ndim != 2 or got.shape[1] != columns:
            raise ModelRefused(f"the model's output has shape {list(got.shape)} for its golden inputs; the metadata "
                               f"gives {columns} output column(s)")
        if got.shape != expected.shape:
            raise ModelRefused(f"the model gives {list(got.shape)} logits for golden inputs of "
                               f"{list(expected.shape)}")
        diff = np.abs(got.astype(np.float64) - expected)
        bound = atol + rtol * np.abs(expected.astype(np.float64))
        worst = float(diff.max())
        if not tolerance_ratio(got, expected, atol, rtol) <= 1.0:  # NaN fails too
            excess = float(np.nanmax(diff - bound)) if np.isfinite(diff).all() else float("nan")
            raise ModelRefused(f"golden outputs do not reproduce: max abs diff {worst:.3g}, over the bound "
                               f"atol {atol:g} + rtol {rtol:g} × |expected| by {excess:.3g}; the model does not "
                               "compute what was exported")
        return worst

    def input_bytes(self) -> int:
        """The bytes of one input the model takes: C × H × W float32 for an image, max_length int64 for a text."""
        itemsize = 8 if "int64" in self.task.input_type else 4
        return itemsize * int(np.prod(self.info.shape, dtype=np.int64))

    def items_per_request(self, max_items: int, max_input_bytes: int) -> int:
        """The inputs one request (or micro-batch) may carry: `max_items`, fewer when they would take more than
        `max_input_bytes` (the file chooses the input's size; the operator how much memory a request may take),
        never fewer than one."""
        return max(1, min(max_items, max_input_bytes // self.input_bytes()))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The outputs for a batch of the model's input ([N, C, H, W] floats for images, [N, F] for tables); an
        HTTPError 503 when ONNX Runtime needs more memory than the cap leaves it (`capped_arena`)."""
        try:
            return self.session.run(None, {self.input_name: batch})[0]
        except Exception as exc:
            if self.memory_cap and ARENA_EXHAUSTED in str(exc):
                raise HTTPError(503, "model_memory_exhausted", f"ONNX Runtime needs more memory for this than the "
                                f"{self.memory_cap / 2**20:g} MiB it may hold ({self.memory_setting}) with the "
                                "requests in flight; retry, or send fewer inputs", {"Retry-After": "1"}) from None
            raise

    def top_k(self, logits: np.ndarray, k: int) -> list[dict[str, Any]]:
        """Per row: the best label, its index and score, and the top `k` labels with scores."""
        return top_k_answers(logits, self.info.classes, k)
