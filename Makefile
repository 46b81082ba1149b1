# demesne: `make run` and `make test` install whatever is missing first.
#
# llama-cpp-python is built from source for this machine. CMAKE_ARGS passes through, so the
# accelerated builds are `make install-cuda` (or -rocm, -metal, -vulkan), which rebuild it.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.demesne-installed
LLAMA_CPP_PYTHON ?= llama-cpp-python>=0.3.36

ARGS ?=

.PHONY: install run test bench clean install-cuda install-rocm install-metal install-vulkan

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	CMAKE_ARGS="$(CMAKE_ARGS)" $(PIP) install "$(LLAMA_CPP_PYTHON)"
	$(PIP) install -e ".[test]"
	touch $(STAMP)

# Accelerated llama.cpp builds: rebuild llama-cpp-python without pip's wheel cache (which
# would hand back the CPU build), keeping every other package as it is.
define accel_install
	$(MAKE) install
	CMAKE_ARGS="$(1) $(CMAKE_ARGS)" $(PIP) install --force-reinstall --no-deps --no-cache-dir "$(LLAMA_CPP_PYTHON)"
endef

install-cuda:
	$(call accel_install,-DGGML_CUDA=on)
install-rocm:
	$(call accel_install,-DGGML_HIP=on)
install-metal:
	$(call accel_install,-DGGML_METAL=on)
install-vulkan:
	$(call accel_install,-DGGML_VULKAN=on)

run: $(STAMP)
	$(VENV)/bin/demesne serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -ra --durations=25 $(ARGS)

bench: $(STAMP)
	$(PY) -m demesne.bench_suite $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
