# Three targets, all on the public Python image:
#   docker build --target serve -t torchferry-serve .          # ONNX Runtime + Flask + gunicorn, no torch, no pip (~370 MB)
#   docker build --target serve-gpu -t torchferry-serve-gpu .  # the same on onnxruntime-gpu, CUDA and cuDNN as NVIDIA's
#                                                              # wheels (no CUDA base image), TORCHFERRY_DEVICE=cuda
#   docker build --target train -t torchferry-train .          # PyTorch (CUDA wheels) + Ray Train, entrypoint distributed.launch
# Always name the --target. The GPU stages come last: Docker's legacy builder builds every stage up to the target,
# so building serve or train never fetches the GPU image's CUDA wheels.
# Where no registry is reachable, `--build-arg PYTHON_IMAGE="$(scripts/local-base-image.sh)"` builds on a local base.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS serve-deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /build
COPY pyproject.toml ./
# The [serve] extra is the pinned, torch-free list; install exactly it into a virtualenv we copy over, then take
# the installer itself out of it (pip and setuptools are not needed to serve).
RUN python -m venv /opt/venv \
 && /opt/venv/bin/python -c "import subprocess, sys, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['serve']; subprocess.check_call([sys.executable, '-m', 'pip', 'install', '--no-cache-dir', *deps])" \
 && /opt/venv/bin/python -m pip uninstall --yes pip setuptools \
 && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torch', 'ray', 'pip', 'setuptools')))"

# ---------------------------------------------------------------------------------------------------
# What both serving images share, all but their virtualenv and code (a stage each copies them in last).
FROM ${PYTHON_IMAGE} AS serve-runtime
LABEL org.opencontainers.image.title="torchferry-serve" \
      org.opencontainers.image.description="Flask on ONNX Runtime serving a torchferry model"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    TORCHFERRY_BIND=0.0.0.0:8080 \
    TORCHFERRY_MODEL=/models/model.onnx \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
# The base's own pip, setuptools and wheel go too (a base without a system pip has none to remove).
# The mount points exist in the image (the model volume, the auth token Secret of k8s/serve), so that nothing at all
# is added to a container's filesystem when it runs.
RUN if python -m pip --version >/dev/null 2>&1; then python -m pip uninstall --yes --no-cache-dir pip setuptools wheel; fi \
 && mkdir -p /models /var/run/secrets/torchferry
WORKDIR /app
# A numeric non-root user: Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
EXPOSE 8080
# Ready, not merely alive: /readyz where TORCHFERRY_BIND says the server listens (torchferry/serve/healthcheck.py).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["python", "-m", "serve.healthcheck"]
ENTRYPOINT ["python", "-m", "gunicorn", "-c", "/app/torchferry/serve/gunicorn.conf.py"]

# ---------------------------------------------------------------------------------------------------
FROM serve-runtime AS serve
COPY --from=serve-deps /opt/venv /opt/venv
# The serving package, the torch-free package root, the model-file contract, the commands' one-line errors
# (cli.py) and the tasks' input contract (torchferry/inputs/) alone (torchferry.distributed and
# torchferry.export need torch), and the command names `python -m serve` and `python -m serve.healthcheck` (serve/,
# no __init__.py). tests/test_layout.py checks that these hold every module the commands and gunicorn import.
COPY torchferry/__init__.py torchferry/contract.py torchferry/cli.py /app/torchferry/
COPY torchferry/inputs/ /app/torchferry/inputs/
COPY torchferry/serve/ /app/torchferry/serve/
COPY serve/__main__.py serve/healthcheck.py /app/serve/

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS train
# The pins are pyproject's [train-image] extra (torch, torchvision, ray ... ; k8s/train/rayjob.yaml's rayVersion
# follows its ray pin). PyPI's Linux torch wheels carry CUDA; TORCH_INDEX adds another index (e.g.
# https://download.pytorch.org/whl/cu128) only when set.
ARG TORCH_INDEX=""
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HOME=/tmp TMPDIR=/tmp TORCHFERRY_CACHE=/tmp/torchferry-cache
WORKDIR /app
COPY pyproject.toml README.md ./
COPY torchferry/ /app/torchferry/
COPY distributed/ /app/distributed/
COPY export/ /app/export/
COPY serve/ /app/serve/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-cache-dir ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "/app[train-image]"
USER 1000:1000
ENTRYPOINT ["python", "-m", "distributed.launch"]

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS serve-gpu-deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /build
COPY pyproject.toml ./
# The [serve-gpu] extra: [serve] with onnxruntime-gpu and the CUDA and cuDNN libraries it loads, pinned; no torch,
# and not the CPU onnxruntime beside it (both install the module onnxruntime).
RUN python -m venv /opt/venv \
 && /opt/venv/bin/python -c "import subprocess, sys, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['serve-gpu']; subprocess.check_call([sys.executable, '-m', 'pip', 'install', '--no-cache-dir', *deps])" \
 && /opt/venv/bin/python -m pip uninstall --yes pip setuptools \
 && /opt/venv/bin/python -c "import importlib.metadata as m, importlib.util as u, sys; names = {d.metadata['Name'].lower() for d in m.distributions()}; sys.exit(any(u.find_spec(x) for x in ('torch', 'ray', 'pip', 'setuptools')) or 'onnxruntime' in names or 'onnxruntime-gpu' not in names)"

# ---------------------------------------------------------------------------------------------------
# The GPU serving image: run with the NVIDIA container toolkit (docker run --gpus 1; Kubernetes: k8s/overlays/gpu),
# which brings the host's driver in. A GPU its onnxruntime cannot start stops the server in one line.
FROM serve-runtime AS serve-gpu
LABEL org.opencontainers.image.title="torchferry-serve-gpu" \
      org.opencontainers.image.description="Flask on ONNX Runtime's CUDA provider serving a torchferry model"
ENV TORCHFERRY_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=serve-gpu-deps /opt/venv /opt/venv
COPY torchferry/__init__.py torchferry/contract.py torchferry/cli.py /app/torchferry/
COPY torchferry/inputs/ /app/torchferry/inputs/
COPY torchferry/serve/ /app/torchferry/serve/
COPY serve/__main__.py serve/healthcheck.py /app/serve/
