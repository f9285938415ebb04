"""Parity of an ONNX model with its PyTorch checkpoint, measured with ONNX Runtime on the CPU.

`python -m export.verify MODEL.onnx CHECKPOINT [--data DIR]` compares ONNX Runtime's logits with the
PyTorch model's in eval mode on random inputs at several batch sizes and, when the checkpoint's data is
reachable, on real validation images through the checkpoint's own eval transform. It reports max abs
error, max relative error and top-1 agreement per case, and exits 1 when a logit breaks
|onnx - torch| <= atol + rtol * |torch| (`--atol`, `--rtol`) or top-1 agreement falls below
`--min-top1-agreement`. A passing report is written to
`MODEL.onnx.verify.json`; a failing one to `MODEL.onnx.verify.failed.json`, so that checking the wrong
checkpoint never erases the proof of a good export.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from torchferry.cli import FAILED, Parser, add_debug_arguments, add_factory_argument, error, lead_line, run_main
from torchferry.contract import INPUT_NAME, decode_metadata, tolerance_ratio
from torchferry.distributed import TorchferryError
from torchferry.distributed.checkpoint import atomic_write_bytes, load_checkpoint, model_from_checkpoint
from torchferry.distributed.tasks import Task, get_task, task_for

_logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 3, 32)
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5
DEFAULT_MIN_TOP1 = 1.0
MAX_REAL_IMAGES = 512


def ort_session(path: str, threads: int = 0) -> ort.InferenceSession:
    """A CPU ONNX Runtime session (`threads` 0: ORT's default) on a self-contained model file: one whose tensors
    keep their data in other files is refused, as the server refuses it, instead of reading them (ONNX Runtime
    reads any file beside the model, of any size, that the model names)."""
    import onnx

    from torchferry.export.metadata import external_data_tensors

    try:
        external = external_data_tensors(onnx.load(path, load_external_data=False))
    except Exception:  # noqa: BLE001 - not an ONNX model: ONNX Runtime says why below
        external = []
    if external:
        raise TorchferryError(f"{path} references external data files ({', '.join(external[:3])}); refused (a "
                              "torchferry model is one self-contained file)")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def compare(onnx_logits: np.ndarray, torch_logits: np.ndarray, atol: float = DEFAULT_ATOL,
            rtol: float = DEFAULT_RTOL, task: Task | None = None) -> dict[str, float]:
    """max abs error, max relative error (|a-b| / max(|b|, 1e-6)), the tolerance ratio (<= 1 passes, see
    `tolerance_ratio`) of two output batches, and the task's agreement figures (a classifier's top-1 agreement)."""
    diff = np.abs(onnx_logits.astype(np.float64) - torch_logits.astype(np.float64))
    rel = diff / np.maximum(np.abs(torch_logits.astype(np.float64)), 1e-6)
    return {"max_abs": float(diff.max()), "max_rel": float(rel.max()),
            "tolerance_ratio": tolerance_ratio(onnx_logits, torch_logits, atol, rtol),
            **(task or get_task("image")).agreement(onnx_logits, torch_logits)}


def real_batches(checkpoint: dict[str, Any], data: str | None, limit: int) -> tuple[Iterator[tuple[Any, Any]], str]:
    """Batches of (inputs, targets) from the checkpoint's validation split, with a description (`Task.real_batches`).

    Raises TorchferryError when the data cannot be reached.
    """
    return task_for(checkpoint).real_batches(checkpoint, data, limit)


def _failed_case(case: str, kind: str, batch: int, exc: Exception) -> dict[str, Any]:
    return {"case": case, "kind": kind, "batch": batch, "max_abs": float("inf"), "max_rel": float("inf"),
            "tolerance_ratio": float("inf"), "top1_agreement": 0.0, "error": lead_line(exc)}


def verify_parity(onnx_path: str, model: nn.Module, checkpoint: dict[str, Any], *, data: str | None = None,
                  use_real: bool = True, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                  min_top1: float = DEFAULT_MIN_TOP1,
                  batch_sizes: tuple[int, ...] = BATCH_SIZES, max_images: int = MAX_REAL_IMAGES,
                  seed: int = 0) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch eval mode; returns the report (its `passed` says the verdict).

    A case passes when every logit satisfies |onnx - torch| <= atol + rtol * |torch| and, on real images,
    top-1 agreement reaches `min_top1`.
    """
    model, task = model.eval(), task_for(checkpoint)
    session = ort_session(onnx_path)
    cases: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(seed)
    for b in batch_sizes:
        x = task.random_input(checkpoint, b, gen)
        with torch.inference_mode():
            expected = model(x).numpy()
        try:
            got = session.run(None, {INPUT_NAME: x.numpy()})[0]
        except Exception as exc:  # noqa: BLE001 - a model that cannot run this batch fails this case
            cases.append(_failed_case(f"random batch {b}", "random", b, exc))
            continue
        cases.append({"case": f"random batch {b}", "kind": "random", "batch": b,
                      **compare(got, expected, atol, rtol, task)})
    real_note = "not requested"
    if use_real:
        case, real_note = _real_case(session, model, checkpoint, data, max_images, atol, rtol)
        cases += [case] if case else []
    for case in cases:
        case["passed"] = (case["tolerance_ratio"] <= 1.0
                          and (case["kind"] != "real" or case.get("top1_agreement", 1.0) >= min_top1))
    contract = metadata_mismatches(session, checkpoint)
    return {"model": os.path.abspath(onnx_path), "atol": atol, "rtol": rtol, "min_top1_agreement": min_top1,
            "real_images": real_note, "cases": cases, "metadata_mismatches": contract,
            "passed": all(c["passed"] for c in cases) and not contract}


def _real_case(session: ort.InferenceSession, model: nn.Module, checkpoint: dict[str, Any], data: str | None,
               limit: int, atol: float, rtol: float) -> tuple[dict[str, Any] | None, str]:
    """The case of the checkpoint's validation data (None when it cannot be reached), and what the data were."""
    try:
        batches, note = real_batches(checkpoint, data, limit)
    except (TorchferryError, OSError, RuntimeError) as exc:
        note = f"validation data not reachable ({exc}); pass --data to point at it"
        _logger.warning(note)
        return None, note
    outs, refs = [], []
    try:
        for x, _ in batches:
            with torch.inference_mode():
                refs.append(model(x).numpy())
            outs.append(session.run(None, {INPUT_NAME: x.numpy()})[0])
    except Exception as exc:  # noqa: BLE001 - the model failing on real data fails that case
        return _failed_case(f"validation {task_for(checkpoint).items}", "real", 32, exc), note
    if not outs:
        return None, note
    got, expected = np.concatenate(outs), np.concatenate(refs)
    return {"case": f"validation {task_for(checkpoint).items}", "kind": "real", "batch": 32, "images": len(got),
            **compare(got, expected, atol, rtol, task_for(checkpoint))}, note


def metadata_mismatches(session: ort.InferenceSession, checkpoint: dict[str, Any]) -> list[str]:
    """Contract fields of the model's metadata that disagree with the checkpoint (the task's: classes, preprocess
    and arch for an image classifier)."""
    values = decode_metadata(session.get_modelmeta().custom_metadata_map)
    problems = []
    if values.get("task", "image") != task_for(checkpoint).name:
        problems.append(f"task: model says {str(values.get('task'))[:40]!r}, checkpoint says {task_for(checkpoint).name!r}")
    for key in task_for(checkpoint).metadata_keys():
        if key not in values:
            continue  # a model exported elsewhere: only the numbers are compared
        value = values[key]
        if value != checkpoint[key]:
            problems.append(f"{key}: model says {value!r}, checkpoint says {checkpoint[key]!r}")
    return problems


def format_report(report: dict[str, Any]) -> str:
    """The short table printed after verification."""
    lines = [f"{'case':<22}{'max abs':>12}{'max rel':>12}{'top-1 agree':>13}  ok"]
    for c in report["cases"]:
        agree = f"{c['top1_agreement']:>12.1%}" if "top1_agreement" in c else f"{'-':>12}"
        lines.append(f"{c['case']:<22}{c['max_abs']:>12.3g}{c['max_rel']:>12.3g}{agree}"
                     f"  {'yes' if c['passed'] else 'NO'}")
    lines.append(f"real data: {report['real_images']}")
    for problem in report.get("metadata_mismatches", []):
        lines.append(f"metadata mismatch: {problem}")
    return "\n".join(lines)


def failure_message(report: dict[str, Any]) -> str:
    """Why verification failed, in one line, naming the flag that relaxes each broken bound."""
    failed = [c for c in report["cases"] if not c["passed"]]
    reasons = []
    over = [c for c in failed if c["tolerance_ratio"] > 1.0]
    if over:
        worst = max(over, key=lambda c: c["tolerance_ratio"])
        detail = f": {worst['error']}" if worst.get("error") else ""
        reasons.append(f"{worst['case']} breaks |onnx - torch| <= atol + rtol*|torch| (max abs {worst['max_abs']:.3g}, "
                       f"max rel {worst['max_rel']:.3g}; --atol {report['atol']:g} bounds the absolute error of "
                       f"logits near zero, --rtol {report['rtol']:g} the error relative to large logits){detail}")
    low = [c for c in failed if c["kind"] == "real" and c.get("top1_agreement", 1.0) < report["min_top1_agreement"]]
    if low:
        reasons.append(f"top-1 agreement {low[0]['top1_agreement']:.1%} on {low[0]['case']} is below "
                       f"--min-top1-agreement {report['min_top1_agreement']:g}")
    if report.get("metadata_mismatches"):
        reasons.append("the model's metadata disagrees with the checkpoint (" + "; ".join(report["metadata_mismatches"])
                       + "): it was exported from another checkpoint")
    return "ONNX Runtime does not match PyTorch within tolerance: " + "; ".join(reasons or ["see the report"])


def report_path(model: str, passed: bool, requested: str | None = None) -> str:
    """Where a verification report goes: MODEL.verify.json when it passed, MODEL.verify.failed.json when not.

    A failing check never replaces a passing report: that report is the proof the export was good.
    """
    path = requested or model + ".verify.json"
    if passed:
        return path
    return path.removesuffix(".json") + ".failed.json"


def write_report(report: dict[str, Any], path: str) -> None:
    """The JSON report, atomically."""
    atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode())


def add_parity_arguments(p: argparse.ArgumentParser) -> None:
    """The verification flags `python -m export.onnx` and `python -m export.verify` share."""
    p.add_argument("--data", default=None, help="validation data for the real-image check (and INT8 calibration); "
                   "without it only a checkpoint trained on the built-in digits is checked on real images (a "
                   "checkpoint does not choose which files are read)")
    add_factory_argument(p)
    p.add_argument("--no-real-images", action="store_true", help="verify on random inputs only")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="absolute part of the bound |onnx - torch| <= "
                   f"atol + rtol*|torch|, what counts for logits near zero (default: {DEFAULT_ATOL})")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="relative part of that bound, what counts for "
                   f"large logits (default: {DEFAULT_RTOL})")
    p.add_argument("--min-top1-agreement", type=float, default=DEFAULT_MIN_TOP1, help="smallest allowed top-1 "
                   f"agreement on real images (default: {DEFAULT_MIN_TOP1})")
    p.add_argument("--max-images", type=int, default=MAX_REAL_IMAGES, help="validation images to compare (and to "
                   f"measure INT8 accuracy on) (default: {MAX_REAL_IMAGES})")


def check_parity_arguments(args: argparse.Namespace) -> None:
    """Refuse tolerances that are negative or not finite (a bound of inf or nan would prove nothing)."""
    for flag in ("atol", "rtol"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value >= 0):
            raise TorchferryError(f"--{flag} must be a finite number >= 0, got {value!r}")
    if not 0.0 <= args.min_top1_agreement <= 1.0:
        raise TorchferryError(f"--min-top1-agreement must be between 0 and 1, got {args.min_top1_agreement!r}")


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when parity holds, 1 when it does not, 2 on bad input."""
    return run_main(get_args_parser(), _verify, argv)


def get_args_parser() -> argparse.ArgumentParser:
    """`python -m export.verify` command line."""
    p = Parser(prog="python -m export.verify", description="Check that an ONNX model computes "
                                "what its torchferry checkpoint computes (ONNX Runtime vs PyTorch, CPU).")
    p.add_argument("model", help="the .onnx file")
    p.add_argument("checkpoint", help="the torchferry checkpoint (.pth) it was exported from")
    add_parity_arguments(p)
    p.add_argument("--report", default=None, help="where to write the JSON report when it passes (default: "
                   "MODEL.verify.json); a failing report goes beside it as *.failed.json, never over it")
    add_debug_arguments(p)
    return p


def _verify(args: argparse.Namespace) -> int:
    check_parity_arguments(args)
    if not os.path.isfile(args.model):
        raise TorchferryError(f"model {args.model!r} does not exist")
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(checkpoint, factory=args.factory)
        report = verify_parity(args.model, model, checkpoint, data=args.data, use_real=not args.no_real_images,
                               atol=args.atol, rtol=args.rtol, min_top1=args.min_top1_agreement,
                               max_images=args.max_images)
    except TorchferryError:
        raise
    except Exception as exc:  # ORT refusing the file is bad input, said in one line
        if args.debug:
            raise
        raise TorchferryError(f"cannot run {args.model!r}: {lead_line(exc)}") from None
    path = report_path(args.model, report["passed"], args.report)
    write_report(report, path)
    print(format_report(report))
    if not report["passed"]:
        return error(f"{failure_message(report)} (report: {path})", FAILED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
