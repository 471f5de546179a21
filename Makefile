# dspark-trt: `make demo` shows the pipeline, `make test` proves it. Everything runs on CPU.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
BIN     := $(VENV)/bin
BUILD   ?= build
FAMILY  ?= qwen3
TP      ?= 2
# `make serve GPUS=N` on a GPU host: the gpu layout, N tensor-parallel ranks on GPUs 0..N-1 (NCCL), the
# drafter on GPU 0 (rank 0's); the checkpoint is converted for tp N.
ifneq ($(and $(filter serve,$(MAKECMDGOALS)),$(filter command line,$(origin GPUS))),)
TP      := $(GPUS)
SERVE_LAYOUT := --layout gpu --gpus $(GPUS)
endif
# Requests decoded together by the served orchestrator; more wait in its queue.
SLOTS   ?= 32
# torch is pinned: on these machines 2.13.0 is a local CPU wheel; an unpinned torch pulls GBs of CUDA.
TORCH   ?= torch==2.13.0

# The demo uses the trained pair shipped in examples/ (qwen3), else a random fixture.
TRAINED := examples/tiny-qwen3-dspark
PAIR    := $(if $(and $(filter qwen3,$(FAMILY)),$(wildcard $(TRAINED)/target/config.json)),$(TRAINED),$(BUILD)/fixture-$(FAMILY))
# Named after the pair and tp, so that switching either never reuses a stale conversion.
CKPT    := $(BUILD)/ckpt-$(notdir $(PAIR))-tp$(TP)
ENGINES := $(BUILD)/engines-$(FAMILY)
REPO    := $(BUILD)/repo-$(FAMILY)
CLIENT  := $(BIN)/dspark-client

.PHONY: setup test demo fixture lint serve stop bench-convert bench-generate bench-serve soak clean help gpu-check

help:
	@echo "make setup          create $(VENV) with torch ($(TORCH)) and dspark-trt[dev] (editable)"
	@echo "make demo           checkpoints -> engines -> SPS table -> repository -> tritonserver -> stream -> bench"
	@echo "make test           the test suite (creates the venv first if missing)"
	@echo "make fixture        retrain the shipped tiny pair from scratch into $(BUILD)/tiny-qwen3-dspark (~2 h, CPU)"
	@echo "make serve / stop   profile -> model repository -> tritonserver on 127.0.0.1 (detached) / stop it"
	@echo "make serve GPUS=N   the same on a GPU host: tp N on GPUs 0..N-1 (NCCL), drafter on GPU 0 (not yet run on a GPU)"
	@echo "make lint           ruff"
	@echo "make bench-convert | bench-generate | bench-serve | soak   benchmarks (bench/*.py)"
	@echo "make deploy GPUS=8  GPU host: TensorRT-LLM route in NVIDIA's Triton container (DEPLOY_CKPT=converted ckpt)"
	@echo "make gpu-check      one-shot check of the GPU parts on one NVIDIA GPU (machine's own torch/triton, no venv)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/pytest -q

# examples/tiny-qwen3-dspark, retrained with its recorded step counts (its README says what to expect);
# FIXTURE_OUT=examples/tiny-qwen3-dspark replaces the shipped pair.
FIXTURE_OUT ?= $(BUILD)/tiny-qwen3-dspark
fixture: setup
	$(BIN)/dspark-build train $(FIXTURE_OUT) --seed 0 --target-steps 2214 --drafter-steps 1600,800 \
		--ablation $(BUILD)/tiny-qwen3-dspark-no-markov --resume
	$(PY) bench/tau.py --pair $(FIXTURE_OUT) --ablation $(BUILD)/tiny-qwen3-dspark-no-markov

lint: setup
	$(BIN)/ruff check .

# A pair has a drafter directory unless its target carries the drafter (deepseek-v4's mtp.* stages).
$(CKPT)/manifest.json: $(wildcard $(PAIR)/target/* $(PAIR)/drafter/*) | setup
	$(if $(filter $(BUILD)/%,$(PAIR)),$(BIN)/dspark-build fixture $(FAMILY) $(PAIR) --force)
	drafter=$$(test -d $(PAIR)/drafter && echo $(PAIR)/drafter); \
	$(BIN)/dspark-build inspect $(PAIR)/target $$drafter && \
	$(BIN)/dspark-build convert --target $(PAIR)/target $${drafter:+--drafter $$drafter} --tp $(TP) -o $(CKPT) --force

# The whole pipeline on CPU: checkpoints -> engines -> cost table -> repository -> tritonserver ->
# one streamed completion -> off / mtp1 / auto: frontier plot and SLA table -> stop. The server is
# stopped even if a step fails.
demo: setup
	rm -f $(CKPT)/manifest.json
	$(MAKE) --no-print-directory $(CKPT)/manifest.json
	$(BIN)/dspark-build engine $(CKPT) --backend reference -o $(ENGINES) --force
	$(BIN)/dspark-build profile $(ENGINES) -o $(ENGINES)/sps_table.json --batch-sizes 1,2,4,8 --force
	$(BIN)/dspark-build repo $(ENGINES) -o $(REPO) --num-slots $(SLOTS) --force
	@set -e; trap '$(BIN)/dspark-build stop' EXIT; \
	$(BIN)/dspark-build serve $(REPO) --detach; \
	echo; echo '$$ dspark-client generate "def read_lines(path):" --max-tokens 48'; \
	$(CLIENT) generate "def read_lines(path):" --max-tokens 48; echo; \
	$(CLIENT) bench --concurrency 1,4 --modes off,mtp1,auto --requests 8 --max-tokens 48 --sla 40,60,80 \
		-o $(BUILD)/demo-bench

serve: setup $(CKPT)/manifest.json
	$(BIN)/dspark-build profile $(CKPT) -o $(CKPT)/sps_table.json --batch-sizes 1,4,16,$(SLOTS) --force
	$(BIN)/dspark-build repo $(CKPT) -o $(REPO) --num-slots $(SLOTS) $(SERVE_LAYOUT) --force
	$(BIN)/dspark-build serve $(REPO) --detach

stop:
	$(BIN)/dspark-build stop

# GPU host: the TensorRT-LLM route (target + DSpark drafter in TensorRT-LLM's PyTorch backend) in NVIDIA's
# tritonserver:<release>-trtllm-python-py3 container, one MPI rank per GPU. The release is pinned in
# builder/deploy.py (TRITON_RELEASE=... overrides it); DEPLOY_CKPT is a converted checkpoint whose source
# checkpoints are on this host. Prints the docker command with DRY_RUN=1.
GPUS        ?= 8
DEPLOY_CKPT ?= $(CKPT)
.PHONY: deploy
deploy: setup
	$(BIN)/dspark-build deploy $(DEPLOY_CKPT) --gpus $(GPUS) $(if $(TRITON_RELEASE),--release $(TRITON_RELEASE)) \
		$(if $(DRY_RUN),,--run)

bench-convert: setup
	$(PY) bench/convert.py

bench-generate: setup
	$(PY) bench/generate.py

bench-serve: setup
	cd bench && ../$(PY) serve.py

soak: setup
	cd bench && ../$(PY) soak.py

clean:
	rm -rf $(BUILD) .pytest_cache

# One-shot check of every GPU part on one NVIDIA GPU, with the machine's own torch and OpenAI Triton:
# no venv, nothing installed, nothing but this checkout on the path (see plugins/gpu_check.py).
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) -m dspark_trt.plugins.gpu_check --out $(BUILD)/gpu-check.json
