# The two commands a new user needs (see README.md):
#   make pipeline   set everything up, then run the whole pipeline on the built-in default
#   make test       set everything up, then run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel by default; a GPU user sets e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index.
TORCH_SPEC ?= torch==2.13.0
# torch comes from pip (it finds a local wheel where the machine has one); everything else from uv.
UV_SPEC    ?= uv==0.13.9
PARAMS ?= params.yaml
# Prefect keeps its database, results (the stage cache) and logs here unless the caller set PREFECT_HOME.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup pipeline test bench bench-peers bench-models clean repro prefect-server deploy worker
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --no-compile "$(TORCH_SPEC)" "$(UV_SPEC)"
	@# uv resolves and installs the ~200 other packages in parallel: 9 s here against pip's 70 s, same versions.
	@# It reads its own settings (UV_INDEX_URL, UV_EXTRA_INDEX_URL, UV_FIND_LINKS), not pip's.
	$(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt -e ".[all,dev]"
	@# Neither pip --no-compile nor uv writes .pyc files; compileall -j 0 does, on every core. Like pip, it
	@# skips the few files that are not Python 3.11 (torch's py312 test helpers): hence -qq and || true.
	$(BIN)/python -m compileall -qq -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
	touch $@

# The pipeline as a Prefect flow (a temporary local server unless PREFECT_API_URL is set).
pipeline: setup
	$(BIN)/python -m flows.pipeline --params $(PARAMS)

# The same stages through DVC (dvc.yaml is generated from instructflow/registry.py).
repro: setup
	$(BIN)/dvc repro

# Schedules: a real Prefect server, the work pools, the deployments of prefect.yaml, a worker.
PREFECT_PORT ?= 4200
prefect-server: setup
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

deploy: setup
	$(BIN)/prefect work-pool create instructflow-local --type process --overwrite
	INSTRUCTFLOW_HOME=$(CURDIR) $(BIN)/prefect --no-prompt deploy --name weekly-retrain --name nightly-eval

worker: setup
	$(BIN)/prefect worker start --pool instructflow-local

test: setup
	$(BIN)/pytest -q

# Benchmarks (docs/results.md). The serving load test prints its figures; the peer benchmark
# against TRL (its own venvs under bench/.venvs) writes bench/results.json and its table in
# docs/results.md. Both need the default pipeline's models: the stages up to export run first
# when they are missing.
bench: bench-models
	$(BIN)/python bench/serve_load.py --clients 32 --seconds 30
	$(BIN)/python bench/peers.py

bench-peers: bench-models
	$(BIN)/python bench/peers.py

bench-models: setup
	test -f artifacts/export/rm/manifest.json || $(BIN)/instructflow run --params $(PARAMS) --stages data,validate,pretrain,sft,collect,reward,export

clean:
	rm -rf artifacts .prefect
