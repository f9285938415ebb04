"""What every benchmark shares: the machine it ran on, where its JSON goes, and how it starts commands.

Every benchmark is a module of the package `bench`, run from the repository root as `python -m bench.<name>`;
its result goes to bench/results/<date>-<host>-<name>.json unless --out says otherwise.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine_info(*modules: str, **extra: Any) -> dict[str, Any]:
    """Cores, processor, Python, load average, and the version of each named module (e.g. "torch", "ray")."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                            "python": platform.python_version(), "load_average": list(os.getloadavg())}
    for name in modules:
        info[name] = str(importlib.import_module(name).__version__)
    return {**info, **extra}


def result_header(benchmark: str) -> dict[str, Any]:
    """The fields every result starts with: which benchmark, the date and the host."""
    return {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d"), "host": socket.gethostname()}


def result_path(name: str, host: str | None = None) -> Path:
    """bench/results/<date>-<host>-<name>.json (host: this machine's name unless given, e.g. a GPU's)."""
    return RESULTS / f"{time.strftime('%Y-%m-%d')}-{host or socket.gethostname()}-{name}.json"


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


def repo_env(env: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`env` (default: this process's) with the repository first on PYTHONPATH, so that child processes started
    anywhere import this checkout's `bench` and `torchferry`."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, **extra}


def show(cmd: list[str]) -> str:
    """A command as a person would type it from the repository root."""
    return " ".join("python" if c == sys.executable else os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c
                    for c in cmd)


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Print the command, run it from the repository root, fail if it fails."""
    print("$ " + show(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_seconds(fn: Any, reps: int, warmup: int) -> float:
    """The median wall time of `fn()` over `reps` calls, after `warmup` calls that are not timed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
