PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# DeepSpeed JIT-builds its CPU ops (shm comm, Adam) on first use. Build them per venv, not in the shared
# ~/.cache/torch_extensions: a process killed while loading one there leaves a `lock` file that makes every
# later start wait forever, silently (this once hung CI). A fresh clone then starts clean.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

# SmolLM2-135M-Instruct (a real chat model, from PyPI) converted once into an HF folder, for the tests and demo-real
SMOLLM2 := out/smollm2
# make demo's and make demo-real's α and seed: ALPHA=1.2 SEED=1 make demo for others
ALPHA ?= 1.4
SEED ?= 0
WHEELS := .whl

.PHONY: help install test test-fast demo demo-real eval-real bench bench-peer train gpu-check gpu-wheels clean

help: ## list the targets (the default)
	@echo "make TARGET, where TARGET is one of:"
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  %-11s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(VENV)/.installed ## the venv in .venv: what iqstar.py runs on (requirements.txt)

$(VENV)/.installed: requirements.txt tools/build_deepspeed_ops.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	@# Build DeepSpeed's CPU ops (comm, Adam) here, once (2-3 min on 2 cores), not in the first run or test
	$(BIN)/python tools/build_deepspeed_ops.py
	touch $@

# What only the tests need (requirements-test.txt): pytest, ruff, the trackers of --report-to
$(VENV)/.test: requirements-test.txt | $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

$(VENV)/.real: requirements-real.txt | $(VENV)/.installed
	$(BIN)/pip install -q --no-deps -r requirements-real.txt
	touch $@

$(SMOLLM2)/config.json: | $(VENV)/.real
	$(BIN)/python demo/real.py --convert $(SMOLLM2)

# evaluate.py's extras (requirements-eval.txt): the openai client, transformers serve (the tests' judge server: three
# small wheels), choix, matplotlib. make test needs them for tests/test_evaluate*.py.
$(VENV)/.eval: requirements-eval.txt requirements-demo.txt | $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-eval.txt
	touch $@

# make eval-real's judge server, llama.cpp's (requirements-judge.txt): compiles once, 9 to 15 minutes on 2 cores; pip
# caches the wheel. make test skips the one test that needs it when it is not installed.
$(VENV)/.judge: requirements-judge.txt | $(VENV)/.eval
	$(BIN)/pip install -q -r requirements-judge.txt
	touch $@

# TRL, make bench-peer's extra only (requirements-peer.txt), not make bench's or test's
$(VENV)/.peer: requirements-peer.txt | $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-peer.txt
	touch $@

test: install $(VENV)/.test $(VENV)/.eval $(SMOLLM2)/config.json ## every test, the style checks included (CPU)
	@# A test stuck 20 min prints every stack; only failed tests keep their temporary folders (GBs otherwise)
	$(BIN)/python -m pytest -q -o faulthandler_timeout=1200 -o tmp_path_retention_policy=failed tests

# The tests that run in pytest's own process, under a minute: the math, the chunked log-probs against the
# full-vocabulary forms, bf16's math, the sampling plan, data parsing and its fuzz, the one-line errors, the memory
# plan, credit.py's and evaluate.py's logic (evaluate.py's against a stand-in server, where requirements-eval.txt is
# installed). Left out: what starts a process, a launcher or a server, or needs the demo world's model or SmolLM2
# (the marks in pyproject.toml). Only the venv and the test requirements are needed, not SmolLM2. Ruff first (its
# test starts a process, so the fast tier leaves it out): a line it would reformat fails make test too.
FAST := not process and not launcher and not server and not slow and not smollm2 and not world
test-fast: install $(VENV)/.test ## ruff, then the in-process tests only, under a minute (no run, server or SmolLM2)
	$(BIN)/ruff format --check --quiet . && $(BIN)/ruff check --quiet .
	$(BIN)/python -m pytest -q -m "$(FAST)" tests

demo: install ## Inverse-Q* on the tiny built-in world, CPU, a few minutes (ALPHA, SEED)
	$(BIN)/pip install -q -r requirements-demo.txt
	$(BIN)/python demo/demo.py --out out/demo --alpha $(ALPHA) --seed $(SEED)

demo-real: install $(SMOLLM2)/config.json ## Inverse-Q* on SmolLM2-135M-Instruct, CPU, about 5 minutes (ALPHA, SEED)
	$(BIN)/pip install -q -r requirements-demo.txt
	$(BIN)/python demo/real.py --out out/real --model-dir $(SMOLLM2) --alpha $(ALPHA) --seed $(SEED)

# evaluate.py on make demo-real's models (run it first, same ALPHA and SEED): SFT, Prompting and the trained policy
# on the held-out prompts, judged both ways by SmolLM2 through llama.cpp's server (installed here, the first time);
# tables, plots in RUN/eval.
eval-real: $(VENV)/.judge $(SMOLLM2)/config.json ## evaluate.py on make demo-real's models, judged by SmolLM2
	$(BIN)/python demo/eval_real.py --run out/real/alpha$(ALPHA)-seed$(SEED) --model-dir $(SMOLLM2)

# Sampling speed, log-prob memory, the demo's seconds per epoch, the memory plan's check (bench/memory.py measures
# SmolLM2), full fine-tuning against LoRA on make demo-real's run.
bench: install $(SMOLLM2)/config.json ## the performance figures, CPU, about 15 minutes; JSON in out/bench
	$(BIN)/python -m bench.bench --out out/bench

# iqstar against TRL's SDFTTrainer on the same run, side by side: CPU fp32, 2 threads. Two principles: "one short
# sentence" against both SDFT losses (JSON in out/bench/peer), and "Answer in French." against SDFT's sampled_token
# loss, where the answers keep their length (out/bench/peer-french).
bench-peer: $(VENV)/.peer $(SMOLLM2)/config.json ## iqstar beside TRL's SDFTTrainer, CPU, about 45 minutes
	$(BIN)/python -m bench.peer.peer --model $(SMOLLM2) --case short --out out/bench/peer
	$(BIN)/python -m bench.peer.peer --model $(SMOLLM2) --case french --sdft-modes sampled_token \
	    --out out/bench/peer-french

# See README for 1 GPU and several nodes.
train: install ## the paper's Vicuna-7B run on one node, all its GPUs
	$(BIN)/deepspeed iqstar.py --model lmsys/vicuna-7b-v1.5 --output-dir out/vicuna-7b-iqstar

# The memory plan's GPU check: two epochs of iqstar.py in bf16 at the paper's lengths on a random 1.1B Llama, then
# with a LoRA adapter on a random Llama of Llama-2-7B's shape (needs 40 GB or more), each beside tools/plan.py's
# prediction. Run it on the GPU machine, with that machine's python3 (torch with CUDA, transformers), DeepSpeed and
# PEFT: pip install -r requirements.txt there, or, offline, the wheels of make gpu-wheels (docs/memory.md gives the
# steps). make gpu-check OUT=dir also writes dir/gpu-check.json and dir/gpu-check-lora.json.
gpu-check: ## on a GPU machine: bf16 epochs beside the memory plan (1.1B, then 7B with LoRA; OUT=dir: JSON too)
	python3 -m tools.gpu_check --out /tmp/gpu-check $(if $(OUT),--json $(OUT)/gpu-check.json)
	python3 -m tools.gpu_check --out /tmp/gpu-check --size 7b --lora-r 16 $(if $(OUT),--json $(OUT)/gpu-check-lora.json)

# On a machine with pip access: DeepSpeed as a pure-Python wheel (its ops JIT-build where they run) and the
# dependencies of it that a GPU machine with torch and transformers lacks, in .whl/, to copy to a GPU machine without
# internet access and install there with pip install --no-deps .whl/*.whl before make gpu-check.
gpu-wheels: install ## on a machine with pip access: the wheels in .whl/ that make gpu-check needs offline
	rm -rf $(WHEELS)
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w $(WHEELS) deepspeed==0.19.8
	$(BIN)/pip download -q --no-deps -d $(WHEELS) peft==0.21.2
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(WHEELS) hjson==3.1.0 pydantic==2.14.4 \
	    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
	@du -sh $(WHEELS)

clean: ## remove out/ (runs, SmolLM2, benchmarks) and pytest's cache
	rm -rf out .pytest_cache
