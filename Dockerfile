# syntax=docker/dockerfile:1.7
# Trifecta images, one per kind of machine:
#
#   docker build --target cpu  -t trifecta:cpu  .   the API, Flower and CPU workers
#   docker build --target cuda -t trifecta:cuda .   GPU workers (CUDA torch + onnxruntime-gpu)
#
# Every container runs one `trifecta` command (`trifecta api`, `trifecta worker --model M
# --device cuda:N`, `trifecta flower`); docker-compose.yml wires them to Redis and MinIO.
# The textmask model (PP-OCRv4 from the rapidocr wheel on PyPI) is fetched at build time;
# other models come from MODEL_DIR (mount it) or the Hugging Face hub at start.

ARG PYTHON_VERSION=3.11
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

# ---------------------------------------------------------------- cpu
FROM python:${PYTHON_VERSION}-slim-bookworm AS cpu
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
# TORCH_INDEX: a pip index holding CPU-only torch wheels (smaller image); empty = PyPI's default build
ARG TORCH_INDEX=""
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/models RUN_DIR=/var/lib/trifecta STORAGE_URL=file:///data
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml ./
COPY api ./api
COPY tasks ./tasks
COPY workers ./workers
COPY storage ./storage
COPY client ./client
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} \
 && pip install ".[worker,torch]" \
 && trifecta models fetch textmask
RUN useradd --system --uid 10001 --home-dir /app trifecta \
 && mkdir -p /data /var/lib/trifecta \
 && chown -R trifecta /data /var/lib/trifecta /models
USER trifecta
EXPOSE 8080 5555 9100
ENTRYPOINT ["trifecta"]
CMD ["api", "--host", "0.0.0.0", "--port", "8080"]

# ---------------------------------------------------------------- cuda
FROM ${CUDA_IMAGE} AS cuda
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/models RUN_DIR=/var/lib/trifecta STORAGE_URL=file:///data \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml ./
COPY api ./api
COPY tasks ./tasks
COPY workers ./workers
COPY storage ./storage
COPY client ./client
# the CUDA torch build is PyPI's default; onnxruntime-gpu replaces the CPU onnxruntime (both
# install the same `onnxruntime` package, so the CPU one goes first)
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && pip install ".[worker,torch]" \
 && pip uninstall -y onnxruntime \
 && pip install ".[gpu]" \
 && trifecta models fetch textmask
RUN useradd --system --uid 10001 --home-dir /app trifecta \
 && mkdir -p /data /var/lib/trifecta \
 && chown -R trifecta /data /var/lib/trifecta /models
USER trifecta
EXPOSE 8080 9100
ENTRYPOINT ["trifecta"]
CMD ["worker", "--model", "segmentation", "--device", "cuda:0"]
