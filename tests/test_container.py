"""The serve image built with Docker and run as k8s/serve/deployment.yaml runs it: non-root, read-only root,
no capabilities, no new privileges, the pod's memory and CPU limits, env and mounts; a real HTTP client on
loopback. Marked `container` (not in a plain `pytest` run; `.ci/run` runs it after the main suite):

    pytest -m container tests/test_container.py -rA -n 0

Without a reachable dockerd the module skips. The base image is $TORCHFERRY_PYTHON_IMAGE when set (e.g. the public
python:3.11-slim-bookworm), else the local one scripts/local-base-image.sh makes (cached by content).
TORCHFERRY_BUILD_TRAIN_IMAGE=1 also builds the train target (~7 GB) and runs one CPU epoch in it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1800)]  # a cold base and build: minutes

MAX_IMAGE_BYTES = 400 * 1000**2  # Docker's MB
TOKEN = "container-test-token"
READY_TIMEOUT_S = 120
# What a stray file anywhere in a checkout must not bring into a build (.dockerignore).
STRAYS = ["torchferry/serve/stray.onnx", "serve/model.onnx.sha256", "torchferry/serve/__pycache__/app.cpython-311.pyc",
          "serve/.env", "torchferry/.env", "distributed/__pycache__/launch.cpython-311.pyc",
          "sub/runs/x/best.pth", "runs/r/best.pth", "venv/bin/activate", "venv/lib/site.py", ".env",
          "data/train/red/0.png", "export/notes.txt"]


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """`docker ARGS`, output captured; a failure shows what docker said."""
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} ... exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _docker_reachable() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


if not _docker_reachable():
    pytest.skip("docker is not installed or dockerd is not reachable", allow_module_level=True)


def build(context: Path, target: str, tag: str, base: str, timeout: float = 1800, dockerfile: Path | None = None) \
        -> float:
    """`docker build` on the host network; returns the seconds it took."""
    args = ["build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base}", "-t", tag]
    if target:
        args += ["--target", target]
    if dockerfile is not None:
        args += ["-f", str(dockerfile)]
    started = time.monotonic()
    docker(*args, str(context), timeout=timeout)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def base_image() -> str:
    """The image the Dockerfile's PYTHON_IMAGE names: $TORCHFERRY_PYTHON_IMAGE, else a locally made one."""
    if os.environ.get("TORCHFERRY_PYTHON_IMAGE"):
        return os.environ["TORCHFERRY_PYTHON_IMAGE"]
    proc = subprocess.run(["bash", str(REPO / "scripts" / "local-base-image.sh")], capture_output=True, text=True,
                          timeout=1800, check=False)
    assert proc.returncode == 0, f"scripts/local-base-image.sh failed:\n{proc.stderr[-3000:]}"
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout's files (tracked and untracked-but-not-ignored) plus stray files a real checkout gathers."""
    root = tmp_path_factory.mktemp("context")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    for name in STRAYS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("stray\n")
    return root


@pytest.fixture(scope="module")
def serve_image(context: Path, base_image: str) -> Iterator[str]:
    """The serve target, built from `context` on `base_image`; removed afterwards."""
    tag = f"torchferry-serve:test-{uuid.uuid4().hex[:8]}"
    seconds = build(context, "serve", tag, base_image)
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout)
    print(f"container: serve image built in {seconds:.1f} s on {base_image}, {size / 1e6:.0f} MB")
    yield tag
    docker("image", "rm", "-f", tag, check=False)


def deployment() -> tuple[dict, dict, dict]:
    """(pod spec, serve container, ConfigMap data) from k8s/serve."""
    deploy = yaml.safe_load((REPO / "k8s" / "serve" / "deployment.yaml").read_text())
    configmap = yaml.safe_load((REPO / "k8s" / "serve" / "configmap.yaml").read_text())
    pod = deploy["spec"]["template"]["spec"]
    return pod, pod["containers"][0], configmap["data"]


def quantity_bytes(value: str) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "K": 1000, "M": 1000**2, "G": 1000**3}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(value)


def pod_run_args(sources: dict[str, Path], env_overrides: dict[str, str]) -> list[str]:
    """`docker run` flags for what the Deployment asks of the serve container: its user, read-only root,
    capabilities, privilege escalation, seccomp, CPU and memory limits, env (ConfigMap, then env), and its volume
    mounts (host folders from `sources` by volume name; memory emptyDirs as a tmpfs of their size limit)."""
    pod, container, config = deployment()
    sc = {**pod["securityContext"], **container["securityContext"]}
    args = ["--user", f"{sc['runAsUser']}:{sc['runAsGroup']}", "--group-add", str(pod["securityContext"]["fsGroup"])]
    assert sc["runAsNonRoot"] and sc["runAsUser"] != 0
    if sc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    for cap in sc.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"  # Docker's default seccomp profile
    limits = container["resources"]["limits"]
    memory = quantity_bytes(limits["memory"])
    args += ["--memory", str(memory), "--memory-swap", str(memory), "--cpus", str(limits["cpu"])]
    env = {**config, **{e["name"]: e["value"] for e in container["env"]}, **env_overrides}
    for name, value in env.items():
        args += ["--env", f"{name}={value}"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume and volume["emptyDir"].get("medium") == "Memory":
            size = quantity_bytes(volume["emptyDir"]["sizeLimit"])
            args += ["--tmpfs", f"{mount['mountPath']}:rw,nosuid,nodev,size={size},mode=1777"]
        else:
            ro = ",readonly" if mount.get("readOnly") else ""
            args += ["--mount", f"type=bind,source={sources[mount['name']]},target={mount['mountPath']}{ro}"]
    return args


def shared_folder(path: Path) -> Path:
    """`path` and its contents readable by the pod's user (tmp_path folders are root's, mode 0700)."""
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return path


def model_volume(exported_model: dict, root: Path, sidecar: str | None = None) -> Path:
    """The shared volume's layout: the model where the Deployment's TORCHFERRY_MODEL points."""
    _, container, _ = deployment()
    model_path = next(e["value"] for e in container["env"] if e["name"] == "TORCHFERRY_MODEL")
    assert model_path.startswith("/models/")
    target = root / model_path[len("/models/"):]
    target.parent.mkdir(parents=True)
    shutil.copy2(exported_model["model"], target)
    source_sidecar = Path(str(exported_model["model"]) + ".sha256")
    if sidecar is not None:
        Path(str(target) + ".sha256").write_text(sidecar)
    elif source_sidecar.exists():
        shutil.copy2(source_sidecar, str(target) + ".sha256")
    return shared_folder(root)


def token_volume(root: Path) -> Path:
    """The Secret as the kubelet mounts it: the token file, group fsGroup, mode defaultMode (0440)."""
    pod, _, _ = deployment()
    root.mkdir(parents=True)
    root.chmod(0o755)
    token = root / "token"
    token.write_text(TOKEN)
    if os.geteuid() == 0:
        os.chown(token, 0, pod["securityContext"]["fsGroup"])
        token.chmod(0o440)
    else:
        token.chmod(0o444)
    return root


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inspect(name: str) -> dict:
    return json.loads(docker("inspect", name).stdout)[0]


def wait_ready(base: str, name: str) -> None:
    """Poll /readyz until 200 (bounded); fail with the container's log if it stops or never gets ready."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        state = inspect(name)["State"]
        if not state["Running"]:
            logs = docker("logs", name, check=False)
            raise AssertionError(f"container exited {state['ExitCode']}:\n{(logs.stdout + logs.stderr)[-3000:]}")
        try:
            if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # no gunicorn worker accepts before its model
            pass
        time.sleep(0.3)
    logs = docker("logs", name, check=False)
    raise AssertionError(f"not ready in {READY_TIMEOUT_S} s:\n{(logs.stdout + logs.stderr)[-3000:]}")


def wait_health(name: str, until: tuple[str, ...], min_checks: int = 1, timeout: float = 120) -> dict:
    """The container's health state once it is one of `until` after at least `min_checks` probes (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = inspect(name)["State"]["Health"]
        if health["Status"] in until and len(health.get("Log") or []) >= min_checks:
            return health
        time.sleep(1)
    raise AssertionError(f"health never reached {until}: {inspect(name)['State']['Health']}")


@pytest.fixture
def run_container() -> Iterator:
    """Starts containers (`docker run -d`) and removes them afterwards."""
    names: list[str] = []

    def start(image: str, args: list[str], network: str = "host") -> str:
        name = f"torchferry-test-{uuid.uuid4().hex[:8]}"
        docker("run", "-d", "--name", name, "--network", network, *args, image)
        names.append(name)
        return name

    yield start
    for name in names:
        docker("rm", "-f", name, check=False)


def test_build_context_holds_the_sources_alone(context: Path, base_image: str, tmp_path: Path) -> None:
    probe = tmp_path / "Dockerfile.probe"
    probe.write_text("ARG PYTHON_IMAGE\nFROM ${PYTHON_IMAGE}\nCOPY . /context/\n")
    tag = f"torchferry-context:test-{uuid.uuid4().hex[:8]}"
    build(context, "", tag, base_image, timeout=600, dockerfile=probe)
    try:
        listed = docker("run", "--rm", "--network", "none", "--entrypoint", "find", tag, "/context", "-type", "f",
                        "-printf", "%P\\n").stdout.split()
    finally:
        docker("image", "rm", "-f", tag, check=False)
    files = {name for name in listed if not name.startswith(".dockerfile.")}  # -f from outside the context
    assert not files & set(STRAYS)
    expected = {"pyproject.toml", "README.md"} | {
        str(p.relative_to(context)) for top in ("torchferry", "distributed", "export", "serve") for p in (context / top).rglob("*.py")
        if "__pycache__" not in p.parts}
    assert files == expected


def test_image_is_small_and_carries_no_torch_ray_or_installer(serve_image: str) -> None:
    size = int(docker("image", "inspect", "-f", "{{.Size}}", serve_image).stdout)
    assert size <= MAX_IMAGE_BYTES, f"{size / 1e6:.0f} MB"
    found = docker("run", "--rm", "--network", "none", "--entrypoint", "python", serve_image, "-c",
                   "import importlib.util as u; print(*[m for m in ('torch', 'torchvision', 'ray', 'pip', "
                   "'setuptools', 'wheel', 'distributed', 'export', 'torchferry.distributed', 'torchferry.export') "
                   "if u.find_spec(m)])").stdout.split()
    assert found == []
    app = docker("run", "--rm", "--network", "none", "--entrypoint", "find", serve_image, "/app", "-type", "f",
                 "-printf", "%P\\n").stdout.split()
    assert app and all(name.endswith(".py") for name in app), app
    assert {name for name in app if not name.startswith(("torchferry/serve/", "serve/", "torchferry/inputs/"))} == {
        "torchferry/__init__.py", "torchferry/cli.py", "torchferry/contract.py"}
    config = inspect(serve_image)["Config"]
    assert config["User"] == "10001:10001" and config["Healthcheck"]["Test"][-2:] == ["-m", "serve.healthcheck"]


def _labels(base: str, paths: list[Path]) -> list[str]:
    got = []
    for i in range(0, len(paths), 8):
        files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths[i:i + 8]]
        r = requests.post(f"{base}/predict", files=files, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        assert r.status_code == 200, r.text
        got += [p["label"] for p in r.json()["predictions"]]
    return got


def test_serves_as_the_pod_runs_it(serve_image: str, exported_model: dict, run_container, tmp_path: Path) -> None:
    """Ready, right, authenticated, healthy on a non-default bind, nothing written, and `docker stop` under load
    answers every request in flight, then exits 0."""
    from helpers import pytorch_labels, slow_request_body, val_images

    port = free_port()
    sources = {"models": model_volume(exported_model, tmp_path / "models"), "auth-token": token_volume(tmp_path / "s")}
    args = pod_run_args(sources, {"TORCHFERRY_BIND": f"127.0.0.1:{port}"})
    for flag in ("--read-only", "no-new-privileges", "ALL", "--memory"):
        assert flag in args
    name = run_container(serve_image, args)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, name)

    paths = val_images(exported_model["data"], tmp_path)
    assert _labels(base, paths) == pytorch_labels(exported_model["checkpoint"], paths)
    image = paths[0].read_bytes()
    anonymous = requests.post(f"{base}/predict", data=image, headers={"Content-Type": "image/png"}, timeout=30)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    wrong = requests.post(f"{base}/predict", data=image, timeout=30,
                          headers={"Content-Type": "image/png", "Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    metrics = requests.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert metrics.status_code == 200 and "torchferry_requests_total" in metrics.text

    health = wait_health(name, ("healthy", "unhealthy"))
    assert health["Status"] == "healthy", health["Log"][-1:]
    assert docker("diff", name).stdout.strip() == ""  # nothing written outside the mounts

    _stop_under_load(name, base, slow_request_body())


def _stop_under_load(name: str, base: str, body: bytes) -> None:
    """`docker stop` while 3 clients send a bounded stream of requests: each request that had started before the
    stop is answered 200, none is a 5xx, and the container exits 0 (not killed)."""
    pod, _, _ = deployment()
    records: list[tuple[float, float, object]] = []  # (started, ended, status)
    lock = threading.Lock()
    headers = {"Content-Type": "image/png", "Authorization": f"Bearer {TOKEN}"}

    def client() -> None:
        for _ in range(60):  # bounded
            started = time.monotonic()
            try:
                status: object = requests.post(f"{base}/predict", data=body, headers=headers, timeout=60).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            with lock:
                records.append((started, time.monotonic(), status))
            if not isinstance(status, int):
                return

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len([r for r in records if r[2] == 200]) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop_at = time.monotonic()
    # The pod's grace period, as the kubelet gives it (Docker's own default of 10 s is shorter than gunicorn's).
    docker("stop", "-t", str(pod["terminationGracePeriodSeconds"]), name, timeout=120)
    for t in threads:
        t.join(timeout=120)
    state = inspect(name)["State"]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    statuses = [s for _, _, s in records]
    assert not [s for s in statuses if isinstance(s, int) and s >= 500], statuses
    before = [s for started, _, s in records if started < stop_at - 0.05]
    # The listener closes when SIGTERM arrives, a moment after `docker stop` starts: the first refused request
    # marks it (stop_at where every client was done first). A request sent before and answered after it was in
    # flight while the server stopped.
    refused = [started for started, _, s in records if not isinstance(s, int)]
    closed_at = min(refused) if refused else stop_at
    across = [s for started, ended, s in records if started < closed_at < ended]
    assert len(before) >= 6 and all(s == 200 for s in before), records
    assert across and all(s == 200 for s in across), f"no request was in flight when the stop began: {records}"
    print(f"container: docker stop under load: {len(records)} requests, {len(before)} started before the stop "
          f"({len(across)} still in flight when it began), all 200; exit {state['ExitCode']}")


def test_not_ready_is_never_healthy(serve_image: str, exported_model: dict, run_container, tmp_path: Path) -> None:
    """A model that fails its proof (sha256 sidecar mismatch): the server answers, /readyz is 503, and Docker's
    health is starting or unhealthy, never healthy. Own network namespace, the image's default bind."""
    sources = {"models": model_volume(exported_model, tmp_path / "models", sidecar="0" * 64 + "  model.onnx\n"),
               "auth-token": token_volume(tmp_path / "s")}
    name = run_container(serve_image, pod_run_args(sources, {}), network="none")
    wait_health(name, ("starting", "unhealthy", "healthy"), min_checks=1)
    asked = docker("exec", name, "python", "-c", "import urllib.request as u, urllib.error as e\ntry: "
                   "print(u.urlopen('http://127.0.0.1:8080/readyz', timeout=5).status)\nexcept e.HTTPError as x: "
                   "print(x.code)").stdout.strip()
    alive = docker("exec", name, "python", "-c", "import urllib.request as u; "
                   "print(u.urlopen('http://127.0.0.1:8080/healthz', timeout=5).status)").stdout.strip()
    assert (asked, alive) == ("503", "200")
    health = inspect(name)["State"]["Health"]
    assert health["Status"] in ("starting", "unhealthy"), health
    assert all(entry["ExitCode"] != 0 for entry in health["Log"]), health["Log"]
    assert "503" in health["Log"][-1]["Output"], health["Log"][-1]


@pytest.mark.skipif(os.environ.get("TORCHFERRY_BUILD_TRAIN_IMAGE") != "1",
                    reason="the train image is ~7 GB: set TORCHFERRY_BUILD_TRAIN_IMAGE=1 to build it")
@pytest.mark.timeout(3600)
def test_train_image_runs_one_cpu_epoch_read_only(context: Path, base_image: str, run_container,
                                                  tmp_path: Path) -> None:
    tag = f"torchferry-train:test-{uuid.uuid4().hex[:8]}"
    seconds = build(context, "train", tag, base_image, timeout=3600)
    try:
        size = int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout)
        print(f"container: train image built in {seconds:.0f} s, {size / 1e9:.1f} GB")
        out = tmp_path / "out"
        out.mkdir()
        out.chmod(0o777)
        proc = docker("run", "--rm", "--network", "host", "--user", "1000:1000", "--read-only", "--cap-drop", "ALL",
                      "--security-opt", "no-new-privileges", "--tmpfs", "/tmp:rw,size=2g,mode=1777",
                      "--shm-size", "1g", "--mount", f"type=bind,source={out},target=/out", tag,
                      "--gpus", "0", "--workers", "1", "--epochs", "1", "--batch-size", "64",
                      "--output-dir", "/out", "--name", "one", timeout=1800, check=False)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert (out / "one" / "best.pth").is_file()
    finally:
        docker("image", "rm", "-f", tag, check=False)
