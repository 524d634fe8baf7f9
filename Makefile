# Quick start: `make bench` (set up, run the benchmark on this machine's hardware) and
# `make test` (set up, run the tests). Both work on a fresh machine with Python >= 3.10.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# triton only where torch did not bring one (CUDA wheels pin their own).
TRITON_SPEC ?= triton==3.8.0
PY := $(VENV)/bin/python
# pytest's own entry, not `python -m pytest`: that puts the checkout's root first on the
# import path, where its kernels/ folder hides Hugging Face's `kernels` package
# (transformers 5.25+ imports it); the installed package has it as flashattn_py.kernels.
PYTEST := $(VENV)/bin/pytest
SOURCES := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/*) setup.py

.PHONY: setup test test-all bench bench-model wheel wheel-check clean

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON_SPEC)"
	$(PY) -m pip install -q numpy pytest hypothesis expecttest ninja setuptools wheel matplotlib tqdm
	# (optional integration; its tests skip without it. transformers 5.25 needs Python >= 3.11)
	if $(PY) -c "import sys; sys.exit(sys.version_info < (3, 11))"; then $(PY) -m pip install -q "transformers==5.25.0"; \
	else echo "transformers not installed (needs Python >= 3.11): its integration tests will skip"; fi
	$(PY) -m pip install -q --no-deps "ring-flash-attn==0.1.8"  # runs on install_as_flash_attn(); tests skip without it
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-4} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.built

test: setup
	$(PYTEST) -q
	$(PYTEST) -q -m distributed

test-all: setup
	$(PYTEST) -q -m "not gpu"

bench: setup
	$(PY) benchmarks/bench_attention.py

bench-model: setup
	$(PY) benchmarks/bench_model.py

# One wheel for every x86-64 CPU (CPU kernels per instruction set; CUDA ops too when a CUDA
# toolkit and a CUDA torch are present), into dist/.
wheel: $(VENV)/.deps
	rm -rf dist/flashattn_py-*.whl build/lib.* build/bdist.*  # (no library of an older build in the wheel)
	MAX_JOBS=$${MAX_JOBS:-4} $(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist .

# Install that wheel into fresh venvs with torch 2.13.0 and 2.14.1; smoke test + CPU suite in each.
wheel-check:
	tools/wheel_check.sh $(WHEEL_CHECK_TORCH)

clean:
	rm -rf build dist flashattn_py/*.so $(VENV)/.built
