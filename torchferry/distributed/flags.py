"""The `python -m distributed.launch` command line: one flag per TrainConfig field, each saying its default.

`config_from_args` turns the command line into a `TrainConfig`; everything that depends on the data is
resolved later (`config.resolve_defaults`). Importing this module loads neither torch nor Ray, so `--help`
answers at once.
"""

from __future__ import annotations

import argparse

from torchferry.cli import Parser, add_debug_arguments
from torchferry.contract import TASKS
from torchferry.distributed.config import (
    CHECK_IMAGES,
    DEFAULT_MODELS,
    DEFAULT_OPTIMIZERS,
    LOSSES,
    OPTIMIZERS,
    SCHEDULERS,
    TrainConfig,
    infer_task,
)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def get_args_parser() -> argparse.ArgumentParser:
    """The `python -m distributed.launch` command line; every flag says its default."""
    d = TrainConfig()
    p = Parser(
        prog="python -m distributed.launch",
        description="Train an image classifier (or a tabular regression, --task tabular) with Ray Train (DDP "
        "over GPU or CPU workers) and keep the best checkpoint by its validation figure (val_acc, val_rmse) in "
        "runs/<name>/best.pth.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m distributed.launch --gpus 0 --workers 2      # CPU, built-in digits\n"
        "  python -m distributed.launch --gpus 2 --data ~/flowers --model resnet50 --pretrained DEFAULT --epochs 30\n"
        "  python -m distributed.launch --data cifar10:~/datasets/cifar10 --model resnet18\n"
        "  python -m distributed.launch --data diabetes                   # tabular regression, built-in\n"
        "  python -m distributed.launch --data table.csv --target temp    # tabular regression on a CSV",
    )
    g = p.add_argument_group("task")
    g.add_argument("--task", choices=TASKS, default=None, help="what to learn: image classification, tabular "
                   "regression or text classification (default: tabular for --data diabetes or with --target, text "
                   "for a CSV with a 'text' column, else image)")
    g.add_argument("--target", default=None, help="tabular: the CSV column to predict (default: none; "
                   "'target' for the built-in diabetes set)")
    g.add_argument("--categorical", type=_names, default=[], help="tabular: comma-separated columns to one-hot "
                   "encode (default: every column whose values are not all numbers)")
    g.add_argument("--loss", choices=LOSSES, default=None, help="tabular: mse or huber on the standardised "
                   "target (default: mse)")
    g.add_argument("--huber-delta", type=float, default=d.huber_delta, help="tabular: Huber's delta, in "
                   f"standard deviations of the target (default: {d.huber_delta:g})")
    text_flags = {"--max-length": "text: tokens per text, the rest cut off, shorter texts padded",
                  "--vocab-size": "text: vocabulary entries, <pad> and <unk> included, the most frequent training "
                  "tokens",
                  "--min-freq": "text: a token enters the vocabulary when the training texts hold it this many times"}
    for flag, what in text_flags.items():
        default = getattr(d, flag[2:].replace("-", "_"))
        g.add_argument(flag, type=int, default=default, help=f"{what} (default: {default:,})")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="'digits' (built-in, default), an ImageFolder directory "
                   "(DIR/train/<class>, DIR/val/<class>, or DIR/<class> split by --val-split), an annotation "
                   "file ('relative/path label' lines, or a CSV with path,label columns), or a torchvision data "
                   "set read from a local root: cifar10:DIR, mnist:DIR, fashionmnist:DIR, flowers102:DIR; for the text "
                   "task a CSV with text,label columns")
    g.add_argument("--val-data", default=None, help="validation annotation file or directory; without it "
                   "the validation set comes from the data layout or from --val-split (default: none)")
    g.add_argument("--image-root", default=None, help="directory that annotation-file paths are relative to "
                   "(default: the annotation file's directory)")
    g.add_argument("--val-split", type=float, default=d.val_split, help="fraction of each class held out "
                   f"for validation when the data has no validation part; stratified, by --seed (default: {d.val_split})")
    g.add_argument("--download", action="store_true", help="let torchvision download a named data set into "
                   "its root (default: read local files only)")
    g.add_argument("--cache-dir", default=d.cache_dir, help="where the built-in digits set is written as PNGs "
                   "(default: $TORCHFERRY_CACHE or ~/.cache/torchferry)")
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader processes per training "
                   f"worker (default: {d.num_workers})")
    g.add_argument("--check-images", choices=CHECK_IMAGES, default=d.check_images, help="check images before "
                   "training: full decode, header only, or none; auto decodes fully up to 50,000 images and "
                   "reads headers above that (default: auto)")
    g.add_argument("--skip-bad-images", action="store_true", help="leave out unreadable images (they are "
                   "counted and reported) instead of stopping (default: stop)")
    g.add_argument("--allow-small-classes", action="store_true", help="train classes that have a single image "
                   "(default: refuse them, naming the label and its line: most often a mistyped label)")
    g.add_argument("--image-size", type=int, default=None, help="training/eval crop size in pixels (default: "
                   "the pretrained weights' size, 32 for digits and cifar10, 28 for mnist; for a folder or annotation "
                   "file, from its images: the median side rounded up to a multiple of 8, at least 32, at most 224)")
    g.add_argument("--resize-size", type=int, default=None, help="eval: resize the shorter side to this before "
                   "the center crop (default: the weights' value, else image-size × 256/224; = image-size for small sets)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None, help="input channels (default: 1 for "
                   "grayscale sets and grayscale images with smallcnn or your own 1-channel model, else 3)")
    g.add_argument("--mean", type=_floats, default=None, help="normalisation mean, comma-separated (default: "
                   "the weights' value, ImageNet's for 3 channels, 0.5 for 1)")
    g.add_argument("--std", type=_floats, default=None, help="normalisation std, comma-separated (default: as --mean)")
    g.add_argument("--hflip", type=float, default=None, help="horizontal flip probability (default: 0.5; "
                   "0 for digits, mnist and small grayscale images)")
    g.add_argument("--rotation", type=float, default=None, help="random rotation range in degrees (default: "
                   "10 for digits, mnist and small grayscale images, else 0)")
    g.add_argument("--color-jitter", type=float, default=d.color_jitter, help="brightness/contrast/saturation "
                   f"jitter strength (default: {d.color_jitter})")
    g.add_argument("--crop-scale-min", type=float, default=None, help="smallest area fraction of the random "
                   "resized crop (default: 0.08 as torchvision's reference; 0.5 for small images, 64 px or less)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="smallcnn (default), a torchvision classification model by "
                   "name (resnet18, resnet50, mobilenet_v3_small, efficientnet_b0, convnext_tiny, vit_b_16, ...), "
                   "or package.module:factory for your own nn.Module, called with num_classes=; tabular: mlp "
                   "(default) or package.module:factory, called with in_features= and out_features=1")
    g.add_argument("--pretrained", default=None, help="DEFAULT or a torchvision weights enum name "
                   "(IMAGENET1K_V2, ...) or a local .pth state dict; the head is replaced for your classes "
                   "(default: random init)")
    g.add_argument("--freeze-backbone", action="store_true", help="train the classification head only (default: off)")
    g.add_argument("--unfreeze-at-epoch", type=int, default=None, help="with --freeze-backbone: from this epoch "
                   "(0-based) train everything at --finetune-lr (default: never)")
    g.add_argument("--finetune-lr", type=float, default=None, help="learning rate after --unfreeze-at-epoch "
                   "(default: --lr / 10)")

    g.add_argument("--init-from", default=None, help="start from another torchferry checkpoint's weights "
                   "(fine-tuning; a new head when its classes differ). Not --resume: the schedule starts afresh "
                   "(default: none)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs to train (default: {d.epochs})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size, split evenly over "
                   f"the workers (default: {d.batch_size})")
    g.add_argument("--opt", choices=OPTIMIZERS, default=None, help=f"optimizer (default: {d.opt} for images, "
                   "adam for tables)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: sgd 0.1 × batch-size/256, "
                   "the linear scaling rule; adam/adamw 1e-3)")
    g.add_argument("--momentum", type=float, default=d.momentum, help=f"SGD momentum (default: {d.momentum})")
    g.add_argument("--weight-decay", "--wd", type=float, default=d.weight_decay,
                   help=f"weight decay (default: {d.weight_decay})")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help=f"label smoothing for the cross-entropy loss (default: {d.label_smoothing})")
    g.add_argument("--lr-scheduler", choices=SCHEDULERS, default=d.lr_scheduler, help="learning-rate "
                   f"schedule, stepped once per epoch (default: {d.lr_scheduler})")
    g.add_argument("--lr-warmup-epochs", type=int, default=d.lr_warmup_epochs, help="linear warm-up epochs "
                   f"before the schedule (default: {d.lr_warmup_epochs})")
    g.add_argument("--lr-warmup-decay", type=float, default=d.lr_warmup_decay, help="warm-up starts at "
                   f"lr × this (default: {d.lr_warmup_decay})")
    g.add_argument("--lr-step-size", type=int, default=d.lr_step_size, help="step: epochs between decays "
                   f"(default: {d.lr_step_size})")
    g.add_argument("--lr-milestones", type=_ints, default=[], help="multistep: comma-separated epochs to decay at")
    g.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help=f"step/multistep/plateau decay factor "
                   f"(default: {d.lr_gamma})")
    g.add_argument("--lr-min", type=float, default=d.lr_min, help=f"cosine: final learning rate (default: {d.lr_min})")
    g.add_argument("--plateau-patience", type=int, default=d.plateau_patience, help="plateau: epochs without "
                   f"val_loss improvement before decaying (default: {d.plateau_patience})")
    g.add_argument("--amp", action="store_true", help="mixed precision: bf16 autocast (fp16 with GradScaler "
                   "on GPUs without bf16), channels_last on GPU (default: off)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model on each worker (default: off)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="channels_last "
                   "memory format for model and image batches (default: on for CPU workers and with --amp on GPU, else off)")
    g.add_argument("--gpu-decode", action="store_true", help="decode the training JPEGs on the GPU in batches (nvJPEG) "
                   "and crop and flip them there; needs --gpus (default: off, DataLoader workers decode them)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"seed for the split, init and shuffling (default: {d.seed})")

    g = p.add_argument_group("cluster and run")
    g.add_argument("--gpus", type=int, default=d.gpus, help="GPU workers, one GPU each, DDP over NCCL; 0 "
                   f"trains on CPU workers over gloo (default: {d.gpus})")
    g.add_argument("--workers", type=int, default=d.workers, help=f"CPU workers when --gpus 0 (default: {d.workers})")
    g.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker, help="CPUs reserved per worker; "
                   f"also its torch thread count (default: {d.cpus_per_worker:g})")
    g.add_argument("--placement-strategy", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                   default=d.placement_strategy, help="how Ray places the workers on nodes; STRICT_SPREAD puts each "
                   f"on its own node (default: {d.placement_strategy})")
    g.add_argument("--address", default=None, help="join a running Ray cluster: auto, HOST:6379 or "
                   "ray://HOST:10001 (default: $RAY_ADDRESS, else start a local Ray bound to 127.0.0.1)")
    g.add_argument("--storage", default=None, help="where Ray keeps checkpoints: a local dir, s3:// or gs://; "
                   "must be shared on several nodes (default: --output-dir)")
    g.add_argument("--name", default=None, help="run name: outputs go to <output-dir>/<name> "
                   "(default: <model>-<data>-<time>)")
    g.add_argument("--output-dir", default=d.output_dir, help=f"parent of run directories (default: {d.output_dir})")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints Ray keeps, the "
                   f"best by val_acc; the latest is always kept too (default: {d.keep_checkpoints})")
    g.add_argument("--max-failures", type=int, default=d.max_failures, help="worker failures to recover from "
                   f"by restarting from the latest checkpoint (default: {d.max_failures})")
    g.add_argument("--no-resource-check", dest="resource_check", action="store_false", help="skip the check "
                   "that the cluster has the CPUs/GPUs asked for (for autoscaling clusters; default: check)")
    g.add_argument("--resume", action="store_true", help="continue the run --name in --output-dir from its latest "
                   "checkpoint, with the configuration it was started with (default: start a new run)")
    g.add_argument("--progress", choices=("auto", "on", "off"), default=d.progress, help="progress bar on "
                   "rank 0 while an epoch runs; auto shows it on an interactive terminal (default: auto)")
    add_debug_arguments(g, verbose="more log output, Ray's included")
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line into a TrainConfig (not yet resolved against the data)."""
    return config_from_namespace(get_args_parser().parse_args(argv))


def config_from_namespace(ns: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed launcher flags: the task they imply, and its default model and optimizer."""
    if ns.task is None:
        ns.task = infer_task(ns.data, ns.target)
    ns.model = ns.model or DEFAULT_MODELS.get(ns.task, TrainConfig.model)
    ns.opt = ns.opt or DEFAULT_OPTIMIZERS.get(ns.task, TrainConfig.opt)
    return TrainConfig(**vars(ns))
