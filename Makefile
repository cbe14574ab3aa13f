# Trifecta: `make up` (install what the default models need + run everything), `make test` (the suite),
# `make chaos` (slow fault tests)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MIN_STAMP := $(VENV)/.installed-min

.PHONY: install install-min browser up test chaos lint bench clean gpu-check wheelhouse

# everything: torch (SAM3, V-JEPA 2, Mask2Former, SegFormer export), the dev tools, the browser
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[worker,torch,dev]'
	$(BIN)/pip install -q --no-deps rapidocr_onnxruntime==1.4.4   # the reference client, for the parity tests (see pyproject.toml)
	$(BIN)/trifecta models fetch textmask
	touch $(STAMP) $(MIN_STAMP)

install: $(STAMP) browser

# what the default models (MODELS=textmask,echo) need: the API and the ONNX workers, no torch
$(MIN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[worker]'
	$(BIN)/trifecta models fetch textmask
	touch $(MIN_STAMP)

install-min: $(MIN_STAMP)

# Debian's chromium + chromium-driver for the results-page test (Selenium drives them; no
# browser is ever downloaded by a test tool). Skipped when both are already there.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "warning: install Debian's chromium and chromium-driver for the page test (apt-get install chromium chromium-driver)"; fi

# `make up` installs torch only when MODELS asks for a model that needs it (SAM3, V-JEPA 2,
# Mask2Former, a SegFormer to export); the default MODELS=textmask,echo needs none
comma := ,
TORCH_MODELS := $(filter sam3 vjepa2 mask2former segmentation,$(subst $(comma), ,$(MODELS)))

up: $(if $(TORCH_MODELS),$(STAMP),install-min)
	$(BIN)/trifecta up

test: install
	$(BIN)/python -m pytest -q -m "not slow" --durations=25 tests

chaos: install
	$(BIN)/python -m pytest -q -m slow --durations=10 tests

lint: install
	$(BIN)/ruff check api tasks workers storage client tests

bench: install
	$(BIN)/trifecta bench

# One prepared GPU run (scripts/gpu_check.sh): `make gpu-check` on a machine with an NVIDIA GPU
# (cuda:0, bench.json in under 8 minutes); `make gpu-check DEVICE=cpu` is its dry run, tiny rounds
# on the CPU. No install step: it runs with the machine's own Python or from wheelhouse/.
DEVICE ?= cuda:0
gpu-check:
	PY=$$(test -x $(BIN)/python && echo $(BIN)/python || echo python3) scripts/gpu_check.sh $(if $(filter cpu,$(DEVICE)),--dry-run,--device $(DEVICE))

# Our light dependencies as Python 3.12 manylinux wheels (scripts/gpu-requirements.txt) and the
# textmask model, for a GPU machine with no package registry; kept under 64 MiB.
WHEEL_PY ?= 3.12
wheelhouse: $(STAMP)
	rm -rf wheelhouse && mkdir -p wheelhouse/models
	$(BIN)/pip download -q --python-version $(WHEEL_PY) --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheelhouse -r scripts/gpu-requirements.txt
	rm -f wheelhouse/numpy-*.whl wheelhouse/pillow-*.whl wheelhouse/opencv_python*.whl
	cp scripts/gpu-requirements.txt wheelhouse/requirements.txt
	cp -r models/textmask wheelhouse/models/
	@du -sh wheelhouse; test $$(du -sm wheelhouse | cut -f1) -lt 60 || { echo "wheelhouse/ is over 60 MiB"; exit 1; }

clean:
	rm -rf $(VENV) run data bench.json bench.png wheelhouse .gpuvenv
