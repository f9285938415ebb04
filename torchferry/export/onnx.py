"""`python -m export.onnx CHECKPOINT`: a self-describing ONNX model, proven equal to PyTorch before it is kept.

The model is exported with the dynamo exporter (the TorchScript exporter only where dynamo fails, with a
warning), written under a temporary name, checked with `onnx.checker` and verified with ONNX Runtime
against PyTorch; only then is it renamed to `model.onnx` with a sha256 sidecar. A model that fails
verification is never left where the server would pick it up, and its report goes to
`model.onnx.verify.failed.json`, beside (never over) the report of a good export. The optional variants
(`model.opt.onnx`, `model.int8.onnx`) are written the same way: a temporary name, golden outputs, a
sha256 sidecar, then the rename, so the server proves them as it proves `model.onnx`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import Any

import onnx
import torch
from torch import nn

import torchferry
from torchferry import contract
from torchferry.cli import FAILED, Parser, add_debug_arguments, error, run_main
from torchferry.contract import INPUT_NAME, OUTPUT_NAME, sha256_file, sidecar_path, tolerance_ratio
from torchferry.distributed import TorchferryError
from torchferry.distributed.checkpoint import default_file_mode, load_checkpoint, model_from_checkpoint, write_sidecar
from torchferry.distributed.tasks import task_for
from torchferry.export import metadata as meta
from torchferry.export.verify import (
    DEFAULT_ATOL,
    DEFAULT_MIN_TOP1,
    DEFAULT_RTOL,
    MAX_REAL_IMAGES,
    add_parity_arguments,
    check_parity_arguments,
    failure_message,
    format_report,
    ort_session,
    report_path,
    verify_parity,
    write_report,
)

_logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2 * 1024**3


def _export_dynamo(model: nn.Module, example: torch.Tensor, opset: int | None, output: str) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=65536)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[output], dynamic_shapes=({0: batch},),
                                    opset_version=opset, external_data=False, verbose=False)
        # PyTorch's own check of the exported program against eager mode, on the golden batch.
        from torch.onnx.verification import verify_onnx_program

        worst = max(info.max_abs_diff for info in verify_onnx_program(program, args=(example,)))
    _logger.info("dynamo export: torch.onnx.verification max abs diff %.3g on the golden batch", worst)
    return program.model_proto


def _export_torchscript(model: nn.Module, example: torch.Tensor, opset: int | None, output: str) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=[INPUT_NAME],
                          output_names=[output], opset_version=opset or 17,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, output: {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def _root_cause(exc: BaseException) -> str:
    """First line of the innermost cause, without terminal colours: why dynamo refused the model."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def export_model(model: nn.Module, example: torch.Tensor, opset: int | None = None,
                 output: str = OUTPUT_NAME) -> tuple[onnx.ModelProto, str]:
    """ONNX graph of `model` with input `input` ([N, C, H, W] for images, [N, F] for tables; dynamic N) and output
    `output` (the task's: `logits`, `prediction`); and the exporter used."""
    try:
        return _export_dynamo(model, example, opset, output), "dynamo"
    except Exception as exc:  # noqa: BLE001 - any dynamo failure falls back, and says so
        reason = _root_cause(exc)
        _logger.warning("the dynamo exporter failed (%s); falling back to the TorchScript exporter", reason)
    return _export_torchscript(model, example, opset, output), "torchscript"


def build_onnx(checkpoint: dict[str, Any], checkpoint_path: str, model: nn.Module, opset: int | None = None, *,
               atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> tuple[onnx.ModelProto, str]:
    """Export and attach the metadata docs/design.md lists (the task's own through `Task.onnx_metadata`), golden
    inputs and their PyTorch outputs included (with the tolerance the export is held to)."""
    task = task_for(checkpoint)
    kind = task.golden_kind(checkpoint)
    golden = contract.golden_inputs([contract.GOLDEN_BATCH, *task.input_shape(checkpoint)], **kind)
    example = torch.from_numpy(golden)
    proto, exporter = export_model(model, example, opset, task.output_name)
    with torch.inference_mode():
        logits = model(example).numpy()
    meta.set_metadata(proto, {
        "task": task.name,
        **task.onnx_metadata(checkpoint),
        "arch": checkpoint["arch"],
        "epoch": int(checkpoint["epoch"]),
        "checkpoint_sha256": sha256_file(checkpoint_path),
        "torchferry_version": torchferry.__version__,
        "exporter": exporter,
        "versions": {**checkpoint.get("versions", {}), "onnx": onnx.__version__},
        "golden": contract.golden_record(logits, list(golden.shape), "pytorch", atol, rtol, **kind),
    })
    proto.producer_name = "torchferry"
    proto.producer_version = torchferry.__version__
    return proto, exporter


def save_checked(proto: onnx.ModelProto, path: str) -> None:
    """Save as one self-contained file and run the full ONNX checker on it."""
    external = meta.external_data_tensors(proto)
    if external:
        raise TorchferryError(f"the exported graph references external data ({external[:3]}); refusing")
    data = proto.SerializeToString()
    if len(data) >= PROTOBUF_LIMIT:
        raise TorchferryError("the model is over 2 GB, the limit of a single-file ONNX model")
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    onnx.checker.check_model(path, full_check=True)


def _temp_model(directory: str, name: str) -> str:
    """A fresh empty file for a model being made, hidden beside its final place (same filesystem)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".tmp.onnx", dir=directory)
    os.fchmod(fd, default_file_mode())
    os.close(fd)
    return tmp


def install_model(tmp: str, path: str) -> str:
    """Move a finished model from `tmp` to `path` with its sha256 sidecar; returns the hash.

    An old sidecar never sits beside the new model: it is dropped, the model swapped in, the new one written.
    """
    digest = sha256_file(tmp)
    if os.path.exists(sidecar_path(path)):
        os.unlink(sidecar_path(path))
    os.replace(tmp, path)
    write_sidecar(path, digest)
    return digest


def _quantize(fp32_path: str, out_path: str, checkpoint: dict[str, Any], data: str | None,
              max_images: int) -> dict[str, Any]:
    """model.int8.onnx (golden outputs of its own, sha256 sidecar), made under a temporary name."""
    from torchferry.export.quantize import quantize_int8

    tmp = _temp_model(os.path.dirname(out_path), "int8")
    try:
        result = quantize_int8(fp32_path, tmp, checkpoint, data=data, max_images=max_images)
        result.update({"path": out_path, "sha256": install_model(tmp, out_path)})
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return result


def _optimize(src: str, dst: str, atol: float, rtol: float) -> dict[str, Any]:
    """An ORT graph-optimised copy (extended level: fusions that stay portable across CPUs), kept only when it
    reproduces the PyTorch golden logits it carries over from `src` within atol + rtol*|golden|."""
    import onnxruntime as ort

    tmp = _temp_model(os.path.dirname(dst), "opt")
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = tmp
        ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
        values = meta.read_metadata(onnx.load(src))
        optimized = onnx.load(tmp)
        meta.set_metadata(optimized, {**values, "optimization": "onnxruntime-extended"})
        onnx.save(optimized, tmp)
        x, expected, _, _ = contract.read_golden(values["golden"], values["golden"]["shape"][1:],
                                                 len(values["golden"]["logits"][0]))
        got = ort_session(tmp).run(None, {INPUT_NAME: x})[0]
        ratio = tolerance_ratio(got, expected, atol, rtol)
        if not ratio <= 1.0:
            raise TorchferryError(f"the optimised model does not reproduce PyTorch's golden logits within --atol "
                                  f"{atol:g} / --rtol {rtol:g}; {dst} not written")
        return {"path": dst, "sha256": install_model(tmp, dst)}
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_checkpoint(checkpoint_path: str, output: str | None = None, *, opset: int | None = None,
                      data: str | None = None, use_real: bool = True, atol: float = DEFAULT_ATOL,
                      rtol: float = DEFAULT_RTOL, min_top1: float = DEFAULT_MIN_TOP1, optimize: bool = False,
                      quantize: str | None = None, max_images: int = MAX_REAL_IMAGES,
                      factory: str | None = None) -> dict[str, Any]:
    """Export, verify, and keep the model only if it passes; returns the verification report.

    `factory` is the command line's --model: the only way a `package.module:factory` checkpoint is rebuilt.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    if quantize and task_for(checkpoint).name != "image":
        raise TorchferryError(f"--quantize {quantize} is for image models; this checkpoint is a "
                              f"{task_for(checkpoint).name} model")
    model = model_from_checkpoint(checkpoint, factory=factory)
    output = os.path.abspath(output or os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), "model.onnx"))
    os.makedirs(os.path.dirname(output), exist_ok=True)
    proto, exporter = build_onnx(checkpoint, checkpoint_path, model, opset, atol=atol, rtol=rtol)
    fd, tmp = tempfile.mkstemp(prefix=".model-", suffix=".onnx.tmp", dir=os.path.dirname(output))
    os.fchmod(fd, default_file_mode())
    os.close(fd)
    try:
        save_checked(proto, tmp)
        report = verify_parity(tmp, model, checkpoint, data=data, use_real=use_real, atol=atol, rtol=rtol,
                               min_top1=min_top1, max_images=max_images)
        report.update({"model": output, "checkpoint": os.path.abspath(checkpoint_path), "exporter": exporter})
        if not report["passed"]:
            # The proof of an earlier good export (its model.onnx and report) stays as it was.
            report["report"] = report_path(output, False)
            write_report(report, report["report"])
            return report
        report["sha256"] = install_model(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    report["report"] = report_path(output, True)
    stem = output.removesuffix(".onnx")
    if optimize:
        report["optimized"] = _optimize(output, stem + ".opt.onnx", atol, rtol)["path"]
    if quantize:
        report["int8"] = _quantize(output, stem + ".int8.onnx", checkpoint, data, max_images)
    write_report(report, report["report"])
    return report


def get_args_parser() -> argparse.ArgumentParser:
    """`python -m export.onnx` command line."""
    p = Parser(prog="python -m export.onnx", description="Export a torchferry checkpoint to "
                                "ONNX and prove with ONNX Runtime that it computes what PyTorch computes.")
    p.add_argument("checkpoint", help="a torchferry checkpoint, e.g. runs/<name>/best.pth")
    p.add_argument("--output", "-o", default=None, help="the .onnx file (default: model.onnx beside the checkpoint)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's own, 18+)")
    add_parity_arguments(p)
    p.add_argument("--optimize", action="store_true", help="also save an ORT graph-optimised model.opt.onnx")
    p.add_argument("--quantize", choices=("int8",), default=None, help="also save model.int8.onnx: static INT8 "
                   "calibrated on training images (dynamic where no data is reachable), with its top-1 "
                   "accuracy against the fp32 model")
    add_debug_arguments(p, verbose="more log output")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when the model was exported and verified, 1 when verification failed, 2 on bad input."""
    return run_main(get_args_parser(), _export, argv)


def _export(args: argparse.Namespace) -> int:
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch._export", "torch.export", "torch.fx"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    check_parity_arguments(args)
    report = export_checkpoint(args.checkpoint, args.output, opset=args.opset, data=args.data,
                               use_real=not args.no_real_images, atol=args.atol, rtol=args.rtol,
                               min_top1=args.min_top1_agreement, optimize=args.optimize,
                               quantize=args.quantize, max_images=args.max_images, factory=args.factory)
    print(format_report(report))
    if not report["passed"]:
        return error(f"{failure_message(report)}; nothing written as {report['model']} (report: {report['report']})",
                     FAILED)
    if "int8" in report:
        q = report["int8"]
        print(f"int8: {q['path']} ({q['method']}); top-1 {q.get('int8_top1', float('nan')):.4f} vs fp32 "
              f"{q.get('fp32_top1', float('nan')):.4f}; kept beside the fp32 model, not instead of it")
    print(f"exported {report['model']} (sha256 {report['sha256'][:12]}…, exporter {report['exporter']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
