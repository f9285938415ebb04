"""The command's exit: main's code, every exit handler run and every line flushed, then no interpreter teardown."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import atexit, sys
from torchferry.distributed import launch

def fake_main():
    print("summary line")             # buffered: stdout is a pipe here
    print("error line", file=sys.stderr)
    return 3

launch.main = fake_main
atexit.register(lambda: print("exit handler ran"))
launch.cli()
print("not reached")
"""


def test_cli_exits_with_mains_code_after_the_exit_handlers_and_flushes_output() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.splitlines() == ["summary line", "exit handler ran"]
    assert "error line" in proc.stderr
