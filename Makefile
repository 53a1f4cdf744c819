# Two commands do everything: `make demo` (the main job) and `make test`.
# Both create .venv and install the package into it when setup.cfg changes.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel keeps a laptop install small; on a GPU cluster use e.g. `make TORCH=torch`.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
CLI := $(VENV)/bin/sparsity-scaling
CORPORA := runs/corpora

.PHONY: demo decay-demo test install clean

install: $(STAMP)

# pip byte-compiles one file at a time, half the install on 2 cores: compileall uses every core
# (a file that some package ships for another Python fails to compile, as it does under pip)
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -e ".[test]"
	$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparsity-scaling grid submit configs/grids/demo.yaml --workdir $(DEMO_DIR)

# The decay stage (configs/grids/decay.yaml): code, then prose once the decay starts, against
# code throughout; the corpora share the tokenizer trained on the code.
decay-demo: $(CORPORA)/code.json $(CORPORA)/prose.json
	$(CLI) grid submit configs/grids/decay.yaml --workdir runs/decay

$(CORPORA)/%.jsonl: $(STAMP)
	$(CLI) data stdlib $@ --subset $*

$(CORPORA)/code.json: $(CORPORA)/code.jsonl
	$(CLI) data prepare $< --out $(CORPORA)/code --tokenizer train:512

$(CORPORA)/prose.json: $(CORPORA)/prose.jsonl $(CORPORA)/code.json
	$(CLI) data prepare $< --out $(CORPORA)/prose --tokenizer $(CORPORA)/code.model

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
