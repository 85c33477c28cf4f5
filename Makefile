# Two commands: `make demo` (train + sample + evaluate on the built-in tiny demo) and `make test`.
# Each bootstraps .venv when missing and is idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
LOCK   := requirements-lock.txt
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 1

.PHONY: demo test venv venv-test clean-demo

$(VENV)/.core: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c $(LOCK) -e .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) install -c $(LOCK) -e ".[test,torch,app]"
	# pytorch-fid (parity reference for Inception/FID) without its torchvision dependency: PyPI torchvision
	# needs CUDA torch libraries and breaks transformers' image processors beside the CPU torch wheel.
	$(PIP) install --no-deps pytorch-fid==0.3.0
	touch $@

venv: $(VENV)/.core
venv-test: $(VENV)/.test

demo: $(VENV)/.core
	$(PY) demo.py

# TEST_WORKERS pytest-xdist processes, each test file in one of them (its module fixtures built once), in
# collection order: tests/conftest.py puts the slowest files first.
TEST_WORKERS ?= 2
test: $(VENV)/.test
	XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0" \
	  $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=40 tests

clean-demo:
	rm -rf runs/demo demo_assets
