# syntax=docker/dockerfile:1.7
# Trifecta images, one per kind of process (docker-compose.yml and deploy/kubernetes use them):
#
#   docker build --target api               -t trifecta:api .                the API and Flower: no torch, no onnxruntime
#   docker build --target worker-onnx       -t trifecta:worker-onnx .        CPU workers of the ONNX models (textmask, segmentation, facemask, echo)
#   docker build --target worker-torch      -t trifecta:worker-torch .       CPU workers of every model (+ torch: sam3, mask2former, vjepa2)
#   docker build --target worker-onnx-cuda  -t trifecta:worker-onnx-cuda .   GPU workers of the ONNX models (onnxruntime-gpu)
#   docker build --target worker-torch-cuda -t trifecta:worker-torch-cuda .  GPU workers of every model (CUDA torch + onnxruntime-gpu)
#
# Every container runs one `trifecta` command (`trifecta api`, `trifecta worker --model M
# --device cuda:N`, `trifecta flower`). The textmask model (PP-OCRv4 from the rapidocr wheel
# on PyPI) is fetched into the worker images at build time; other models come from MODEL_DIR
# (mount it) or the Hugging Face hub at start.

ARG PYTHON_VERSION=3.11
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

# ---------------------------------------------------------------- python-base: code, user, dirs
FROM python:${PYTHON_VERSION}-slim-bookworm AS python-base
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/models RUN_DIR=/var/lib/trifecta STORAGE_URL=file:///data
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app trifecta \
 && mkdir -p /data /var/lib/trifecta /models && chown -R trifecta /data /var/lib/trifecta /models
WORKDIR /app
COPY pyproject.toml ./
COPY api ./api
COPY tasks ./tasks
COPY workers ./workers
COPY storage ./storage
COPY client ./client
EXPOSE 8080 5555 9100
ENTRYPOINT ["trifecta"]

# ---------------------------------------------------------------- api (and Flower)
FROM python-base AS api
RUN pip install .
USER trifecta
CMD ["api", "--host", "0.0.0.0", "--port", "8080"]

# ---------------------------------------------------------------- worker-onnx
FROM python-base AS worker-onnx
RUN pip install ".[worker]" \
 && trifecta models fetch textmask && chown -R trifecta /models
USER trifecta
CMD ["worker", "--model", "textmask", "--device", "cpu"]

# ---------------------------------------------------------------- worker-torch
FROM python-base AS worker-torch
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
# TORCH_INDEX: a pip index holding CPU-only torch wheels (smaller image); empty = PyPI's default build
ARG TORCH_INDEX=""
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} \
 && pip install ".[worker,torch]" \
 && trifecta models fetch textmask && chown -R trifecta /models
USER trifecta
CMD ["worker", "--model", "mask2former", "--device", "cpu"]

# ---------------------------------------------------------------- cuda-base: CUDA runtime, venv, code
FROM ${CUDA_IMAGE} AS cuda-base
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/models RUN_DIR=/var/lib/trifecta STORAGE_URL=file:///data \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --system --uid 10001 --home-dir /app trifecta \
 && mkdir -p /data /var/lib/trifecta /models && chown -R trifecta /data /var/lib/trifecta /models
WORKDIR /app
COPY pyproject.toml ./
COPY api ./api
COPY tasks ./tasks
COPY workers ./workers
COPY storage ./storage
COPY client ./client
EXPOSE 9100
ENTRYPOINT ["trifecta"]

# ---------------------------------------------------------------- worker-onnx-cuda
# onnxruntime-gpu replaces the CPU onnxruntime (both install the same `onnxruntime` package,
# so the CPU one goes first)
FROM cuda-base AS worker-onnx-cuda
RUN pip install ".[worker]" \
 && pip uninstall -y onnxruntime \
 && pip install ".[gpu]" \
 && trifecta models fetch textmask && chown -R trifecta /models
USER trifecta
CMD ["worker", "--model", "segmentation", "--device", "cuda:0"]

# ---------------------------------------------------------------- worker-torch-cuda
# the CUDA torch build is PyPI's default
FROM cuda-base AS worker-torch-cuda
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && pip install ".[worker,torch]" \
 && pip uninstall -y onnxruntime \
 && pip install ".[gpu]" \
 && trifecta models fetch textmask && chown -R trifecta /models
USER trifecta
CMD ["worker", "--model", "sam3", "--device", "cuda:0"]
