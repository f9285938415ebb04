"""Parity of an ONNX model with its PyTorch checkpoint, measured with ONNX Runtime on the CPU.

`python -m export.verify MODEL.onnx CHECKPOINT [--data DIR]` compares ONNX Runtime's logits with the
PyTorch model's in eval mode on random inputs at several batch sizes and, when the checkpoint's data is
reachable, on real validation images through the checkpoint's own eval transform. It reports max abs
error, max relative error and top-1 agreement per case, writes `MODEL.onnx.verify.json`, and exits 1
when `--atol` or `--min-top1-agreement` is broken.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from distributed import TorchferryError
from distributed.checkpoint import atomic_write_bytes, load_checkpoint, model_from_checkpoint

_logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 3, 32)
DEFAULT_ATOL = 1e-4
DEFAULT_MIN_TOP1 = 1.0
MAX_REAL_IMAGES = 512


def ort_session(path: str, threads: int = 0) -> ort.InferenceSession:
    """A CPU ONNX Runtime session (`threads` 0: ORT's default)."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def compare(onnx_logits: np.ndarray, torch_logits: np.ndarray) -> dict[str, float]:
    """max abs error, max relative error (|a-b| / max(|b|, 1e-6)) and top-1 agreement of two logit batches."""
    diff = np.abs(onnx_logits.astype(np.float64) - torch_logits.astype(np.float64))
    rel = diff / np.maximum(np.abs(torch_logits.astype(np.float64)), 1e-6)
    agree = float(np.mean(onnx_logits.argmax(1) == torch_logits.argmax(1)))
    return {"max_abs": float(diff.max()), "max_rel": float(rel.max()), "top1_agreement": agree}


def real_batches(checkpoint: dict[str, Any], data: str | None, limit: int) -> tuple[Iterator[tuple[Any, Any]], str]:
    """Batches of (images, labels) from the checkpoint's validation split, with a description.

    Raises TorchferryError when the data cannot be reached.
    """
    from distributed.config import TrainConfig
    from distributed.data import build_datasets, discover, require_explicit_torchvision_root
    from distributed.presets import build_eval_transform

    cfg = TrainConfig.from_dict(dict(checkpoint["config"]))
    require_explicit_torchvision_root(cfg.data, data)
    if data:
        cfg = dataclasses.replace(cfg, data=data)
    cfg = dataclasses.replace(cfg, check_images="none", download=False)
    split = discover(cfg)
    if list(split.classes) != list(checkpoint["classes"]):
        raise TorchferryError(f"the classes found in {cfg.data!r} differ from the checkpoint's")
    _, val = build_datasets(split, int(checkpoint["preprocess"]["channels"]), None,
                            build_eval_transform(checkpoint["preprocess"]))
    indices = list(range(min(len(val), limit)))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val, indices), batch_size=32)
    return iter(loader), f"{len(indices)} validation images from {cfg.data}"


def verify_parity(onnx_path: str, model: nn.Module, checkpoint: dict[str, Any], *, data: str | None = None,
                  use_real: bool = True, atol: float = DEFAULT_ATOL, min_top1: float = DEFAULT_MIN_TOP1,
                  batch_sizes: tuple[int, ...] = BATCH_SIZES, max_images: int = MAX_REAL_IMAGES,
                  seed: int = 0) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch eval mode; returns the report (its `passed` says the verdict)."""
    model = model.eval()
    session = ort_session(onnx_path)
    c = int(checkpoint["preprocess"]["channels"])
    h, w = (int(v) for v in checkpoint["preprocess"]["size"])
    cases: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(seed)
    for b in batch_sizes:
        x = torch.randn(b, c, h, w, generator=gen)
        with torch.inference_mode():
            expected = model(x).numpy()
        try:
            got = session.run(None, {"input": x.numpy()})[0]
        except Exception as exc:  # noqa: BLE001 - a model that cannot run this batch fails this case
            cases.append({"case": f"random batch {b}", "kind": "random", "batch": b, "max_abs": float("inf"),
                          "max_rel": float("inf"), "top1_agreement": 0.0,
                          "error": str(exc).strip().splitlines()[0][:300]})
            continue
        cases.append({"case": f"random batch {b}", "kind": "random", "batch": b, **compare(got, expected)})
    real_note = "not requested"
    if use_real:
        try:
            batches, real_note = real_batches(checkpoint, data, max_images)
        except (TorchferryError, OSError, RuntimeError) as exc:
            batches, real_note = iter(()), f"validation data not reachable ({exc}); pass --data to point at it"
            _logger.warning(real_note)
        outs, refs = [], []
        try:
            for x, _ in batches:
                with torch.inference_mode():
                    refs.append(model(x).numpy())
                outs.append(session.run(None, {"input": x.numpy()})[0])
        except Exception as exc:  # noqa: BLE001 - the model failing on real images fails that case
            cases.append({"case": "validation images", "kind": "real", "batch": 32, "max_abs": float("inf"),
                          "max_rel": float("inf"), "top1_agreement": 0.0,
                          "error": str(exc).strip().splitlines()[0][:300]})
            outs = []
        if outs:
            got, expected = np.concatenate(outs), np.concatenate(refs)
            cases.append({"case": "validation images", "kind": "real", "batch": 32, "images": len(got),
                          **compare(got, expected)})
    for case in cases:
        case["passed"] = case["max_abs"] <= atol and (case["kind"] != "real" or case["top1_agreement"] >= min_top1)
    contract = metadata_mismatches(session, checkpoint)
    return {"model": os.path.abspath(onnx_path), "atol": atol, "min_top1_agreement": min_top1,
            "real_images": real_note, "cases": cases, "metadata_mismatches": contract,
            "passed": all(c["passed"] for c in cases) and not contract}


def metadata_mismatches(session: ort.InferenceSession, checkpoint: dict[str, Any]) -> list[str]:
    """Contract fields of the model's metadata that disagree with the checkpoint (classes, preprocess, arch)."""
    props = session.get_modelmeta().custom_metadata_map
    problems = []
    for key in ("classes", "preprocess", "arch"):
        if key not in props:
            continue  # a model exported elsewhere: only the numbers are compared
        value = json.loads(props[key]) if key != "arch" else props[key]
        if value != checkpoint[key]:
            problems.append(f"{key}: model says {value!r}, checkpoint says {checkpoint[key]!r}")
    return problems


def format_report(report: dict[str, Any]) -> str:
    """The short table printed after verification."""
    lines = [f"{'case':<22}{'max abs':>12}{'max rel':>12}{'top-1 agree':>13}  ok"]
    for c in report["cases"]:
        lines.append(f"{c['case']:<22}{c['max_abs']:>12.3g}{c['max_rel']:>12.3g}{c['top1_agreement']:>12.1%}"
                     f"  {'yes' if c['passed'] else 'NO'}")
    lines.append(f"real images: {report['real_images']}")
    for problem in report.get("metadata_mismatches", []):
        lines.append(f"metadata mismatch: {problem}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str) -> None:
    """The JSON report, atomically."""
    atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode())


def add_parity_arguments(p: argparse.ArgumentParser) -> None:
    """The verification flags `python -m export.onnx` and `python -m export.verify` share."""
    p.add_argument("--data", default=None, help="validation data for the real-image check (and INT8 calibration) "
                   "(default: the checkpoint's recorded --data, when reachable)")
    p.add_argument("--no-real-images", action="store_true", help="verify on random inputs only")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"largest allowed abs error (default: {DEFAULT_ATOL})")
    p.add_argument("--min-top1-agreement", type=float, default=DEFAULT_MIN_TOP1, help="smallest allowed top-1 "
                   f"agreement on real images (default: {DEFAULT_MIN_TOP1})")
    p.add_argument("--max-images", type=int, default=MAX_REAL_IMAGES, help="validation images to compare (and to "
                   f"measure INT8 accuracy on) (default: {MAX_REAL_IMAGES})")


def get_args_parser() -> argparse.ArgumentParser:
    """`python -m export.verify` command line."""
    p = argparse.ArgumentParser(prog="python -m export.verify", description="Check that an ONNX model computes "
                                "what its torchferry checkpoint computes (ONNX Runtime vs PyTorch, CPU).")
    p.add_argument("model", help="the .onnx file")
    p.add_argument("checkpoint", help="the torchferry checkpoint (.pth) it was exported from")
    add_parity_arguments(p)
    p.add_argument("--report", default=None, help="where to write the JSON report (default: MODEL.verify.json)")
    p.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when parity holds, 1 when it does not, 2 on bad input."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if not os.path.isfile(args.model):
            raise TorchferryError(f"model {args.model!r} does not exist")
        checkpoint = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(checkpoint)
        report = verify_parity(args.model, model, checkpoint, data=args.data, use_real=not args.no_real_images,
                               atol=args.atol, min_top1=args.min_top1_agreement, max_images=args.max_images)
    except TorchferryError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - ORT refusing the file is bad input, said in one line
        if args.debug:
            raise
        print(f"error: cannot run {args.model!r}: {str(exc).strip().splitlines()[0][:300]}", file=sys.stderr)
        return 2
    write_report(report, args.report or args.model + ".verify.json")
    print(format_report(report))
    if not report["passed"]:
        print("error: ONNX Runtime does not match PyTorch within tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
