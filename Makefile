# Two commands do everything: `make demo` (the main job) and `make test`.
# Both create .venv and install the package into it when setup.cfg changes.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel keeps a laptop install small; on a GPU cluster use e.g. `make TORCH=torch`.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparsity-scaling grid submit configs/grids/demo.yaml --workdir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
