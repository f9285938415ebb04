"""CIFAR-10 from a local root, its pickled batches read as data only (never as code to run).

torchvision's own reader unpickles the files as they are; `LocalCIFAR10` reads them with `_ArrayUnpickler`,
which builds numpy arrays, lists and strings and refuses anything else, so a crafted file in a data folder
cannot run code on the driver or the workers.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any

import numpy as np
from torchvision import datasets

_logger = logging.getLogger(__name__)


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR-10's files are pickles of dicts, lists, strings and numpy arrays: a file is data, so any other global
    (a function to call, a class to build) is refused instead of imported."""

    ALLOWED = frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not data (a CIFAR-10 file holds arrays and lists)")
        return super().find_class(module, name)


def _read_cifar_file(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise RuntimeError(f"{path}: {exc}") from None
    if not isinstance(entry, dict):
        raise RuntimeError(f"{path} is not a CIFAR-10 file (a pickled dict)")  # noqa: TRY004 (bad data, not a bug)
    return entry


class LocalCIFAR10(datasets.CIFAR10):
    """CIFAR-10 read from a local root; a copy whose md5 differs (re-packed, a subset) is used with a warning.

    torchvision's own reader unpickles the files as they are; here they are read as data only (`_ArrayUnpickler`),
    so a crafted file in a data folder cannot run code on the driver or the workers."""

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        datasets.VisionDataset.__init__(self, root)
        self.train = train
        if download:
            self.download()
        if not self._check_integrity():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        data, self.targets = [], []
        for file_name, _ in self.train_list if train else self.test_list:
            path = os.path.join(self.root, self.base_folder, file_name)
            entry = _read_cifar_file(path)
            images, labels = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
            if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2
                    or images.shape[1] != 3 * 32 * 32 or not isinstance(labels, list)
                    or len(labels) != len(images) or not all(isinstance(y, int) and 0 <= y < 10 for y in labels)):
                raise RuntimeError(f"{path} is not a CIFAR-10 batch (uint8 rows of 3072 values and 0-9 labels)")
            data.append(images)
            self.targets.extend(labels)
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC
        self._load_meta()

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
        classes = _read_cifar_file(path).get(self.meta["key"])
        if not isinstance(classes, list) or len(classes) != 10 or not all(isinstance(c, str) for c in classes):
            raise RuntimeError(f"{path} does not list the 10 CIFAR-10 class names")
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
