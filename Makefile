# fedkseed: `make demo` runs the main job, `make test` the tests (CI runs exactly that).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedkseed-installed
NVCC ?= nvcc
# Targets that must run without installing anything (a GPU image with torch, triton and nvcc but no
# network) use the venv's python when there is one, else the image's python3.
HOST_PY := $(if $(wildcard $(PY)),$(PY),python3)

.PHONY: install build lint test test-fast dist demo bench cuda-check gpu-check clean

install: $(STAMP)

# The editable install skips build isolation: the extension must be compiled against the torch it
# will run with (torch's C++ ABI changes between releases), the venv's, whichever index it came
# from; an isolated build would first install a second torch (~1 GB, ~1 min) for nothing.
$(STAMP): requirements.txt requirements-data.txt pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Incremental (ninja) rebuild of the compiled operators into the source tree.
build: install
	$(PY) setup.py -q build_ext --inplace

# Lint and format check (configuration: pyproject.toml [tool.ruff]); `ruff format` fixes format.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint build cuda-check
	$(PY) -m pytest -q tests

# The edit loop: lint and build as `make test`, then every test not marked slow (wheel build,
# Flower and gloo processes, SmolLM2 loads: pyproject.toml registers the marker); under 2 minutes
# on an idle 2-core machine. The CUDA compile check and the slow tests are left to `make test`.
test-fast: lint build
	$(PY) -m pytest -q -m "not slow" tests

# A distributable wheel in dist/ through the standard isolated PEP 517 build. Left alone, pip would
# give the build the newest torch (a multi-GB CUDA build); the constraint pins it to the venv's.
dist: install
	mkdir -p build
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > build/torch-constraint.txt
	$(PY) -m pip wheel --no-deps --build-constraint build/torch-constraint.txt -w dist .

# CPU benchmark tables (fused kernels and ZO step against MeZO-style, projection against
# torch.normal + torch.dot, same run; magnitude mask build and masked vs dense replay); on a GPU
# machine also run benchmarks/bench_gpu.py. Figures are recorded in benchmarks/RESULTS.md.
bench: build
	$(PY) benchmarks/bench_cpu.py
	$(PY) benchmarks/bench_project.py
	$(PY) benchmarks/bench_mask.py
	$(PY) benchmarks/bench_zo.py

demo: build
	$(VENV)/bin/fedkseed simulate --output runs/demo --overwrite

# Compile (never link or run) every CUDA kernel for each architecture of pyproject.toml's
# [tool.fedkseed] cuda-archs with setup.py's flags (both read by tools/nvcc_flags.py), so the CUDA
# backend is checked on machines without a GPU or a CUDA build of torch.
cuda-check: install
	@if ! command -v $(NVCC) >/dev/null 2>&1; then \
	  echo "cuda-check: SKIPPED, $(NVCC) not found (install the CUDA toolkit to compile csrc/cuda)"; \
	else \
	  tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  flags=$$($(PY) tools/nvcc_flags.py "$$tmp/stub") && \
	  archs=$$(printf '%s\n' $$flags | sed -n 's/^arch=compute_[0-9]*,code=//p' | tr '\n' ' ') && \
	  for src in csrc/cuda/*.cu; do \
	    echo "cuda-check: $(NVCC) $$src for $$archs"; \
	    $(NVCC) $$flags -c $$src -o "$$tmp/$$(basename $$src .cu).o" || exit 1; \
	  done && echo "cuda-check: OK"; \
	fi

# On a GPU machine: build and check the GPU backends, writing the report to $(OUT) (default
# gpu-report/). No `install` prerequisite: it uses the torch, triton and nvcc already there.
gpu-check:
	$(HOST_PY) tools/gpu_check.py $(or $(OUT),gpu-report)

clean:
	rm -rf build dist fedkseed/*.so *.egg-info
