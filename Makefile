# The two commands a new user needs (see README.md):
#   make pipeline   set everything up, then run the whole pipeline on the built-in default
#   make test       set everything up, then run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel by default; a GPU user sets e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index.
TORCH_SPEC ?= torch==2.13.0
PARAMS ?= params.yaml

.PHONY: setup pipeline test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $@

pipeline: setup
	$(BIN)/instructflow pipeline --params $(PARAMS)

test: setup
	$(BIN)/pytest -q

# Benchmarks (figures go to docs/benchmarks.md by hand, with machine and date).
# The load test needs the exported RM: the stages up to export run first if it is missing.
bench: setup
	test -f artifacts/export/rm/manifest.json || $(BIN)/instructflow pipeline --params $(PARAMS) --stages data,pretrain,sft,collect,reward,export
	$(BIN)/python bench/serve_load.py --clients 32 --seconds 30

clean:
	rm -rf artifacts
