# The README's two commands: `make demo` and `make test`. Each creates (or
# reuses) .venv in the repo root, installs the pinned dependencies, builds
# slothai and runs. TORCH=... picks another torch (default: the pinned CPU one).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
VPY := $(VENV)/bin/python
SOURCES := $(shell find csrc slothai -name '*.c' -o -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh') setup.py
CU_FILES := $(wildcard csrc/core/*.cu)
NVCC ?= $(shell command -v nvcc 2>/dev/null)

.PHONY: demo test build check-cuda bench clean wheel wheel-test

$(VENV)/.deps: requirements-dev.txt Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH)" -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

# Compile every CUDA file of the core with nvcc alone for the oldest (T4) and
# newest target, so a GPU-side compile error cannot land unseen on a CPU machine.
check-cuda:
ifneq ($(NVCC),)
	@for f in $(CU_FILES); do for a in 75 90; do \
	  $(NVCC) -std=c++17 -O3 -arch=sm_$$a -Icsrc/core -c $$f -o /tmp/slothai-check-$$a.o || exit 1; \
	done; echo "nvcc sm_75 + sm_90: $$f ok"; done
else
	@echo "nvcc not found: CUDA compile check skipped"
endif

test: build check-cuda
	$(VPY) -m pytest -q tests

demo: build
	$(VPY) -m slothai demo

# One wheel for every torch >= 2.10 and Python >= 3.10 (docs/wheel.md): the C core
# and limited-API module, and the CUDA kernels once per CUDA major (12 and 13).
wheel: $(VENV)/.deps
	bash packaging/build_wheel.sh

# The built wheel installed into a fresh environment and the suite run against it.
wheel-test: wheel
	bash packaging/test_wheel.sh

clean:
	rm -rf build dist *.egg-info slothai/*.so slothai/lib $(VENV)/.built
