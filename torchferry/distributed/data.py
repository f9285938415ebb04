"""Finding the data: ImageFolder trees, annotation files, the built-in digits, torchvision data sets.

`discover(cfg)` turns `--data` into a `DataSplit` (class names plus train and validation samples) and
checks it; the driver calls it before Ray starts so that bad data fails in seconds with one clear
message, and every worker calls it again (it is deterministic for a given `--seed`) to build its
datasets with `build_datasets`.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import pickle
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from torchvision import datasets

from torchferry.distributed import TorchferryError
from torchferry.distributed.config import TrainConfig, data_set_key, default_cache_dir

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
TORCHVISION_SETS = ("cifar10", "mnist", "fashionmnist", "flowers102")
FULL_CHECK_LIMIT = 50_000
DIGITS_VERSION = "digits-v1"

Sample = tuple[str, int]


@dataclass
class DataSplit:
    """Class names in index order and the samples of each part; torchvision sets keep their root."""

    classes: list[str]
    train: list[Sample] = field(default_factory=list)
    val: list[Sample] = field(default_factory=list)
    torchvision_name: str | None = None
    torchvision_root: str | None = None
    bad_images: list[tuple[str, str]] = field(default_factory=list)
    profile: dict[str, Any] | None = None

    def describe(self) -> str:
        """One line for the log: what was found."""
        if self.torchvision_name:
            return f"{self.torchvision_name} at {self.torchvision_root}: {len(self.classes)} classes"
        return (f"{len(self.classes)} classes, {len(self.train)} training and {len(self.val)} validation images"
                + (f", {len(self.bad_images)} unreadable left out" if self.bad_images else ""))


# ----------------------------------------------------------------------------------------------------
# discovery


def discover(cfg: TrainConfig) -> DataSplit:
    """Read `--data` (and `--val-data`) into a checked DataSplit; raises TorchferryError on bad data."""
    key = data_set_key(cfg.data)
    if key == "digits":
        split = _split_folder(materialize_digits(cfg.cache_dir), cfg)
    elif key in TORCHVISION_SETS:
        split = _torchvision_split(key, cfg)
    elif key == "annotations":
        split = _annotation_split(cfg)
    else:
        split = _folder_split(cfg)
    if len(split.classes) < 2:
        raise TorchferryError(f"found {len(split.classes)} class(es) in {cfg.data!r}; a classifier needs at least 2")
    if split.torchvision_name is None:
        if key != "digits":
            split = _check_split_images(split, cfg)
        for part, samples in (("training", split.train), ("validation", split.val)):
            if not samples:
                raise TorchferryError(f"no {part} images found in {cfg.data!r}")
    return split


GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
PROFILE_SAMPLE = 256


def image_profile(sizes_and_modes: Sequence[tuple[tuple[int, int], str]]) -> dict[str, Any] | None:
    """What the images are, for the defaults that fit them: how many were looked at, their median shorter
    side, and whether every one is grayscale (by PIL mode)."""
    if not sizes_and_modes:
        return None
    sides = sorted(min(size) for size, _ in sizes_and_modes)
    return {"images": len(sides), "median_side": int(sides[len(sides) // 2]),
            "grayscale": all(mode in GRAYSCALE_MODES for _, mode in sizes_and_modes)}


def _sample(paths: Sequence[str], limit: int) -> list[str]:
    step = max(1, len(paths) // limit)
    return list(paths[::step][:limit])


def _expand(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _folder_split(cfg: TrainConfig) -> DataSplit:
    root = _expand(cfg.data)
    if not os.path.exists(root):
        raise TorchferryError(f"--data {cfg.data!r} does not exist")
    if not os.path.isdir(root):
        raise TorchferryError(f"--data {cfg.data!r} is neither a directory nor an annotation file")
    train_dir = os.path.join(root, "train")
    val_dir = _expand(cfg.val_data) if cfg.val_data else None
    found_val = [os.path.join(root, n) for n in ("val", "validation") if os.path.isdir(os.path.join(root, n))]
    if os.path.isdir(train_dir):
        val_dir = val_dir or (found_val[0] if found_val else None)
        if val_dir:
            return _folder_pair(train_dir, val_dir, cfg.allow_small_classes)
        return _split_folder(train_dir, cfg)
    if found_val and not val_dir:
        # DIR/<class>/* beside DIR/val/: "val" would become a class holding the validation images.
        raise TorchferryError(f"{root!r} has a {os.path.basename(found_val[0])}/ folder but no train/ folder; move "
                              "the training classes under train/, or pass --val-data")
    if val_dir:
        return _folder_pair(root, val_dir, cfg.allow_small_classes)
    return _split_folder(root, cfg)


def _find_classes(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise TorchferryError(f"{directory!r} is not a directory")
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def file_identity(path: str) -> tuple[Any, ...]:
    """What makes two paths the same file (device and inode through links), or its real path when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return (st.st_dev, st.st_ino)


def _walk_once(top: str, stop: set[tuple[Any, ...]]) -> list[str]:
    """Image files under `top`, symlinked folders followed but each real folder walked once (loops end), and
    none of the folders in `stop` (the data root and the class folders) entered from below."""
    seen = set(stop)
    found: list[str] = []
    for dirpath, dirnames, files in os.walk(top, followlinks=True):
        kept = []
        for d in sorted(dirnames):
            key = file_identity(os.path.join(dirpath, d))
            if key not in seen:
                seen.add(key)
                kept.append(d)
        dirnames[:] = kept
        found += [os.path.join(dirpath, f) for f in files if f.lower().endswith(IMG_EXTENSIONS)]
    return sorted(found)


def _scan_folder(directory: str, classes: list[str]) -> list[Sample]:
    """(path, label) of each real image file once; one file under two classes (through links) is an error."""
    class_dirs = [os.path.join(directory, name) for name in classes]
    stop = {file_identity(directory), *(file_identity(d) for d in class_dirs if os.path.isdir(d))}
    samples = [(path, index) for index, class_dir in enumerate(class_dirs) if os.path.isdir(class_dir)
               for path in _walk_once(class_dir, stop)]
    return _unique_samples(samples, classes, directory)


def _require_disjoint(train: Sequence[Sample], val: Sequence[Sample]) -> None:
    """A file in both the training and the validation data would make the validation score meaningless."""
    train_files = {file_identity(p): p for p, _ in train}
    both = [(train_files[file_identity(p)], p) for p, _ in val if file_identity(p) in train_files]
    if both:
        raise TorchferryError(f"{len(both)} file(s) are in both the training and the validation data, e.g. "
                              f"{both[0][0]!r} (also {both[0][1]!r}); keep each image in one of them")


def _folder_pair(train_dir: str, val_dir: str, allow_small: bool = False) -> DataSplit:
    # A --val-data folder inside the training tree is not a class.
    classes = [c for c in _find_classes(train_dir) if os.path.abspath(os.path.join(train_dir, c)) != val_dir]
    val_classes = _find_classes(val_dir)
    extra = sorted(set(val_classes) - set(classes))
    if extra:
        raise TorchferryError(f"validation classes {extra} in {val_dir!r} are not among the training classes "
                              f"in {train_dir!r}")
    train = _scan_folder(train_dir, classes)
    _require_every_class(train, classes, train_dir, allow_small)
    val = _scan_folder(val_dir, classes)
    _require_disjoint(train, val)
    return DataSplit(classes=classes, train=train, val=val)


def _require_every_class(samples: Sequence[Sample], classes: list[str], where: str, allow_small: bool = False) -> None:
    counts = Counter(label for _, label in samples)
    empty = [c for i, c in enumerate(classes) if counts[i] == 0]
    if empty:
        raise TorchferryError(f"classes {empty} have no images in {where!r} (extensions: {', '.join(IMG_EXTENSIONS)})")
    single = [c for i, c in enumerate(classes) if counts[i] < 2]
    if single and not allow_small:
        raise TorchferryError(f"classes {single} have a single image in {where!r}; a class needs at least 2, or "
                              "pass --allow-small-classes to train such classes")


def _split_folder(root: str, cfg: TrainConfig) -> DataSplit:
    classes = _find_classes(root)
    if len(classes) < 2:
        raise TorchferryError(f"found {len(classes)} class folder(s) in {root!r}; expected DIR/<class>/* with at "
                              "least 2 classes, or DIR/train/<class>/* and DIR/val/<class>/*")
    samples = _scan_folder(root, classes)
    _require_every_class(samples, classes, root, cfg.allow_small_classes)
    train, val = stratified_split(samples, cfg.val_split, cfg.seed)
    return DataSplit(classes=classes, train=train, val=val)


def stratified_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out `val_fraction` of each class, the same way for the same seed (scikit-learn's split).

    A class with a single image (allowed by --allow-small-classes) has nothing to hold out: it trains.
    """
    from sklearn.model_selection import train_test_split

    counts = Counter(label for _, label in samples)
    single = [s for s in samples if counts[s[1]] < 2]
    samples = [s for s in samples if counts[s[1]] >= 2]
    labels = [label for _, label in samples]
    try:
        train, val = train_test_split(samples, test_size=val_fraction, random_state=seed, stratify=labels)
    except ValueError as exc:
        raise TorchferryError(f"cannot split off a stratified validation set with --val-split {val_fraction}: "
                              f"{exc}; add images, change --val-split or give --val-data") from None
    return sorted(train + single), sorted(val)


def _annotation_split(cfg: TrainConfig) -> DataSplit:
    path = _expand(cfg.data)
    root = _expand(cfg.image_root) if cfg.image_root else os.path.dirname(path)
    rows = _read_annotation_rows(path, root)
    val_rows = None
    if cfg.val_data:
        val_path = _expand(cfg.val_data)
        if not os.path.isfile(val_path):
            raise TorchferryError(f"--val-data {cfg.val_data!r} is not a file")
        val_rows = _read_annotation_rows(val_path, _expand(cfg.image_root) if cfg.image_root
                                         else os.path.dirname(val_path))
    classes = sort_labels({label for _, label, _ in rows})
    if val_rows is not None:
        known = set(classes)
        extra = [(label, line) for _, label, line in val_rows if label not in known]
        if extra:
            raise TorchferryError(f"validation labels {sorted({label for label, _ in extra})} in {cfg.val_data!r} "
                                  f"do not occur in {cfg.data!r} (the first at line {extra[0][1]})")
    if len(classes) >= 2:
        _require_two_per_label(rows, path, cfg.allow_small_classes)
    index = {name: i for i, name in enumerate(classes)}
    samples = [(p, index[label]) for p, label, _ in rows]
    samples = _unique_samples(samples, classes, cfg.data)
    if val_rows is None:
        train, val = (stratified_split(samples, cfg.val_split, cfg.seed) if len(classes) >= 2
                      else (samples, []))
    else:
        train = samples
        val = _unique_samples([(p, index[label]) for p, label, _ in val_rows], classes, str(cfg.val_data))
        _require_disjoint(train, val)
    return DataSplit(classes=classes, train=train, val=val)


def _unique_samples(samples: list[Sample], classes: list[str], where: str) -> list[Sample]:
    """Each real file once (an annotation file may list it twice, a link may reach it again); under two labels
    it is an error."""
    owner: dict[tuple[Any, ...], Sample] = {}
    unique: list[Sample] = []
    for path, label in samples:
        key = file_identity(path)
        if key in owner:
            if owner[key][1] != label:
                raise TorchferryError(f"{where}: {owner[key][0]!r} and {path!r} are the same file in classes "
                                      f"{classes[owner[key][1]]!r} and {classes[label]!r}; an image has one label")
            continue
        owner[key] = (path, label)
        unique.append((path, label))
    return unique


def _require_two_per_label(rows: Sequence[tuple[str, str, int]], path: str, allow: bool) -> None:
    """A label with a single image is most often a typo; name it and its line (issue 14)."""
    counts = Counter(label for _, label, _ in rows)
    small = [label for label, n in counts.items() if n < 2]
    if not small or allow:
        return
    first = {label: line for _, label, line in reversed(rows)}
    named = ", ".join(f"{label!r} ({counts[label]} image, {path}:{first[label]})"
                      for label in sorted(small, key=first.__getitem__)[:3])
    raise TorchferryError(f"label(s) {named}{' ...' if len(small) > 3 else ''} with fewer than 2 images: a mistyped "
                          "label? Fix the line, or pass --allow-small-classes to train such classes")


def read_annotations(path: str, image_root: str) -> list[tuple[str, str]]:
    """(absolute path, label) rows of a CSV with path,label columns or of 'relative/path label' lines."""
    return [(p, label) for p, label, _ in _read_annotation_rows(path, image_root)]


def _read_annotation_rows(path: str, image_root: str) -> list[tuple[str, str, int]]:
    """(absolute path, label, line number) rows of an annotation file."""
    if not os.path.isfile(path):
        raise TorchferryError(f"annotation file {path!r} does not exist")
    rows: list[tuple[str, str, int]] = []
    # utf-8-sig: a CSV saved by a spreadsheet starts with a byte-order mark, which is not part of the header.
    with open(path, newline="", encoding="utf-8-sig") as f:
        if path.lower().endswith(".csv"):
            reader = csv.DictReader(f)
            columns = {c.strip().lower(): c for c in (reader.fieldnames or [])}
            if "path" not in columns or "label" not in columns:
                raise TorchferryError(f"{path}: a CSV annotation file needs 'path' and 'label' columns, "
                                      f"found {reader.fieldnames}")
            for row in reader:
                rel, label = (row[columns["path"]] or "").strip(), (row[columns["label"]] or "").strip()
                if not rel or not label:
                    raise TorchferryError(f"{path}:{reader.line_num}: empty path or label")
                rows.append((os.path.join(image_root, rel), label, reader.line_num))
        else:
            for lineno, line in enumerate(f, 1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                parts = text.rsplit(None, 1)
                if len(parts) != 2:
                    raise TorchferryError(f"{path}:{lineno}: expected 'relative/path label', got {text!r}")
                rows.append((os.path.join(image_root, parts[0]), parts[1], lineno))
    if not rows:
        raise TorchferryError(f"annotation file {path!r} lists no images")
    return rows


def sort_labels(labels: set[str]) -> list[str]:
    """Class order: numeric when every label is an integer (so '10' follows '9'), else alphabetical."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


# ----------------------------------------------------------------------------------------------------
# checking images


_Inspection = tuple[str | None, tuple[int, int], str]


def _check_one(path: str, full: bool) -> _Inspection:
    """(reason it cannot be read or None, size, PIL mode) of one image."""
    try:
        with Image.open(path) as img:
            size, mode = img.size, img.mode
            if full:
                img.load()
            else:
                img.verify()
    except Exception as exc:  # noqa: BLE001 - any failure to read is a bad image, reported by path
        return f"{type(exc).__name__}: {exc}", (0, 0), ""
    return None, size, mode


def _inspect_images(paths: Sequence[str], full: bool) -> list[_Inspection]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 4)) as pool:
            return list(pool.map(lambda p: _check_one(p, full), paths))


def find_bad_images(paths: Sequence[str], mode: str) -> list[tuple[str, str]]:
    """(path, reason) for every image that cannot be read; mode full/header/auto/none."""
    if mode == "none" or not paths:
        return []
    full = mode == "full" or (mode == "auto" and len(paths) <= FULL_CHECK_LIMIT)
    return [(p, r) for p, (r, _, _) in zip(paths, _inspect_images(paths, full)) if r is not None]


def _check_split_images(split: DataSplit, cfg: TrainConfig) -> DataSplit:
    """Refuse (or with --skip-bad-images leave out) unreadable images; note what the readable ones are.

    The check opens every image anyway, so their sizes and modes come for free (`DataSplit.profile`);
    with --check-images none a sample of headers is read for them.
    """
    paths = [p for p, _ in split.train + split.val]
    if cfg.check_images == "none":
        looked = _inspect_images(_sample([p for p, _ in split.train], PROFILE_SAMPLE), full=False)
        bad: list[tuple[str, str]] = []
    else:
        full = cfg.check_images == "full" or (cfg.check_images == "auto" and len(paths) <= FULL_CHECK_LIMIT)
        looked = _inspect_images(paths, full)
        bad = [(p, r) for p, (r, _, _) in zip(paths, looked) if r is not None]
    split.profile = image_profile([(size, mode) for r, size, mode in looked if r is None])
    if not bad:
        return split
    listing = "; ".join(f"{p} ({r})" for p, r in bad[:3]) + (" ..." if len(bad) > 3 else "")
    if not cfg.skip_bad_images:
        raise TorchferryError(f"{len(bad)} unreadable image(s): {listing}; fix or remove them, or pass "
                              "--skip-bad-images to leave them out")
    _logger.warning("leaving out %d unreadable image(s): %s", len(bad), listing)
    bad_paths = {p for p, _ in bad}
    split.train = [s for s in split.train if s[0] not in bad_paths]
    split.val = [s for s in split.val if s[0] not in bad_paths]
    split.bad_images = bad
    return split


# ----------------------------------------------------------------------------------------------------
# the built-in digits and torchvision's data sets


def materialize_digits(cache_dir: str) -> str:
    """Write scikit-learn's 1,797 handwritten digits once as 8×8 PNGs in DIR/<digit>/; returns DIR."""
    root = _expand(cache_dir)
    if os.path.exists(root) and not os.path.isdir(root):
        raise TorchferryError(f"--cache-dir {cache_dir!r} is not a directory")
    target = os.path.join(root, DIGITS_VERSION)
    if os.path.isfile(os.path.join(target, ".complete")):
        return target
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise TorchferryError(f"--cache-dir {cache_dir!r}: cannot create it ({exc.strerror})") from None
    from sklearn.datasets import load_digits

    bunch = load_digits()
    try:
        tmp = tempfile.mkdtemp(prefix=".digits-", dir=root)
    except OSError as exc:
        raise TorchferryError(f"--cache-dir {cache_dir!r}: cannot write there ({exc.strerror})") from None
    try:
        for i, (pixels, label) in enumerate(zip(bunch.images, bunch.target)):
            class_dir = os.path.join(tmp, str(int(label)))
            os.makedirs(class_dir, exist_ok=True)
            # sklearn stores 0..16 ink levels; scale to 0..255 gray (white ink on black, as the scans).
            Image.fromarray((pixels * (255.0 / 16.0)).round().astype("uint8"), mode="L").save(
                os.path.join(class_dir, f"{i:04d}.png"))
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.rename(tmp, target)
        except OSError:
            # Another worker finished first: its complete copy wins.
            if not os.path.isfile(os.path.join(target, ".complete")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def checkpoint_data_config(checkpoint: dict[str, Any], data: str | None, val_data: str | None = None,
                           image_root: str | None = None) -> TrainConfig:
    """The training config of a checked checkpoint, as a command that reads its data (evaluate, export) uses it.

    A checkpoint is a file, not the operator: it never chooses which files are read nor where anything is
    written. Its recorded data are read only when `data` (the command's --data) names them again, the
    built-in digits aside; its --val-data and --image-root are replaced by the command's own (none unless
    given); the digits cache is the operator's ($TORCHFERRY_CACHE, or ~/.cache/torchferry), never the one it
    recorded. Its seed and --val-split stay, so that the same validation split is rebuilt.
    """
    cfg = TrainConfig.from_dict(dict(checkpoint["config"]))
    if not data and data_set_key(cfg.data) != "digits":
        raise TorchferryError(f"the checkpoint was trained on {cfg.data[:200]!r}; pass --data to read it (a "
                              "checkpoint alone does not choose which files are read)")
    if (val_data or image_root) and not data:
        raise TorchferryError("--val-data and --image-root go with --data")
    absolute = {k: os.path.abspath(os.path.expanduser(v)) if v else None
                for k, v in (("val_data", val_data), ("image_root", image_root))}
    return dataclasses.replace(cfg, data=data or cfg.data, **absolute, check_images="none", download=False,
                               cache_dir=default_cache_dir())


def _torchvision_dataset(name: str, root: str, train: bool, download: bool) -> Any:
    if name == "cifar10":
        return LocalCIFAR10(root, train=train, download=download)
    if name == "mnist":
        return datasets.MNIST(root, train=train, download=download)
    if name == "fashionmnist":
        return datasets.FashionMNIST(root, train=train, download=download)
    return datasets.Flowers102(root, split="train" if train else "val", download=download)


class LocalCIFAR10(datasets.CIFAR10):
    """CIFAR-10 read from a local root; a copy whose md5 differs (re-packed, a subset) is used with a warning."""

    def _check_integrity(self) -> bool:
        if super()._check_integrity():
            return True
        files = [os.path.join(self.root, self.base_folder, f) for f, _ in self.train_list + self.test_list]
        present = all(os.path.isfile(f) for f in files)
        if present:
            _logger.warning("CIFAR-10 files in %s do not match the published md5 sums; using them as they are",
                            self.root)
        return present

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        if not os.path.isfile(path):
            raise RuntimeError(f"CIFAR-10 metadata file {path} not found")
        with open(path, "rb") as f:
            # The CIFAR-10 format is a pickle; torchvision reads it the same way from the user's own root.
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def _one_line(exc: object) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def _torchvision_split(name: str, cfg: TrainConfig) -> DataSplit:
    root = _expand(cfg.data.split(":", 1)[1])
    if not cfg.download and not os.path.isdir(root):
        raise TorchferryError(f"{name} root {root!r} does not exist; pass --download to fetch it there")
    try:
        train = _torchvision_dataset(name, root, train=True, download=cfg.download)
        _torchvision_dataset(name, root, train=False, download=False)
    except (OSError, RuntimeError) as exc:  # urllib's URLError and socket errors are OSErrors
        fetching = cfg.download and (isinstance(exc, OSError) or "download" in str(exc).lower())
        if not fetching:
            raise TorchferryError(f"cannot read {name} from {root!r}: {_one_line(exc)}") from None
        reason = getattr(exc, "reason", None) or exc
        raise TorchferryError(f"--download: cannot fetch {name} into {root!r} ({_one_line(reason)}); check the "
                              "network or proxy, or put the files there and leave out --download") from None
    classes = [str(c) for c in getattr(train, "classes", [])] or [str(i) for i in range(102)]
    return DataSplit(classes=classes, torchvision_name=name, torchvision_root=root)


# ----------------------------------------------------------------------------------------------------
# datasets


def load_image(path: str, channels: int) -> Image.Image:
    """Open an image as the model sees it: EXIF orientation applied, first frame, L or RGB.

    16-bit grayscale is scaled to 8 bits (not clipped); `serve/images.py` does the same for clients.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), mode="L")
        return img.convert("L" if channels == 1 else "RGB")


class ImageListDataset:
    """(path, label) samples read with `load_image` and transformed; a bad file is named in the error."""

    def __init__(self, samples: Sequence[Sample], channels: int, transform: Callable | None = None):
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.channels = channels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            img = load_image(path, self.channels)
        except Exception as exc:
            raise RuntimeError(f"cannot read image {path}: {exc}") from exc
        return (self.transform(img) if self.transform else img), label


class ConvertedDataset:
    """A torchvision data set whose PIL images are converted to L/RGB, then transformed."""

    def __init__(self, dataset: Any, channels: int, transform: Callable | None = None):
        self.dataset = dataset
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, label = self.dataset[index]
        img = img.convert(self.mode)
        return (self.transform(img) if self.transform else img), int(label)


def build_datasets(split: DataSplit, channels: int, train_transform: Callable | None,
                   eval_transform: Callable | None, download: bool = False) -> tuple[Any, Any]:
    """Training and validation datasets with their transforms."""
    if split.torchvision_name:
        name, root = split.torchvision_name, split.torchvision_root
        assert root is not None
        return (ConvertedDataset(_torchvision_dataset(name, root, True, download), channels, train_transform),
                ConvertedDataset(_torchvision_dataset(name, root, False, False), channels, eval_transform))
    return (ImageListDataset(split.train, channels, train_transform),
            ImageListDataset(split.val, channels, eval_transform))
