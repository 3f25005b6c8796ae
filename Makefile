# fastdit's two everyday commands, each doing its own set-up on a fresh machine:
#   make bench   the benchmark suite on its built-in default (small fp32 on a CPU, full on a GPU)
#   make test    the whole test suite, then ruff (CI runs exactly this)
#
# Set-up: a virtual environment in .venv with torch pinned (TORCH=...), Triton where the
# platform has it, the test tools, and fastdit installed editable (building fastdit._C when
# nvcc is present; FASTDIT_BUILD_CUDA=0 skips it). To use a Python that already has your own
# torch, pass it: make test PY=/path/to/python (nothing is installed into it but fastdit and
# the test tools; its torch is kept).

VENV      ?= .venv
TORCH     ?= torch==2.13.0
TRITON    ?= triton==3.6.0
TOOLS     ?= numpy pytest pytest-xdist==3.8.0 ruff pybind11 cmake ninja "setuptools>=64" wheel onnx==1.23.2 onnxscript==0.7.2 onnx-ir==1.1.0 onnxruntime==1.32.0
BENCH_ARGS ?=
TEST_ARGS  ?=
# pytest processes (pytest-xdist): one a core, at most 4 (each holds 1-3 GB: Triton's interpreter,
# Inductor, the emulated kernels); 0 runs the tests in make's own pytest process.
TEST_JOBS  ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
# The slow tests (the real-size ONNX exports: 6 minutes of one core, up to 6 GB in one process)
# run by default; SLOW=0 leaves them out (plain pytest leaves them out unless FASTDIT_SLOW=1).
SLOW       ?= 1

ifeq ($(origin PY), undefined)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastdit-installed
else
STAMP := .fastdit-installed-$(subst /,_,$(PY))
endif

.PHONY: test bench install info lint clean

install: $(STAMP)

$(STAMP): Makefile pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	@if [ "$(PY)" = "$(VENV)/bin/python" ] && [ ! -x "$(PY)" ]; then python3 -m venv $(VENV); fi
	$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null && echo "keeping torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| $(PY) -m pip install --quiet "$(TORCH)"
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install --quiet "$(TRITON)" \
		|| echo "Triton is not available for this platform: the triton backend will say so"
	$(PY) -m pip install --quiet $(TOOLS)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	@touch $@

test: install
	FASTDIT_SLOW=$(SLOW) $(PY) -m pytest -n $(TEST_JOBS) --dist worksteal --durations=15 $(TEST_ARGS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

info: install
	$(PY) -m fastdit info

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf build *.egg-info fastdit/_C*.so .fastdit-installed-* $(VENV)/.fastdit-installed
