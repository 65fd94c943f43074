# The README's commands. On a machine where python3 already has torch and triton (the GPU
# machines, no package index), that interpreter is used as is; otherwise a .venv is made with
# the pinned CPU build of torch and triton.
SHELL := /bin/bash
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.6.0
SYS_PY := $(shell command -v python3 2>/dev/null)
HAVE_SYS := $(shell $(SYS_PY) -c "import torch, triton, pytest" >/dev/null 2>&1 && echo yes)
ifeq ($(HAVE_SYS),yes)
PY := $(SYS_PY)
ENV_STAMP :=
else
PY := $(CURDIR)/.venv/bin/python
ENV_STAMP := .venv/.installed
endif
export PYTHONPATH := $(CURDIR)/src:$(PYTHONPATH)
OUT ?= $(CURDIR)/build/out

.PHONY: demo test gpu-test bench lint env gpu-check wheel clean

env: $(ENV_STAMP)

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/python -m pip install --quiet --upgrade pip
	.venv/bin/python -m pip install --quiet "$(TORCH_PIN)" "$(TRITON_PIN)"
	.venv/bin/python -m pip install --quiet -e ".[dev,hf]"
	touch $@

demo: $(ENV_STAMP)
	$(PY) scripts/demo.py

# CPU tier: kernels in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when
# there is no GPU). On a GPU machine the same command runs the GPU tier.
test: $(ENV_STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal tests

gpu-test: $(ENV_STAMP)
	$(PY) -m pytest -q -n 4 --dist loadfile -m "not slow" tests

# bench_attention.py's suites, then the decode suite (bench_decode.py) with the same arguments
# (same --out folder and commit; a --suite list without decode or all skips it).
bench: $(ENV_STAMP)
	$(PY) benchmarks/bench_attention.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_decode.py $(BENCH_ARGS)

# One device call: GPU tier + benchmark, logs and results under $(OUT).
gpu-check: $(ENV_STAMP)
	bash scripts/gpu-check

lint: $(ENV_STAMP)
	$(PY) -m ruff check src tests benchmarks scripts examples

# The package's wheel under dist/ (pip builds it in isolation, with setuptools>=77 from the index).
wheel: $(ENV_STAMP)
	$(PY) -m pip wheel --no-deps -w dist .

clean:
	rm -rf build dist
