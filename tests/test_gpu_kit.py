"""bench.gpu_kit: a folder packed into parts small enough for a size-limited copy, checked and unpacked whole.

Building a real kit downloads from PyPI (python -m bench.gpu_kit build); these tests pack a small folder with the
same code and unpack it the way bench/gpu_check.sh does on the GPU machine, parts arriving in separate copies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_kit import unpack, write_kit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def kit(tmp_path: Path) -> Path:
    """A kit of a small site folder (a package, a binary file) in parts of 64 KiB."""
    site = tmp_path / "site"
    (site / "pkg" / "sub").mkdir(parents=True)
    (site / "pkg" / "__init__.py").write_text("VALUE = 42\n")
    (site / "pkg" / "sub" / "blob.bin").write_bytes(os.urandom(300_000))  # random: xz cannot shrink it
    write_kit(site, tmp_path / "kit", 64 * 1024, kit="test")
    return tmp_path / "kit"


def test_a_kit_in_parts_unpacks_to_the_same_files(kit: Path, tmp_path: Path) -> None:
    record = json.loads((kit / "kit.json").read_text())
    assert len(record["parts"]) >= 5 and all(part["bytes"] <= 64 * 1024 for part in record["parts"])
    assert sorted(path.name for path in kit.iterdir()) == ["kit.json"] + [p["name"] for p in record["parts"]]
    # The parts arrive one per copy and are kept elsewhere, as gpu_check.sh's stash does.
    parts = tmp_path / "parts"
    parts.mkdir()
    for part in record["parts"]:
        shutil.copy(kit / part["name"], parts)
    assert unpack(kit, parts, tmp_path / "out") == 0
    site = tmp_path / "site"
    for path in ("pkg/__init__.py", "pkg/sub/blob.bin"):
        assert (tmp_path / "out" / path).read_bytes() == (site / path).read_bytes()
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("damage", ["missing", "changed"])
def test_a_missing_or_damaged_part_unpacks_nothing(kit: Path, tmp_path: Path, damage: str) -> None:
    last = max(kit.glob("part-*"))
    if damage == "missing":
        last.unlink()
    else:
        data = bytearray(last.read_bytes())
        data[0] ^= 1
        last.write_bytes(bytes(data))
    result = subprocess.run([sys.executable, "-m", "bench.gpu_kit", "unpack", str(kit), "--to", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and last.name in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
