"""Checking images before training: unreadable ones refused (or left out), and what the readable ones are.

The check opens every image anyway, so the sizes and modes it sees become the data profile
(`DataSplit.profile`) from which `config.fit_to_images` chooses defaults that fit the images. Its threads
decode within a budget of pixels (`PixelBudget`), so a folder of large images costs the driver about one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
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

# Pixels the full check decodes at once, over all its threads: PIL holds up to 4 bytes a pixel, so 256 MB. Each
# image is opened first (its header: size and mode), then waits its turn to be decoded; one bigger than this
# (up to PIL's 89 MP bomb limit) is decoded alone. Sixteen 89 MP images were 2.9 GB at once on the driver.
DECODE_PIXELS_AT_ONCE = 64_000_000
# PIL allocates an image's pixels in blocks of at most this size (16 MiB by default). During the check a block
# holds a whole image (89 MP at 4 bytes a pixel, PIL's bomb limit, is 358 MB): glibc maps a block of over 32 MiB
# (its largest mmap threshold) on its own and gives it back when the image is closed, whereas the blocks of a
# large image cut into pieces stayed in each decoding thread's heap once the threshold had risen, so that the
# threads' heaps and not the images in flight set the peak (1.5 GB for eight 89 MP images decoded one at a time
# in 16 MiB blocks, 0.5 GB in 64 MiB ones; 0.35 GB, one image, now).
PIXEL_BLOCK_BYTES = 512 << 20


class PixelBudget:
    """At most `limit` pixels held at once by the threads that decode; an image over the limit is decoded alone.
    Turns are taken in order of asking, so a large image is not passed over for ever by small ones."""

    def __init__(self, limit: int):
        self.limit = limit
        self._held = 0
        self._next_ticket = self._serving = 0
        self._turn = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Wait until `pixels` fit beside those held (or none are), hold them for the block's duration."""
        with self._turn:
            ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
            self._turn.wait_for(lambda: ticket == self._serving and (self._held == 0
                                                                     or self._held + pixels <= self.limit))
            self._held += pixels
            self._serving += 1
            self._turn.notify_all()
        try:
            yield
        finally:
            with self._turn:
                self._held -= pixels
                self._turn.notify_all()


def _check_one(path: str, full: bool, budget: PixelBudget) -> _Inspection:
    """(reason it cannot be read or None, size, PIL mode) of one image; its pixels decoded (`full`) within
    `budget`, and let go of before the budget is."""
    try:
        require_regular_file(path)
        with Image.open(path) as img:
            size, mode = img.size, img.mode
            if not full:
                img.verify()
                return None, size, mode
            with budget.hold(size[0] * size[1]):
                try:
                    img.load()
                finally:
                    img.close()  # the pixels are freed here, inside the budget
    except Exception as exc:  # noqa: BLE001 - any failure to read is a bad image, reported by path
        return f"{type(exc).__name__}: {exc}", (0, 0), ""
    return None, size, mode


def _inspect_images(paths: Sequence[str], full: bool) -> list[_Inspection]:
    budget = PixelBudget(DECODE_PIXELS_AT_ONCE)
    block = Image.core.get_block_size()
    Image.core.set_block_size(max(block, PIXEL_BLOCK_BYTES))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 4)) as pool:
                return list(pool.map(lambda p: _check_one(p, full, budget), paths))
    finally:
        Image.core.set_block_size(block)


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
