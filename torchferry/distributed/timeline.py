"""A start-up timeline for benchmarks: where the seconds before the first step and after the last go.

When the environment names a file in TORCHFERRY_TIMELINE, `mark(event)` appends one JSON line
`{"event", "t", "pid", ...}` to it (t: wall-clock seconds, comparable between the processes of one
machine); the driver and every Ray worker write to the same file (the workers inherit the variable).
Unset, the default, `mark` does nothing. `python -m bench.startup` sets it and reads the lines back.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

ENV = "TORCHFERRY_TIMELINE"


def mark(event: str, **extra: Any) -> None:
    """Append `event` with the time now to $TORCHFERRY_TIMELINE, if set."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **extra}) + "\n"
    # One O_APPEND write per line: lines of several processes never interleave within a line.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def process_started() -> float | None:
    """When this process started (wall-clock seconds, ±10 ms) from Linux's /proc; None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, counted after "pid (comm)"
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
