"""Finding the samples of a folder or an annotation file: classes, training and validation parts, checked.

An ImageFolder tree (DIR/train/<class> and DIR/val/<class>, or DIR/<class> split by `--val-split`) or an
annotation file ('relative/path label' lines, or a CSV with path,label columns) becomes a `DataSplit`.
Each real file counts once however it is reached (links, repeated lines); a file under two labels, in both
parts, or a class too small to learn is refused with a message naming it. `data.discover` calls these.
"""

from __future__ import annotations

import csv
import os
import stat
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torchferry.distributed import TorchferryError
from torchferry.distributed.config import TrainConfig, absolute_path

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

Sample = tuple[str, int]


# The most characters one field of a CSV that the tabular or text task reads may hold (csv's own default is
# 131,072): a text of a text CSV may be long. The csv module's limit is process-wide, so it is set here alone.
MAX_CSV_FIELD = 1_000_000


def csv_reader(f: Any, *, columns: bool = False, strict: bool = False) -> Any:
    """A csv reader of the open file `f` (a DictReader when `columns`) whose fields may hold MAX_CSV_FIELD characters."""
    csv.field_size_limit(MAX_CSV_FIELD)
    return csv.DictReader(f, strict=strict) if columns else csv.reader(f, strict=strict)


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


def folder_split(cfg: TrainConfig) -> DataSplit:
    """An ImageFolder tree `--data` (with `--val-data`): DIR/train + DIR/val, or DIR/<class> split by --val-split."""
    root = absolute_path(cfg.data)
    if not os.path.exists(root):
        raise TorchferryError(f"--data {cfg.data!r} does not exist")
    if not os.path.isdir(root):
        raise TorchferryError(f"--data {cfg.data!r} is neither a directory nor an annotation file")
    train_dir = os.path.join(root, "train")
    val_dir = absolute_path(cfg.val_data) if cfg.val_data else None
    found_val = [os.path.join(root, n) for n in ("val", "validation") if os.path.isdir(os.path.join(root, n))]
    if os.path.isdir(train_dir):
        val_dir = val_dir or (found_val[0] if found_val else None)
        if val_dir:
            return _folder_pair(train_dir, val_dir, cfg.allow_small_classes)
        return split_folder(train_dir, cfg)
    if found_val and not val_dir:
        # DIR/<class>/* beside DIR/val/: "val" would become a class holding the validation images.
        raise TorchferryError(f"{root!r} has a {os.path.basename(found_val[0])}/ folder but no train/ folder; move "
                              "the training classes under train/, or pass --val-data")
    if val_dir:
        return _folder_pair(root, val_dir, cfg.allow_small_classes)
    return split_folder(root, cfg)


def _find_classes(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise TorchferryError(f"{directory!r} is not a directory")
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def require_regular_file(path: str) -> None:
    """TorchferryError when `path` exists but is no regular file: a FIFO named like an image would block its reader
    for ever, a device (/dev/zero) never end the read."""
    try:
        mode = os.stat(path).st_mode  # one stat: this runs for every image an epoch reads
    except OSError:
        return  # missing or unreadable: the reader says why
    if not stat.S_ISREG(mode):
        raise TorchferryError(f"{path} is not a regular file (a FIFO, a socket or a device)")


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
        found += [path for path in (os.path.join(dirpath, f) for f in files if f.lower().endswith(IMG_EXTENSIONS))
                  if os.path.isfile(path)]  # regular files: a FIFO or device named x.png is no image
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


def split_folder(root: str, cfg: TrainConfig) -> DataSplit:
    """ROOT/<class>/* with a stratified validation part held out (`stratified_split`)."""
    classes = _find_classes(root)
    if len(classes) < 2:
        raise TorchferryError(f"found {len(classes)} class folder(s) in {root!r}; expected DIR/<class>/* with at "
                              "least 2 classes, or DIR/train/<class>/* and DIR/val/<class>/*")
    samples = _scan_folder(root, classes)
    _require_every_class(samples, classes, root, cfg.allow_small_classes)
    train, val = stratified_split(samples, cfg.val_split, cfg.seed)
    return DataSplit(classes=classes, train=train, val=val)


def stratified_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out `val_fraction` of each class, the same way for the same seed.

    The images held out are exactly those of scikit-learn's `train_test_split(samples, test_size=val_fraction,
    random_state=seed, stratify=labels)` (its StratifiedShuffleSplit, step for step on numpy's RandomState;
    tests/test_data.py compares the two), without importing scikit-learn's model_selection and SciPy: 1.8
    CPU-seconds at the start of every command that reads a folder. A class with a single image (allowed by
    --allow-small-classes) has nothing to hold out: it trains.
    """
    import math

    import numpy as np

    counts = Counter(label for _, label in samples)
    single = [s for s in samples if counts[s[1]] < 2]
    samples = [s for s in samples if counts[s[1]] >= 2]
    n_test = math.ceil(val_fraction * len(samples))
    n_train = len(samples) - n_test
    _, y_indices, class_counts = np.unique([label for _, label in samples], return_inverse=True, return_counts=True)
    problem = (f"the resulting train set would be empty ({len(samples)} images)" if n_train == 0 else
               f"{n_train} training images for {len(class_counts)} classes" if n_train < len(class_counts) else
               f"{n_test} validation images for {len(class_counts)} classes" if n_test < len(class_counts) else None)
    if problem:
        raise TorchferryError(f"cannot split off a stratified validation set with --val-split {val_fraction}: "
                              f"{problem}; add images, change --val-split or give --val-data")
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train, val = [], []
    for i, members in enumerate(class_indices):
        shuffled = members.take(rng.permutation(class_counts[i]), mode="clip")
        train += [samples[j] for j in shuffled[: n_i[i]]]
        val += [samples[j] for j in shuffled[n_i[i]: n_i[i] + t_i[i]]]
    return sorted(train + single), sorted(val)


def _approximate_mode(class_counts: Any, n_draws: int, rng: Any) -> Any:
    """How many of `n_draws` each class gets: its floored share, then one more for the largest remainders,
    ties drawn at random (scikit-learn's `utils.extmath._approximate_mode`)."""
    import numpy as np

    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            add_now = min(len(tied), need_to_add)
            floored[rng.choice(tied, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def annotation_split(cfg: TrainConfig) -> DataSplit:
    """An annotation file `--data` (and `--val-data`), its paths relative to `--image-root` or its own folder."""
    path = absolute_path(cfg.data)
    root = absolute_path(cfg.image_root) if cfg.image_root else os.path.dirname(path)
    rows = _read_annotation_rows(path, root)
    val_rows = None
    if cfg.val_data:
        val_path = absolute_path(cfg.val_data)
        if not os.path.isfile(val_path):
            raise TorchferryError(f"--val-data {cfg.val_data!r} is not a file")
        val_rows = _read_annotation_rows(val_path, absolute_path(cfg.image_root) if cfg.image_root
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

