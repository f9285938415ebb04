"""What every benchmark script shares: writing its JSON result atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_result(result: dict[str, Any], path: Path) -> Path:
    """The benchmark's JSON, atomically, and a line saying where it went."""
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
