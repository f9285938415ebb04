"""The container and Kubernetes files, checked the ways this machine allows: real schemas and linters,
the restricted Pod Security fields on every pod spec, and the serve image's dependency set run for real."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SCHEMAS = REPO.parent / "shared" / "k8s-schemas"
K8S_VERSION = "1.30.0"
OVERLAYS = K8S / "overlays"


def documents() -> list[tuple[Path, dict]]:
    """Every YAML document under k8s/ except kustomizations and overlays (patches, checked once rendered below)."""
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or OVERLAYS in path.parents:
            continue
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


CORE = [(p, d) for p, d in documents() if not d["apiVersion"].startswith("ray.io/")]
RAYJOBS = [(p, d) for p, d in documents() if d["kind"] == "RayJob"]


@pytest.mark.parametrize("path,doc", CORE, ids=[f"{p.parent.name}/{p.name}" for p, _ in CORE])
def test_core_manifest_passes_strict_validation(path: Path, doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy(next(d for _, d in CORE if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown properties refused wherever it lists properties (as `kubectl --validate=strict`)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def rayjob_schema() -> dict:
    if not (SCHEMAS / "ray.io_rayjobs.yaml").is_file():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS}; the RayJob cannot be validated offline")
    crd = yaml.safe_load((SCHEMAS / "ray.io_rayjobs.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


def test_rayjob_validates_against_kuberay_schema() -> None:
    assert RAYJOBS, "k8s/train has a RayJob"
    schema = rayjob_schema()
    for _, doc in RAYJOBS:
        jsonschema.validate(doc, schema)
        assert doc["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
        assert "--address auto" in doc["spec"]["entrypoint"] and "--gpus 2" in doc["spec"]["entrypoint"]


def test_rayjob_schema_check_catches_a_misspelt_field() -> None:
    schema = rayjob_schema()
    doc = copy.deepcopy(RAYJOBS[0][1])
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


def pod_specs() -> Iterator[tuple[str, dict]]:
    """Every pod spec in k8s/: Deployments, Jobs, and the RayJob's head, workers and submitter."""
    for path, doc in documents():
        where = f"{path.relative_to(REPO)}:{doc['kind']}"
        if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield where, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "RayJob":
            spec = doc["spec"]
            yield f"{where}:submitter", spec["submitterPodTemplate"]["spec"]
            yield f"{where}:head", spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
            for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
                yield f"{where}:{group['groupName']}", group["template"]["spec"]


def restricted_problems(pod: dict) -> list[str]:
    """What keeps a pod spec from the restricted profile plus our read-only root filesystem rule."""
    problems = []
    psc = pod.get("securityContext", {})
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append("host namespaces")
    for vol in pod.get("volumes", []):
        if "hostPath" in vol:
            problems.append(f"hostPath volume {vol['name']}")
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        sc = c.get("securityContext", {})

        def field(name: str) -> Any:
            return sc.get(name, psc.get(name))

        name = c["name"]
        if field("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot")
        if not isinstance(field("runAsUser"), int) or field("runAsUser") == 0:
            problems.append(f"{name}: non-zero runAsUser")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
            problems.append(f"{name}: capabilities drop ALL")
        if (field("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: seccompProfile RuntimeDefault")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
    return problems


SPECS = list(pod_specs())


@pytest.mark.parametrize("where,pod", SPECS, ids=[w for w, _ in SPECS])
def test_every_pod_meets_the_restricted_profile(where: str, pod: dict) -> None:
    assert restricted_problems(pod) == []


def test_the_check_notices_a_missing_field() -> None:
    pod = copy.deepcopy(SPECS[0][1])
    del pod["containers"][0]["securityContext"]["capabilities"]
    assert restricted_problems(pod) == [f"{pod['containers'][0]['name']}: capabilities drop ALL"]


def test_namespace_enforces_restricted_and_ray_stays_inside_it() -> None:
    ns = next(d for _, d in documents() if d["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    policies = {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == "NetworkPolicy"}
    ray = policies["torchferry-ray"]
    assert ray["spec"]["ingress"] == [{"from": [{"podSelector": {}}]}]  # same namespace only
    assert policies["torchferry-serve"]["spec"]["egress"] == []


def test_model_reaches_the_server_read_only_and_nothing_loads_models_over_http() -> None:
    deployment = next(d for _, d in documents() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models")
    volume = next(v for v in pod["volumes"] if v["name"] == "models")
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    from torchferry.serve.app import create_app

    app = create_app({"MODEL": None, "LOAD_SYNC": True})
    writes = sorted(r.rule for r in app.url_map.iter_rules() if r.methods - {"GET", "HEAD", "OPTIONS"})
    # The only routes that take a body classify it; none loads or replaces a model.
    assert writes == ["/predict", "/v2/models/<name>/infer", "/v2/models/<name>/versions/<version>/infer"]
    assert all(r.methods - {"GET", "HEAD", "OPTIONS"} == {"POST"} for r in app.url_map.iter_rules()
               if r.rule in writes)


def test_auth_token_comes_from_a_secret_mounted_as_a_file_and_none_is_committed() -> None:
    deployment = next(d for _, d in documents() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert "TORCHFERRY_AUTH_TOKEN" not in env  # never the token itself in the manifest
    mount = next(m for m in container["volumeMounts"] if m["name"] == "auth-token")
    volume = next(v for v in pod["volumes"] if v["name"] == "auth-token")
    assert mount["readOnly"] is True and "subPath" not in mount  # subPath mounts never see a rotated Secret
    assert volume["secret"]["secretName"] == "torchferry-serve-auth" and volume["secret"]["defaultMode"] == 0o440
    path = env["TORCHFERRY_AUTH_TOKEN_FILE"]["value"]
    assert path == f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}"
    assert not [d for _, d in documents() if d["kind"] == "Secret"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # probes stay unauthenticated
        assert container[probe]["httpGet"]["path"] in ("/healthz", "/readyz")


def test_kustomizations_name_existing_files() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        for resource in spec["resources"] + [patch["path"] for patch in spec.get("patches", [])]:
            assert (kustomization.parent / resource).exists(), f"{kustomization}: {resource}"


def test_hadolint_reports_no_error() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, "--failure-threshold", "error", str(REPO / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def serve_requirements() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]


def pins(extra: str) -> dict[str, Requirement]:
    """A pyproject extra as {normalised name: requirement}."""
    reqs = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def dockerfile_stage(name: str) -> str:
    """The Dockerfile's lines from `FROM ... AS name` to the next FROM."""
    text = (REPO / "Dockerfile").read_text()
    start = text.index(f" AS {name}\n")
    end = text.find("\nFROM ", start)
    return text[start:end if end >= 0 else None]


def test_train_image_pins_every_dependency_within_its_range() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    train = pins("train-image")
    for dep in map(Requirement, project["dependencies"]):
        pin = train.get(canonicalize_name(dep.name))
        assert pin is not None, f"[train-image] lacks {dep.name}"
        (spec,) = pin.specifier
        assert spec.operator == "==" and dep.specifier.contains(spec.version), (str(dep), str(pin))
        assert dep.extras <= pin.extras, (str(dep), str(pin))
    assert set(train) == {canonicalize_name(Requirement(d).name) for d in project["dependencies"]}


def test_serve_and_train_images_pin_shared_packages_alike() -> None:
    serve, train = pins("serve"), pins("train-image")
    assert {name: str(serve[name].specifier) for name in serve.keys() & train.keys()} == \
        {name: str(train[name].specifier) for name in serve.keys() & train.keys()}


def test_dockerfile_and_rayjob_follow_the_train_pins() -> None:
    stage = dockerfile_stage("train")
    assert '"/app[train-image]"' in stage and "pip install" in stage
    assert "FROM ${PYTHON_IMAGE} AS train" in (REPO / "Dockerfile").read_text()
    (ray_pin,) = pins("train-image")["ray"].specifier
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for _, doc in RAYJOBS:
        cluster = doc["spec"]["rayClusterSpec"]
        assert cluster["rayVersion"] == ray_pin.version  # KubeRay speaks to the image's Ray by this version
        templates = [doc["spec"]["submitterPodTemplate"], cluster["headGroupSpec"]["template"],
                     *(g["template"] for g in cluster["workerGroupSpecs"])]
        for template in templates:
            for container in template["spec"]["containers"]:
                assert container["image"].rsplit(":", 1)[1] == project["version"], container["image"]


def test_serve_stage_installs_the_serve_extra_and_probes_readiness() -> None:
    assert "['optional-dependencies']['serve']" in dockerfile_stage("serve-deps")
    runtime = dockerfile_stage("serve-runtime")  # what the serve and serve-gpu images share
    assert 'CMD ["python", "-m", "serve.healthcheck"]' in runtime and "8080/healthz" not in runtime
    assert "COPY --from=serve-deps /opt/venv /opt/venv" in dockerfile_stage("serve")
    assert "FROM serve-runtime AS serve\n" in (REPO / "Dockerfile").read_text()
    assert "syntax=" not in (REPO / "Dockerfile").read_text()  # no frontend image to fetch before building


def test_serve_requirements_are_pinned_and_torch_free() -> None:
    reqs = serve_requirements()
    assert all("==" in r for r in reqs), reqs
    names = {r.split("==")[0].lower() for r in reqs}
    assert not names & {"torch", "torchvision", "ray", "onnx", "onnxscript"}
    assert {"onnxruntime", "flask", "gunicorn", "gevent", "pillow", "numpy", "prometheus-client", "werkzeug"} <= names


@pytest.mark.slow
def test_serve_dependency_set_runs_the_app_without_torch(exported_model: dict, tmp_path: Path) -> None:
    """The closest thing to running the serve image here: a fresh venv with only the pinned [serve] list,
    the serve/ folder, gunicorn on 127.0.0.1 against an exported model."""
    import requests
    from helpers import free_port, stop, wait_ready

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *serve_requirements()],
                   check=True, timeout=900)
    no_torch = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    listed = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    assert not [ln for ln in listed.lower().splitlines() if ln.startswith(("torch", "nvidia-", "triton"))]
    app_dir = tmp_path / "app"
    # As the image does: the serving package, the package root and the model-file contract alone.
    shutil.copytree(REPO / "torchferry" / "serve", app_dir / "torchferry" / "serve")
    for name in ("__init__.py", "contract.py"):
        shutil.copy(REPO / "torchferry" / name, app_dir / "torchferry" / name)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"TORCHFERRY_MODEL": str(exported_model["model"]), "TORCHFERRY_BIND": f"127.0.0.1:{port}",
                "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}"})
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([py, "-m", "gunicorn", "-c", str(app_dir / "torchferry" / "serve" / "gunicorn.conf.py")], cwd=app_dir,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = tmp_path / "server.log"  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        image = next((exported_model["data"] / "val" / "red").glob("*.png")).read_bytes()
        r = requests.post(f"{base}/predict", data=image, headers={"Content-Type": "image/png"}, timeout=30)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "red"
    finally:
        stop(proc)


# ------------------------------------------------------------------------------------------------
# k8s/overlays/gpu, rendered. kustomize is not a Python or Debian package here, so the fields the overlays use are
# applied in the test: resources (files and folders with a kustomization), namespace, images, and strategic-merge
# patches (maps merged key by key, lists of named items merged by name as Kubernetes' merge keys for containers,
# env, volumes and mounts do, other lists replaced, a null value deleting its key). Where `kubectl` is on PATH, its
# own `kubectl kustomize` must render the same documents.


def strategic_merge(base: Any, patch: Any) -> Any:
    """`patch` applied to `base` as a strategic-merge patch of the kinds the overlays use."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = strategic_merge(base.get(key), value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(
            isinstance(item, dict) and "name" in item for item in base + patch):
        merged = {item["name"]: item for item in base}
        for item in patch:
            merged[item["name"]] = strategic_merge(merged.get(item["name"]), item)
        return list(merged.values())
    return copy.deepcopy(patch)


def kustomize(folder: Path) -> list[dict]:
    """The documents `kubectl kustomize folder` gives, for the fields our kustomizations use."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for resource in spec.get("resources", []):
        path = folder / resource
        docs += kustomize(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in spec.get("patches", []):
        change = yaml.safe_load((folder / patch["path"]).read_text())
        target = (change["kind"], change["metadata"]["name"])
        hits = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == target]
        assert len(hits) == 1, f"{patch['path']} patches {target}, found {len(hits)}"
        docs[hits[0]] = strategic_merge(docs[hits[0]], change)
    for doc in docs:
        if spec.get("namespace") and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = spec["namespace"]
        for _, pod in pod_specs_of(doc):
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                name, _, tag = container["image"].rpartition(":")
                for image in spec.get("images", []):
                    if name == image["name"]:
                        container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return docs


def pod_specs_of(doc: dict) -> list[tuple[str, dict]]:
    """The pod specs of one workload document."""
    if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        return [(doc["kind"], doc["spec"]["template"]["spec"])]
    return []


GPU = kustomize(OVERLAYS / "gpu")


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_our_render_of_the_gpu_overlay_is_kubectl_kustomizes() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlay is rendered by the test's own merge only")
    proc = subprocess.run([kubectl, "kustomize", str(OVERLAYS / "gpu")], check=False, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(proc.stdout) if d}
    assert theirs == {(d["kind"], d["metadata"]["name"]): d for d in GPU}


def test_the_gpu_overlay_serves_on_one_gpu_with_the_gpu_image_and_settings() -> None:
    from torchferry.serve.settings import GunicornSettings, ServeSettings

    deployment, configmap = by_kind(GPU, "Deployment"), by_kind(GPU, "ConfigMap")
    for doc in GPU:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    pod = deployment["spec"]["template"]["spec"]
    assert restricted_problems(pod) == []  # the namespace enforces the restricted profile on GPU pods too
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "registry.example.com/torchferry-serve-gpu:0.1.0"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # What the server reads in the pod: the ConfigMap, then the container's own env over it.
    environ = {**configmap["data"], **{e["name"]: e["value"] for e in container["env"]}}
    settings = ServeSettings.load(environ=environ)
    assert (settings.device, settings.device_id, settings.batch_window()) == ("cuda", 0, 2.0)
    assert GunicornSettings.load(environ=environ).workers == 1
    # The rest of the serve Deployment is kept: mounts, probes, the auth token, the security context.
    base = next(d for _, d in documents() if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["volumeMounts"] == base["volumeMounts"] and container["env"] == base["env"]
    assert container["readinessProbe"] == base["readinessProbe"] and container["securityContext"] == base["securityContext"]


def test_the_overlay_merge_replaces_and_merges_as_kubernetes_does() -> None:
    base = {"containers": [{"name": "a", "image": "x", "env": [{"name": "K", "value": "1"}]}], "tolerations": [{"key": "t"}],
            "data": {"A": "1", "B": "2"}}
    patch = {"containers": [{"name": "a", "env": [{"name": "L", "value": "2"}]}], "tolerations": [{"key": "u"}],
             "data": {"A": None, "C": "3"}}
    assert strategic_merge(base, patch) == {
        "containers": [{"name": "a", "image": "x", "env": [{"name": "K", "value": "1"}, {"name": "L", "value": "2"}]}],
        "tolerations": [{"key": "u"}], "data": {"B": "2", "C": "3"}}


def test_serve_gpu_image_pins_onnxruntime_gpu_and_no_torch() -> None:
    gpu, cpu = pins("serve-gpu"), pins("serve")
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in gpu.values())
    assert not set(gpu) & {"torch", "torchvision", "ray", "onnx", "onnxscript", "onnxruntime"}
    assert gpu["onnxruntime-gpu"].extras == {"cuda", "cudnn"}
    # Everything but the runtime is [serve]'s, pinned alike; what is added is NVIDIA's CUDA and cuDNN libraries.
    assert {n: str(r.specifier) for n, r in gpu.items() if n in cpu} == {
        n: str(r.specifier) for n, r in cpu.items() if n != "onnxruntime"}
    assert all(n.startswith("nvidia-") for n in set(gpu) - set(cpu) - {"onnxruntime-gpu"})
    deps, stage = dockerfile_stage("serve-gpu-deps"), dockerfile_stage("serve-gpu")
    assert "['optional-dependencies']['serve-gpu']" in deps and "'onnxruntime' in names" in deps
    assert "COPY --from=serve-gpu-deps /opt/venv /opt/venv" in stage and "TORCHFERRY_DEVICE=cuda" in stage
    assert "FROM serve-runtime AS serve-gpu" in (REPO / "Dockerfile").read_text()


@pytest.mark.slow
def test_serve_gpu_dependency_set_resolves_without_torch(tmp_path: Path) -> None:
    """pip resolves [serve-gpu] as the image's build would (without downloading the CUDA wheels): every package is
    one the extra pins, and none is torch or the CPU onnxruntime."""
    import json

    report = tmp_path / "report.json"
    reqs = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve-gpu"]
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--disable-pip-version-check", "--python-version", "3.11", "--only-binary", ":all:",
                           "--report", str(report), *reqs], check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resolved = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    assert not {n for n in resolved if n.startswith(("torch", "triton")) or n in ("ray", "onnxruntime")}
    pinned = pins("serve-gpu")
    for name, version in resolved.items():
        if name in pinned:
            assert pinned[name].specifier.contains(version), (name, version)
