# Two entry points: `make run` (GUI) and `make test`. Both create .venv on
# first use; the stamp files make re-runs a no-op until a requirements file changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: run test lint bench install

install: $(RUNTIME_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: the pin resolves to the local CPU wheel here and to a
# CUDA build on a GPU machine; installing it before the rest keeps any other
# package from pulling an unpinned (multi-GB) CUDA build.
# clip-anytorch only carries the CLIP BPE vocabulary we need offline; it
# declares torchvision, which we neither need nor can install, hence --no-deps.
$(RUNTIME_STAMP): requirements.txt | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps clip-anytorch==2.6.0
	touch $@

$(DEV_STAMP): requirements-dev.txt $(RUNTIME_STAMP)
	$(PIP) install -r requirements-dev.txt
	touch $@

run: $(RUNTIME_STAMP)
	$(PY) app.py

# The browser test drives Debian's chromium (never a downloaded browser).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get update -q && apt-get install -y -q chromium

# One worker per core, whole test files per worker (their module fixtures are
# built once); the suite is mostly single-threaded subprocesses and waits.
PYTEST_WORKERS ?= auto

test: $(DEV_STAMP) $(CHROMIUM)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

lint: $(DEV_STAMP)
	$(PY) -m ruff check .

bench: $(DEV_STAMP)
	$(PY) -m bench.adapter_overhead
	$(PY) -m bench.dataset_scan
	$(PY) -m bench.latent_cache
	$(PY) -m bench.train_step
	$(PY) -m bench.lcm_preview_speed
	$(PY) -m bench.lcm_evidence
	$(PY) -m bench.gui_startup
	$(PY) bench/e2e_small.py
	$(PY) -m bench.compile_cost
	$(PY) -m bench.base_precision
	$(PY) -m bench.memory_estimate
	$(PY) -m bench.masked_loss
	$(PY) -m bench.reg_images
	$(PY) -m bench.compare_cost
	$(PY) -m bench.validation_cost
	$(PY) -m bench.extract_lora
	$(PY) -m bench.resize_lora
