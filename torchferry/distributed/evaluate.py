"""`python -m distributed.evaluate CHECKPOINT [--data DIR]`: accuracy, per-class precision/recall,
the confusion matrix (printed and saved as PNG) and the most confused pairs of a checkpoint.

--data names the data to evaluate on (the checkpoint's own, another copy, or another labelled set with the
same classes); the split is rebuilt with the checkpoint's --seed and --val-split. A checkpoint does not
choose which files are read, so only one trained on the built-in digits may leave --data out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from typing import Any

import numpy as np
import torch

from torchferry.cli import Parser, add_debug_arguments, add_factory_argument, run_main
from torchferry.contract import TorchferryError
from torchferry.distributed.checkpoint import atomic_write_bytes, load_checkpoint, model_from_checkpoint
from torchferry.distributed.report import MAX_MATRIX_CLASSES, confusion_table, plot_confusion
from torchferry.distributed.tasks import task_for

_logger = logging.getLogger(__name__)


@torch.inference_mode()
def predict(model: torch.nn.Module, dataset: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) over a dataset."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    truth, preds = [], []
    for x, y in loader:
        preds.append(model(x).argmax(1).numpy())
        truth.append(np.asarray(y))
    return np.concatenate(truth), np.concatenate(preds)


def evaluate_checkpoint(path: str, data: str | None = None, batch_size: int = 64, *, factory: str | None = None,
                        val_data: str | None = None, image_root: str | None = None) -> dict[str, Any]:
    """The evaluation report of a checkpoint on its validation data (`factory`: the command line's --model)."""
    from sklearn.metrics import precision_recall_fscore_support

    checkpoint = load_checkpoint(path)
    task = task_for(checkpoint)
    if not task.classifier:
        raise TorchferryError(f"{path} is a {task.name} model; this report (accuracy, per-class table, confusion "
                              "matrix) is for classifiers: its validation figures are in metrics.csv, its ONNX parity "
                              "proof in python -m export.verify")
    model = model_from_checkpoint(checkpoint, factory=factory)
    val, source = task.validation_set(checkpoint, data, val_data, image_root)
    classes = list(checkpoint["classes"])
    truth, preds = predict(model, val, batch_size)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(truth, preds, labels=labels, zero_division=0)
    matrix, pairs = confusion(truth, preds, classes)
    return {
        # How many were looked at, named as the task names its inputs ("images": N, "texts": N) and "items" says.
        "checkpoint": os.path.abspath(path), "data": source, "items": task.items, task.items: len(truth),
        "accuracy": float(np.mean(truth == preds)),
        "per_class": [{"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for c, p, r, f, s in zip(classes, precision, recall, f1, support)],
        "confusion_matrix": None if matrix is None else matrix.tolist(), "classes": classes,
        "most_confused": [{"true": t, "predicted": p, "count": n} for n, t, p in pairs[:10]],
    }


def confusion(truth: np.ndarray, preds: np.ndarray, classes: list[str]) -> tuple[np.ndarray | None, list]:
    """The confusion matrix (None over MAX_MATRIX_CLASSES classes) and the (count, true, predicted) pairs of the
    mistakes, most frequent first, counted from the mistakes themselves."""
    from sklearn.metrics import confusion_matrix

    labels = list(range(len(classes)))
    matrix = confusion_matrix(truth, preds, labels=labels) if len(classes) <= MAX_MATRIX_CLASSES else None
    mistakes = Counter((int(t), int(p)) for t, p in zip(truth, preds) if t != p)
    return matrix, sorted(((n, classes[t], classes[p]) for (t, p), n in mistakes.items()), reverse=True)


def format_report(report: dict[str, Any]) -> str:
    """The printed summary: accuracy, per-class table, confusion matrix, most confused pairs."""
    classes = report["classes"]
    width = max(5, *(len(c) for c in classes))
    items = report["items"]
    lines = [f"accuracy {report['accuracy']:.4f} on {report[items]} {items} ({report['data']})", "",
             f"{'class':<{width}}  precision  recall     f1  support"]
    for row in report["per_class"]:
        lines.append(f"{row['class']:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:5.3f}"
                     f"  {row['support']:7d}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    if len(classes) <= 30:
        lines += confusion_table(report["confusion_matrix"], classes)
    lines += ["", "most confused (true -> predicted: count)"]
    lines += [f"  {p['true']} -> {p['predicted']}: {p['count']}" for p in report["most_confused"][:5]] or ["  none"]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    """`python -m distributed.evaluate` command line."""
    p = Parser(prog="python -m distributed.evaluate", description="Evaluate a torchferry "
                                "checkpoint on its validation data: accuracy, per-class precision/recall, "
                                "confusion matrix, most confused pairs.")
    p.add_argument("checkpoint", help="a torchferry checkpoint, e.g. runs/<name>/best.pth")
    p.add_argument("--data", default=None, help="data to evaluate on, in any --data layout; required unless the "
                   "checkpoint was trained on the built-in digits (a checkpoint does not choose which files are read)")
    p.add_argument("--val-data", help="the validation images, as at training (an annotation file "
                   "or a folder); without it the validation split of --data is rebuilt (default: none)")
    p.add_argument("--image-root", help="folder the annotation files' relative paths start from, as "
                   "at training (default: each annotation file's own folder)")
    add_factory_argument(p)
    p.add_argument("--output-dir", default=None, help="where confusion_matrix.png and evaluation.json go "
                   "(default: beside the checkpoint)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    add_debug_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit 0 with the report, 2 on bad input."""
    return run_main(get_args_parser(), _evaluate, argv)


def _evaluate(args: argparse.Namespace) -> int:
    report = evaluate_checkpoint(args.checkpoint, args.data, args.batch_size, factory=args.factory,
                                 val_data=args.val_data, image_root=args.image_root)
    out = os.path.abspath(args.output_dir or os.path.dirname(os.path.abspath(args.checkpoint)))
    written = [os.path.join(out, "evaluation.json")]
    if report["confusion_matrix"] is not None:
        written.insert(0, os.path.join(out, "confusion_matrix.png"))
        plot_confusion(np.asarray(report["confusion_matrix"]), report["classes"], written[0])
    atomic_write_bytes(written[-1], (json.dumps(report, indent=2) + "\n").encode())
    print(format_report(report))
    print(f"\nwrote {' and '.join(written)}" + ("" if len(written) == 2 else f" (no confusion matrix over "
                                                                                f"{MAX_MATRIX_CLASSES} classes)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
