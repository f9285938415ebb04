# syntax=docker/dockerfile:1.7
# Two targets:
#   docker build --target serve -t torchferry-serve .    # ONNX Runtime + Flask + gunicorn, no torch (~360 MB)
#   docker build --target train -t torchferry-train .    # CUDA PyTorch + Ray Train, entrypoint distributed.launch
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TRAIN_BASE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS serve-deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /build
COPY pyproject.toml ./
# The [serve] extra is the pinned, torch-free list; install exactly it into a virtualenv we copy over.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/python -c "import subprocess, sys, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['serve']; subprocess.check_call([sys.executable, '-m', 'pip', 'install', '--no-cache-dir', *deps])" \
 && /opt/venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS serve
LABEL org.opencontainers.image.title="torchferry-serve" \
      org.opencontainers.image.description="Flask on ONNX Runtime serving a torchferry model"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    TORCHFERRY_BIND=0.0.0.0:8080 \
    TORCHFERRY_MODEL=/models/model.onnx \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
COPY --from=serve-deps /opt/venv /opt/venv
WORKDIR /app
COPY serve/ /app/serve/
# A numeric non-root user: Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["python", "-m", "gunicorn", "-c", "/app/serve/gunicorn.conf.py"]

# ---------------------------------------------------------------------------------------------------
FROM ${TRAIN_BASE} AS train
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HOME=/tmp TMPDIR=/tmp TORCHFERRY_CACHE=/tmp/torchferry-cache
WORKDIR /app
COPY pyproject.toml README.md ./
COPY distributed/ /app/distributed/
COPY export/ /app/export/
COPY serve/ /app/serve/
# torch/torchvision come from the base image (or TORCH_INDEX where the base lacks them); ray[train] from PyPI.
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" /app
USER 1000:1000
ENTRYPOINT ["python", "-m", "distributed.launch"]
