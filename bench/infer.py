"""CPU inference: ONNX Runtime (fp32 and INT8) against PyTorch eager, side by side in one run, as ratios.

    python -m bench.infer [--quick] [--threads N] [--models smallcnn,resnet18,resnet50] [--checkpoint best.pth]

For each model (random weights, exported with torchferry's own exporter) and batch size 1 and 32: the
median latency over repetitions for torch eager (inference_mode) and ONNX Runtime (CPU provider, all
graph optimisations), both with the same thread count, and the ratio ORT/eager in images per second.
Results go to bench/results/<date>-<host>-infer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.common import machine_info, median_seconds, result_header, result_path, write_result
from torchferry.distributed.models import build_model
from torchferry.export.onnx import export_model, save_checked
from torchferry.export.quantize import quantize_static_qdq

MODELS = {"smallcnn": (1, 32), "resnet18": (3, 224), "resnet50": (3, 224)}


def _session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def bench_model(arch: str, threads: int, quick: bool, int8: bool = True) -> list[dict]:
    """Rows for batch 1 and 32 of one model: torch eager, ORT fp32 and (with `int8`) ORT static INT8."""
    channels, size = MODELS[arch]
    torch.manual_seed(0)
    model = build_model(arch, 10, channels=channels).eval()
    example = torch.randn(2, channels, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        proto, exporter = export_model(model, example)
        save_checked(proto, path)
        session = _session(path, threads)
        int8_session = None
        if int8:
            # Speed does not depend on what calibration sees; accuracy is measured on a trained model instead.
            rng = np.random.default_rng(0)
            calibration = [rng.standard_normal((8, channels, size, size), dtype=np.float32) for _ in range(4)]
            quantize_static_qdq(path, os.path.join(tmp, "m.int8.onnx"), calibration)
            int8_session = _session(os.path.join(tmp, "m.int8.onnx"), threads)
        rows = []
        for batch in (1, 32):
            x = torch.randn(batch, channels, size, size)
            xn = x.numpy()
            heavy = batch * size * size > 32 * 64 * 64
            reps = (5 if heavy else 30) if quick else (9 if heavy else 60)
            with torch.inference_mode():
                t_torch = median_seconds(lambda x=x: model(x), reps, 5)
                diff = float(np.abs(model(x).numpy() - session.run(None, {"input": xn})[0]).max())
            t_ort = median_seconds(lambda xn=xn: session.run(None, {"input": xn}), reps, 5)
            row = {"model": arch, "input": [channels, size, size], "batch": batch, "threads": threads,
                   "exporter": exporter, "reps": reps,
                   "torch_ms": 1000 * t_torch, "ort_ms": 1000 * t_ort,
                   "torch_img_s": batch / t_torch, "ort_img_s": batch / t_ort,
                   "ort_over_torch": t_torch / t_ort, "max_abs_diff": diff}
            line = (f"{arch:<10} batch {batch:>2}: torch {1000 * t_torch:8.2f} ms  ort {1000 * t_ort:8.2f} ms  "
                    f"ORT/eager {t_torch / t_ort:5.2f}x")
            if int8_session is not None:
                t_int8 = median_seconds(lambda xn=xn: int8_session.run(None, {"input": xn}), reps, 5)
                row.update({"ort_int8_ms": 1000 * t_int8, "ort_int8_img_s": batch / t_int8,
                            "int8_over_ort": t_ort / t_int8})
                line += f"  int8 {1000 * t_int8:8.2f} ms  INT8/fp32 {t_ort / t_int8:5.2f}x"
            rows.append(row)
            print(f"{line}  (max abs diff {diff:.1e})", flush=True)
    return rows


def int8_accuracy(checkpoint: str, data: str | None) -> dict:
    """Top-1 of a trained checkpoint's fp32 and INT8 ONNX models on its validation images (export --quantize)."""
    from torchferry.export.onnx import export_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        report = export_checkpoint(checkpoint, os.path.join(tmp, "model.onnx"), quantize="int8", data=data)
    from torchferry.distributed.checkpoint import load_checkpoint

    if "int8" not in report:
        raise RuntimeError(f"export of {checkpoint} did not get as far as INT8: {json.dumps(report)[:500]}")
    q = {"arch": load_checkpoint(checkpoint)["arch"], **report["int8"]}
    print(f"INT8 accuracy ({q['arch']}, {q.get('validation_images')} validation images): "
          f"fp32 {q.get('fp32_top1', float('nan')):.4f}  int8 {q.get('int8_top1', float('nan')):.4f}  "
          f"delta {q.get('top1_delta_pp', float('nan')):+.2f} pp", flush=True)
    return {"checkpoint": checkpoint, **{k: v for k, v in q.items() if k != "path"}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both (default: all cores)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default: {','.join(MODELS)})")
    p.add_argument("--no-int8", action="store_true", help="skip the INT8 models")
    p.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                   help="a trained best.pth whose fp32 vs INT8 top-1 on its validation images is measured "
                        "(repeatable)")
    p.add_argument("--data", default=None, help="the data set of --checkpoint when not where it was trained")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<date>-<host>-infer.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [r for arch in args.models.split(",") for r in bench_model(arch, args.threads, args.quick,
                                                                          not args.no_int8)]
    accuracy = [int8_accuracy(path, args.data) for path in args.checkpoint]
    result = {**result_header("infer"), "machine": machine_info("torch", "onnxruntime"),
              "method": "median latency over reps after 5 warm-up runs; same thread count for torch eager "
                        "(inference_mode) and ONNX Runtime (CPU, ORT_ENABLE_ALL); random weights for speed; INT8 "
                        "is onnxruntime's static QDQ (per-channel INT8 weights, UINT8 activations), its accuracy "
                        "measured on trained checkpoints' validation images",
              "rows": rows, "int8_accuracy": accuracy}
    write_result(result, Path(args.out) if args.out else result_path("infer"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
