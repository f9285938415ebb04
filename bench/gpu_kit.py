"""Offline kits for a GPU machine that cannot reach a package index, in parts small enough for a size-limited copy.

    python -m bench.gpu_kit build [--out .gpukit] [--part-mib 60]       # here, with PyPI: downloads, packs, splits
    python -m bench.gpu_kit unpack KIT_DIR --parts DIR --to SITE         # there: joins the parts, checks, unpacks

bench/gpu_check.sh needs, beside the GPU machine's own PyTorch image, what that image lacks: Ray (Ray Train's
runs and the GPU tests) and the serving stack (onnxruntime-gpu, Flask, gunicorn, gevent). Two kits, so the
training checks can start before the serving kit's last part has arrived:

- `train`: Ray at the training image's pin, without what a run never loads (its Java jars, RLlib, Serve, the LLM
  libraries, the dashboard's web client), and the dependencies the image lacks;
- `serve`: onnxruntime-gpu at the [serve-gpu] pin, without its [cuda,cudnn] extras (the image's PyTorch brings
  CUDA 13 and cuDNN 9 as the same NVIDIA wheels, which ONNX Runtime's preload_dlls finds), and the serving
  stack's packages the image lacks.

Each kit is the packages installed for the machine's Python (`--python`, default 3.12) into one folder, packed as
tar.xz and cut into numbered parts of at most `--part-mib` MiB; kit.json lists the parts with their SHA-256 and is
what `unpack` checks before it writes anything. The pins asked for always go in; what they depend on is left out
where the image already has it (IMAGE_HAS), so the kit never shadows a package the image's PyTorch was built
against. Standard library only: `unpack` runs before
anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# The GPU machine's image ('cuda'), its packages as read on 2026-11-17 (names only; its versions are its own).
IMAGE_HAS = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio interface-meta iniconfig jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())  # noqa: SIM905 (the image's list as it reads)
# What a Ray Train run never loads, under site/ray/ (the Java workers' jars are most of Ray's wheel).
RAY_UNUSED = ("jars", "rllib", "serve", "llm", "dashboard/client/build")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def kit_requirements() -> dict[str, list[str]]:
    """Each kit's top-level requirements, at pyproject's pins (train-image for Ray and the server's packages,
    serve-gpu for onnxruntime-gpu, whose extras the image's PyTorch already satisfies)."""
    import tomllib  # Python 3.11+, where the kits are built; `unpack` runs on any Python 3

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {canonical(re.split(r"[\[=<>]", pin)[0]): pin for pin in extras["train-image"] + extras["serve-gpu"]}
    ort = re.sub(r"\[.*?\]", "", pins["onnxruntime-gpu"])
    return {"train": [pins["ray"]],
            "serve": [ort] + [pins[name] for name in ("flask", "werkzeug", "gunicorn", "gevent", "prometheus-client")]}


def pip_platform_args(python: str) -> list[str]:
    version = python.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi", f"cp{version}"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def wheel_name(path: Path) -> str:
    return canonical(path.name.split("-")[0])


def build_kit(name: str, requirements: list[str], out: Path, part_mib: int, python: str, skip: set[str]) -> dict:
    """Download `requirements` with their dependencies for `python`, install those not in `skip` into one folder
    and write it as the kit out/name (write_kit); returns the kit's record."""
    work = Path(tempfile.mkdtemp(prefix=f"gpukit-{name}-"))
    try:
        wheels, site = work / "wheels", work / "site"
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "-d", str(wheels),
                        *pip_platform_args(python), *requirements], check=True)
        # The pins asked for go in even where the image has the package (its werkzeug may be older than Flask's
        # need); what they pull in does only where the image lacks it (numpy, Pillow: the image's torch's own).
        asked = {canonical(re.split(r"[\[=<>]", requirement)[0]) for requirement in requirements}
        chosen = sorted(path for path in wheels.glob("*.whl")
                        if wheel_name(path) in asked or wheel_name(path) not in skip)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                        "--target", str(site), *pip_platform_args(python), *map(str, chosen)], check=True)
        for unused in RAY_UNUSED:
            shutil.rmtree(site / "ray" / unused, ignore_errors=True)
        return write_kit(site, out / name, part_mib * 2**20, kit=name, python=python, requirements=requirements,
                         packages=sorted(path.name for path in chosen),
                         left_out_as_the_image_has_them=sorted(
                             {wheel_name(p) for p in wheels.glob("*.whl")} & skip - asked))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_kit(site: Path, folder: Path, part_bytes: int, **record) -> dict:
    """`site` packed as tar.xz, cut into folder/part-NN of at most `part_bytes`, and folder/kit.json: `record`
    with the parts' names, sizes and SHA-256."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    archive = folder / "kit.tar.xz"
    # xz on every core where the tool is there (the CUDA provider alone is 270 MiB); Python's lzma otherwise.
    if shutil.which("xz") and shutil.which("tar"):
        with open(archive, "wb") as sink:
            tar = subprocess.Popen(["tar", "-C", str(site), "-cf", "-", "."], stdout=subprocess.PIPE)
            subprocess.run(["xz", "-T0", "-6", "-c"], stdin=tar.stdout, stdout=sink, check=True)
            if tar.wait():
                raise SystemExit(f"tar failed on {site}")
    else:
        with tarfile.open(archive, "w:xz") as tar:
            tar.add(site, arcname=".")
    record["parts"] = split(archive, folder, part_bytes)
    archive.unlink()
    (folder / "kit.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def split(archive: Path, folder: Path, part_bytes: int) -> list[dict]:
    parts = []
    with open(archive, "rb") as source:
        while chunk := source.read(part_bytes):
            path = folder / f"part-{len(parts):02d}"
            path.write_bytes(chunk)
            parts.append({"name": path.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    return parts


class Joined(io.RawIOBase):
    """The files at `paths`, read one after another as one stream."""

    def __init__(self, paths: list[Path]):
        self._paths, self._file = list(paths), None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self._file is None:
                if not self._paths:
                    return 0
                self._file = open(self._paths.pop(0), "rb")  # noqa: SIM115 (closed when read through)
            n = self._file.readinto(buffer)
            if n:
                return n
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


def unpack(kit_dir: Path, parts_dir: Path, to: Path) -> int:
    """Check every part of the kit described by kit_dir/kit.json in parts_dir, then unpack them into the new folder
    `to`. Returns 1, having written nothing, when a part is missing or damaged; 0 once unpacked."""
    record = json.loads((kit_dir / "kit.json").read_text())
    bad = []
    for part in record["parts"]:
        path = parts_dir / part["name"]
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != part["sha256"]:
            bad.append(part["name"])
    if bad:
        print(f"gpu_kit: the {record['kit']} kit lacks or has damaged parts {', '.join(bad)} in {parts_dir}",
              file=sys.stderr)
        return 1
    partial = to.with_name(to.name + ".partial")  # renamed to `to` once whole: a stopped unpack leaves no kit
    shutil.rmtree(partial, ignore_errors=True)
    with Joined([parts_dir / part["name"] for part in record["parts"]]) as stream, \
            tarfile.open(fileobj=stream, mode="r|xz") as tar:
        tar.extractall(partial, filter="data")
    partial.rename(to)
    print(f"gpu_kit: the {record['kit']} kit ({len(record['parts'])} parts) is in {to}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_kit", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="download, pack and split the kits (needs a package index)")
    build.add_argument("--out", type=Path, default=ROOT / ".gpukit")
    build.add_argument("--part-mib", type=int, default=60)
    build.add_argument("--python", default="3.12", help="the GPU machine's Python version")
    build.add_argument("--kits", nargs="+", default=["train", "serve"], choices=["train", "serve"])
    unpack_cmd = commands.add_parser("unpack", help="check a kit's parts and unpack them (standard library only)")
    unpack_cmd.add_argument("kit_dir", type=Path, help="the folder holding the kit's kit.json")
    unpack_cmd.add_argument("--parts", type=Path, help="where the parts are (default: kit_dir)")
    unpack_cmd.add_argument("--to", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "unpack":
        return unpack(args.kit_dir, args.parts or args.kit_dir, args.to)
    requirements = kit_requirements()
    for name in args.kits:
        record = build_kit(name, requirements[name], args.out, args.part_mib, args.python, set(IMAGE_HAS))
        size = sum(part["bytes"] for part in record["parts"]) / 2**20
        print(f"{name}: {len(record['parts'])} part(s), {size:.1f} MiB, {len(record['packages'])} packages "
              f"-> {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
