# syntax=docker/dockerfile:1
# One image for every role (deploy/README.md):
#   IMAGE                                  fluxserve serve: API + GPU worker in one container
#   IMAGE serve --no-worker                the HTTP API alone, port 8000
#   IMAGE worker --gpus all                GPU workers (one process per visible GPU), /health and /metrics on 9100
# Weights are never baked in: they load into HF_HOME, a volume (gated FLUX.1 repos need HF_TOKEN).
#
# CUDA 13.0 throughout: PyPI's torch 2.13.0 wheel for Linux x86_64 is the CUDA 13.0 build (it requires
# cuda-toolkit 13.0.3 and nvidia-cudnn-cu13 9.20, which pip installs beside it), so the base image is the
# matching CUDA 13.0 runtime. The host needs an NVIDIA driver >= 580 and the NVIDIA Container Toolkit.
# Another CUDA: --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
#               --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# -- build: a virtual environment with torch (pinned, CUDA build) and fluxserve[postgres] -------------
FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu 24.04's python3 is Python 3.12
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/fluxserve
ENV PATH=/opt/fluxserve/bin:$PATH
# torch first, pinned, from the index that has the wanted CUDA build: `pip install .` then finds
# torch>=2.4,<2.14 satisfied and never pulls another build (the Makefile does the same with the CPU build)
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
# README.md: pyproject's `readme`, read by the build backend
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[postgres]" \
 && python -c "import torch, fluxserve.cli, psycopg; assert torch.version.cuda, 'torch is not a CUDA build'"

# -- runtime: the CUDA runtime, Python, the environment, a non-root user -------------------------------
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 fluxserve \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/fluxserve fluxserve \
 && mkdir -p /data /models/huggingface \
 && chown -R fluxserve:fluxserve /data /models
COPY --from=build /opt/fluxserve /opt/fluxserve
COPY deploy/docker/healthcheck.py /opt/fluxserve/healthcheck.py

# Containers listen on every interface (the default 127.0.0.1 would be unreachable from outside).
ENV PATH=/opt/fluxserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FLUXSERVE_HOST=0.0.0.0 \
    FLUXSERVE_PORT=8000 \
    FLUXSERVE_WORKER_HOST=0.0.0.0 \
    FLUXSERVE_DATA_DIR=/data \
    HF_HOME=/models/huggingface
VOLUME ["/data", "/models"]
USER 10001:10001
WORKDIR /home/fluxserve
EXPOSE 8000 9100

# Asks /health of whichever role runs here: the API on FLUXSERVE_PORT, else the worker on FLUXSERVE_WORKER_PORT.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "/opt/fluxserve/healthcheck.py"]

# tini as PID 1 forwards SIGTERM to fluxserve (which drains: a worker finishes or releases its job
# within FLUXSERVE_SHUTDOWN_GRACE_SECONDS) and reaps the worker's per-GPU child processes.
ENTRYPOINT ["/usr/bin/tini", "--", "fluxserve"]
CMD ["serve"]
