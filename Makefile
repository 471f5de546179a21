# dspark-trt: `make demo` shows the pipeline, `make test` proves it. Everything runs on CPU.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
BIN     := $(VENV)/bin
BUILD   ?= build
FAMILY  ?= qwen3
TP      ?= 2
# torch is pinned: on these machines 2.13.0 is a local CPU wheel; an unpinned torch pulls GBs of CUDA.
TORCH   ?= torch==2.13.0

.PHONY: setup test demo lint bench-convert clean help

help:
	@echo "make setup         create $(VENV) with torch ($(TORCH)) and dspark-trt[dev] (editable)"
	@echo "make demo          fixture -> inspect -> convert, for FAMILY=$(FAMILY) (qwen3 | deepseek-v4), TP=$(TP)"
	@echo "make test          the test suite (creates the venv first if missing)"
	@echo "make lint          ruff"
	@echo "make bench-convert convert throughput / peak RSS on a >= 2 GB synthetic checkpoint"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .

demo: setup
	$(BIN)/dspark-build fixture $(FAMILY) $(BUILD)/fixture-$(FAMILY) --force
	$(BIN)/dspark-build inspect $(BUILD)/fixture-$(FAMILY)/target $(if $(filter qwen3,$(FAMILY)),$(BUILD)/fixture-$(FAMILY)/drafter)
	$(BIN)/dspark-build convert --target $(BUILD)/fixture-$(FAMILY)/target \
		$(if $(filter qwen3,$(FAMILY)),--drafter $(BUILD)/fixture-$(FAMILY)/drafter) \
		--tp $(TP) -o $(BUILD)/ckpt-$(FAMILY) --force
	@echo
	@echo "Converted checkpoint:"; cd $(BUILD) && find ckpt-$(FAMILY) -maxdepth 2 | sort

bench-convert: setup
	$(PY) bench/convert.py

clean:
	rm -rf $(BUILD) .pytest_cache
