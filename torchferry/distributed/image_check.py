"""Checking images before training: unreadable ones refused (or left out), and what the readable ones are.

The check opens every image anyway, so the sizes and modes it sees become the data profile
(`DataSplit.profile`) from which `config.fit_to_images` chooses defaults that fit the images.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from torchferry.contract import SIXTEEN_BIT_MODES
from torchferry.distributed import TorchferryError
from torchferry.distributed.config import TrainConfig
from torchferry.distributed.discovery import DataSplit, require_regular_file

_logger = logging.getLogger(__name__)

FULL_CHECK_LIMIT = 50_000
GRAYSCALE_MODES = ("1", "L", "LA", "F", *SIXTEEN_BIT_MODES)
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


_Inspection = tuple[str | None, tuple[int, int], str]


def _check_one(path: str, full: bool) -> _Inspection:
    """(reason it cannot be read or None, size, PIL mode) of one image."""
    try:
        require_regular_file(path)
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


def check_split_images(split: DataSplit, cfg: TrainConfig) -> DataSplit:
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
