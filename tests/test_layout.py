"""The package layout: torchferry installs beside Dask's `distributed` and the PyPI project `export`, and all work.

The commands are `python -m distributed.launch`, `python -m export.onnx` and `python -m serve`, but `distributed`
and `export` are also other projects' top-level packages. The code lives in `torchferry/`; the top-level
`distributed/`, `export/` and `serve/` hold the command modules alone and no `__init__.py` (namespace portions), so
a wheel install adds `launch.py` to Dask's `distributed/` folder without touching a file of Dask's. Proven here as a
user meets it: a fresh virtualenv, the real wheels of both projects, commands run from an unrelated folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMAND_FOLDERS = ("distributed", "export", "serve")


def test_command_folders_are_namespace_portions_holding_commands_alone() -> None:
    for top in COMMAND_FOLDERS:
        folder = REPO / top
        assert not (folder / "__init__.py").exists(), f"{top}/__init__.py would shadow or replace another project's"
        for module in folder.glob("*.py"):
            text = module.read_text()
            # A command module is a docstring, an import of its torchferry module and the __main__ call.
            assert "from torchferry." in text and 'if __name__ == "__main__":' in text, module
            assert len(text.splitlines()) <= 12, f"{module}: the code belongs in torchferry/{top}/"


def _pip(python: Path, *args: str, cwd: Path) -> None:
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args], cwd=cwd, check=True,
                   timeout=600)


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_installs_beside_dask_distributed_and_export(tmp_path: Path) -> None:
    # The wheel, built from a copy of the tracked sources (a build writes build/ and *.egg-info beside them).
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(src)], cwd=tmp_path, check=True, timeout=300)
    wheel = next(wheels.glob("torchferry-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing found through the current folder
    elsewhere.mkdir()
    # Dask's scheduler (with its dependencies) and the PyPI `export`, then torchferry without its heavy
    # dependencies: `--help` needs neither torch nor Ray.
    _pip(python, "install", "distributed", "export", cwd=elsewhere)
    _pip(python, "install", "--no-deps", str(wheel), cwd=elsewhere)

    dask = _run(python, "-c", "import distributed; print(distributed.Client.__module__, distributed.__file__)",
                cwd=elsewhere)
    assert dask.returncode == 0, dask.stderr
    assert dask.stdout.split()[0] == "distributed.client"
    dask_folder = Path(dask.stdout.split()[1]).parent
    assert (dask_folder / "launch.py").is_file()  # the command module, in Dask's folder, beside Dask's own

    help_ = _run(python, "-m", "distributed.launch", "--help", cwd=elsewhere)
    assert help_.returncode == 0, help_.stderr
    assert help_.stdout.startswith("usage: python -m distributed.launch")

    # The other command names resolve to torchferry's modules, and `export` stays the other project's package.
    found = _run(python, "-c", "import importlib.util as u, export; print(export.__file__); "
                 "print(*[u.find_spec(m).origin for m in ('export.onnx', 'export.verify', 'serve.__main__', "
                 "'distributed.evaluate')])", cwd=elsewhere)
    assert found.returncode == 0, found.stderr
    export_init, origins = found.stdout.splitlines()[0], found.stdout.splitlines()[1].split()
    assert Path(export_init).name == "__init__.py"
    assert all(Path(o).read_text().count("from torchferry.") == 1 for o in origins), origins

    # Uninstalling torchferry takes its command modules and leaves Dask whole.
    _pip(python, "uninstall", "-y", "torchferry", cwd=elsewhere)
    assert not (dask_folder / "launch.py").exists()
    again = _run(python, "-c", "import distributed, export; print(distributed.Client.__module__)", cwd=elsewhere)
    assert again.returncode == 0 and again.stdout.strip() == "distributed.client", again.stderr

    # A developer's editable install beside Dask: setuptools' finder supplies the command modules Dask's
    # regular package does not have, from the checkout itself and from anywhere else.
    _pip(python, "install", "--no-deps", "-e", str(src), cwd=elsewhere)
    for cwd in (src, elsewhere):
        help_ = _run(python, "-m", "distributed.launch", "--help", cwd=cwd)
        assert help_.returncode == 0 and help_.stdout.startswith("usage: python -m distributed.launch"), help_.stderr
    again = _run(python, "-c", "import distributed; print(distributed.Client.__module__)", cwd=src)
    assert again.returncode == 0 and again.stdout.strip() == "distributed.client", again.stderr


def _image_files(stage_name: str, app: Path) -> None:
    """Copy into `app` what the Dockerfile's stage copies from the checkout (its COPY lines without --from)."""
    text = (REPO / "Dockerfile").read_text()
    start = text.index(f" AS {stage_name}\n")
    stage = text[start:text.find("\nFROM ", start)]
    for line in stage.splitlines():
        if not line.startswith("COPY ") or "--from" in line:
            continue
        *sources, dest = line.split()[1:]
        target = app / Path(dest).relative_to("/app")
        for source in sources:
            if source.endswith("/"):
                shutil.copytree(REPO / source, target, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / source, target / Path(source).name)


@pytest.mark.parametrize("stage", ["serve", "serve-gpu"])
def test_the_serve_image_holds_every_module_its_commands_import(stage: str, tmp_path: Path) -> None:
    """The serve images hold a few of torchferry's files; with those alone, gunicorn's config and app, the worker
    class, `python -m serve` and `python -m serve.healthcheck` import (a module outside them would fail there)."""
    app = tmp_path / "app"
    _image_files(stage, app)
    assert (app / "torchferry" / "serve" / "app.py").is_file() and not (app / "torchferry" / "distributed").exists()
    env = {**os.environ, "PYTHONPATH": str(app)}
    code = ("import runpy, sys\n"
            "import torchferry.serve.app, torchferry.serve.worker, torchferry.serve.__main__, torchferry.serve.healthcheck\n"
            "runpy.run_path('torchferry/serve/gunicorn.conf.py')\n"
            "outside = [m for m, mod in list(sys.modules.items()) if m.startswith('torchferry') and\n"
            "           not (getattr(mod, '__file__', None) or sys.argv[1]).startswith(sys.argv[1])]\n"
            "print(outside)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(app)], cwd=app, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
    for command in ("serve", "serve.healthcheck"):
        help_ = subprocess.run([sys.executable, "-m", command, "--help"], cwd=app, env=env, capture_output=True,
                               text=True, timeout=120, check=False)
        assert help_.returncode == 0 and help_.stdout.startswith(f"usage: python -m {command}"), help_.stderr
