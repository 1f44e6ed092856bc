"""tools/plan.py, the memory plan: its command line, and its arithmetic against hand-worked numbers, DeepSpeed's own
estimator and what transformers and autograd actually hold (small models, no run of iqstar.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tools import plan
from tools.common import ROOT, clean_env

VICUNA_7B = os.path.join(ROOT, "tools", "configs", "vicuna-7b-v1.5")
VICUNA_13B = os.path.join(ROOT, "tools", "configs", "vicuna-13b-v1.5")
MiB, GiB = 2**20, 2**30


def run_plan(*args):
    return subprocess.run(
        [sys.executable, "-m", "tools.plan", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


@pytest.mark.process
def test_prints_the_table_and_writes_the_json(tmp_path):
    path = tmp_path / "plan.json"
    result = run_plan("--config", VICUNA_7B, "--ranks", "8", "--gpu-gib", "80", "--json", str(path))
    assert result.returncode == 0, result.stderr
    for text in ("loading", "sampling", "scoring", "training", "KV cache: 21 rows × 1536 tokens", "total", "fits"):
        assert text in result.stdout
    saved = json.loads(path.read_text())
    assert saved["fits"] is True and 30 < saved["total_gib"] < 80  # the paper's run fits at the defaults
    assert saved["total_gib"] == max(saved["phases_gib"].values())
    assert saved["parameters"] == 6_738_415_616  # Llama-2-7B's published count


@pytest.mark.process
@pytest.mark.parametrize("config", ["/no/such/model", "README.md", "garbled"])
def test_a_bad_config_is_one_line_and_exit_2(config, tmp_path):
    if config == "garbled":
        config = str(tmp_path)
        (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    result = run_plan("--config", config)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "[WARNING]" not in line]  # DeepSpeed's "no GPU" line
    assert len(lines) == 1 and lines[0].startswith(f"plan.py: error: --config {config}: "), result.stderr
    assert not result.stdout


def plan_of(*flags):
    return plan.plan(plan.parse_args(list(flags)))


@pytest.fixture(scope="module")
def vicuna7b():
    return plan_of("--config", VICUNA_7B, "--ranks", "8", "--gpu-gib", "80")


def test_hand_worked_numbers(vicuna7b):
    assert vicuna7b["kv_bytes_per_token"] == 0.5 * MiB  # 32 layers × K and V × 4096 × 2 bytes
    # 500 samples on 8 ranks: 63 per rank; 32768 // (512 + 1024) = 21 rows a call, so 3 calls
    assert (vicuna7b["generate_rows"], vicuna7b["generate_calls"]) == (21, 3)
    parts = vicuna7b["parts"]
    assert parts["kv_cache"]["sampling_gib"] == 21 * 1536 * 0.5 * MiB / GiB  # 15.75 GiB
    assert parts["gathered_policy"]["sampling_gib"] == 6_738_415_616 * 2 / GiB  # the whole bf16 policy
    # DeepSpeed's ZeRO-3 estimate: 18 bytes per parameter / 8 ranks + 4 bytes × the largest layer (32000 × 4096)
    assert parts["policy_states"]["training_gib"] * GiB == 18 * 6_738_415_616 // 8 + 4 * 32000 * 4096
    assert parts["frozen_shards"]["training_gib"] == pytest.approx(6_738_415_616 * 2 / 8 / GiB, rel=1e-3)


def test_the_policy_shard_is_deepspeeds_estimate():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from transformers import AutoConfig

    total, largest, _ = plan.count_params(AutoConfig.from_pretrained(VICUNA_13B))
    assert total == 13_015_864_320  # Llama-2-13B's published count
    for ranks in (1, 8, 16):
        for offload in (False, True):
            expected = estimate_zero3_model_states_mem_needs(
                total, largest, num_gpus_per_node=ranks, cpu_offload=offload, cpu_offload_params=False
            )[1]
            assert plan.zero3_states(total, largest, ranks, 2, offload)[0] == expected


LLAMA_7B = 6_738_415_616


def test_one_rank_runs_without_zero_fp32():
    """ds_config's stage "auto" is 0 on one rank: the policy whole, 4 B of parameters, AdamW's 8 B from the first
    step, 4 B of gradients in training; the step in place; the frozen model whole; nothing of ZeRO-3."""
    result = plan_of("--config", VICUNA_7B, "--ranks", "1", "--dtype", "fp32", "--device", "cpu")
    parts = result["parts"]
    assert result["zero_stage"] == 0 and result["deepspeed_estimate_gib"] is None
    policy = {phase: parts["policy_states"][f"{phase}_gib"] * GiB for phase in plan.PHASES}
    assert policy == {
        "loading": 4 * LLAMA_7B,
        "sampling": 12 * LLAMA_7B,
        "scoring": 12 * LLAMA_7B,
        "training": 16 * LLAMA_7B,
    }
    assert parts["frozen_shards"]["training_gib"] * GiB == 4 * LLAMA_7B  # whole: nothing is sharded
    for name in ("zero3_buffers", "gathered_policy", "gathered_layers", "optimizer_step"):
        assert not any(v for k, v in parts[name].items() if k.endswith("_gib")), name
    text = plan.table(result)
    assert "ZeRO-3" not in text and "ZeRO stage 0" in text and "no ZeRO" in text


def test_on_cpu_fp32_weights_are_mapped_not_read_at_loading(tmp_path):
    """A float32 checkpoint run in fp32 on CPU is memory-mapped and, without ZeRO, read at its first use: the
    loading phase holds none of it (bench/memory.py measures 0.07 GiB on SmolLM2); a float16 one is converted."""
    config = json.load(open(os.path.join(VICUNA_7B, "config.json")))
    (tmp_path / "config.json").write_text(json.dumps(dict(config, torch_dtype="float32")))
    flags = ["--ranks", "1", "--dtype", "fp32", "--device", "cpu"]
    mapped, converted = plan_of("--config", str(tmp_path), *flags), plan_of("--config", VICUNA_7B, *flags)
    assert mapped["phases_gib"]["loading"] == 0
    assert mapped["phases_gib"]["sampling"] == converted["phases_gib"]["sampling"]
    assert converted["phases_gib"]["loading"] * GiB == (4 + 4 + 2) * LLAMA_7B  # policy, frozen, the fp16 file


def test_one_rank_runs_without_zero_bf16():
    """bf16: DeepSpeed's FP16_Optimizer keeps bf16 parameters (2 B), float32 master weights (4 B) and AdamW's
    moments (8 B) from deepspeed.initialize on; bf16 gradients (2 B) in training; the step's float32 gradients
    (4 + 4 B) after backward, so the step sets the training peak; the init's zero step (4 B) at loading."""
    result = plan_of("--config", VICUNA_7B, "--ranks", "1", "--gpu-gib", "141")
    parts = result["parts"]
    assert result["dtype"] == "bf16" and result["zero_stage"] == 0
    assert parts["policy_states"]["loading_gib"] * GiB == parts["policy_states"]["sampling_gib"] * GiB == 14 * LLAMA_7B
    assert parts["policy_states"]["training_gib"] * GiB == 16 * LLAMA_7B
    assert parts["frozen_shards"]["training_gib"] * GiB == 2 * LLAMA_7B
    assert parts["optimizer_step"]["training_gib"] * GiB == 8 * LLAMA_7B
    assert parts["activations"]["training_gib"] == 0  # freed before the step
    # the init's 4 B come before the frozen model's 2 B are loaded: 2 B beyond what loading's other parts hold
    assert parts["loading"]["loading_gib"] * GiB == 2 * LLAMA_7B and "init step" in parts["loading"]["label"]
    assert result["total_gib"] * GiB == pytest.approx((16 + 2 + 8) * LLAMA_7B + plan.CUDA_CONTEXT)
    assert not result["fits"]


def test_a_config_that_names_stage_3_keeps_zero3_on_one_rank(tmp_path):
    config = json.load(open(os.path.join(ROOT, "ds_config.json")))
    config["zero_optimization"]["stage"] = 3
    (tmp_path / "ds.json").write_text(json.dumps(config))
    result = plan_of("--config", VICUNA_7B, "--ranks", "1", "--ds-config", str(tmp_path / "ds.json"))
    assert result["zero_stage"] == 3
    assert result["parts"]["policy_states"]["training_gib"] * GiB == 18 * LLAMA_7B + 4 * 32000 * 4096
    assert result["parts"]["zero3_buffers"]["training_gib"] * GiB == 5e7 * 2
    assert "ZeRO-3 shard" in plan.table(result)


def test_stage_1_is_refused(tmp_path, capsys):
    config = json.load(open(os.path.join(ROOT, "ds_config.json")))
    config["zero_optimization"]["stage"] = 1
    (tmp_path / "ds.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as raised:
        plan_of("--config", VICUNA_7B, "--ranks", "1", "--ds-config", str(tmp_path / "ds.json"))
    assert raised.value.code == 2
    assert capsys.readouterr().err.startswith(f"plan.py: error: --ds-config {tmp_path / 'ds.json'}: ")


# A tensor census of a tiny Llama under DeepSpeed at stage 0, as iqstar.py builds it on one rank: the storages that
# the engine, its optimizer and the module hold, after deepspeed.initialize, after the second backward and step.
CENSUS = r"""
import gc, json, sys, types
import torch
import iqstar
from transformers import LlamaConfig, LlamaForCausalLM
iqstar.init_distributed()
import deepspeed

def held():
    gc.collect()
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    # a gradient has no Python object until .grad is read: the leaves' own
    tensors += [t.grad for t in tensors if t.is_leaf and t.requires_grad and t.grad is not None]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

out = {}
for dtype, bf16 in (("fp32", False), ("bf16", True)):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    before = held()
    model = LlamaForCausalLM(config).to(torch.bfloat16 if bf16 else torch.float32)
    total = sum(p.numel() for p in model.parameters())
    ds = iqstar.fill_ds_config(json.load(open(sys.argv[1] + "/ds_config.json")),
                               types.SimpleNamespace(batch_size=1, lr=1e-3), bf16=bf16)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    figures = {"stage": engine.zero_optimization_stage(), "optimizer": type(engine.optimizer).__name__,
               "loading": held() - before}
    for phase in ("first step", "training"):  # AdamW's moments appear at the first step
        loss = engine(input_ids=torch.randint(0, 256, (1, 8))).logits.float().pow(2).mean()
        engine.backward(loss)
        del loss
        figures[phase] = held() - before
        engine.step()
    figures["sampling"] = held() - before
    out[dtype] = {"parameters": total, **figures}
    del engine, model, _
print(json.dumps(out))
"""


@pytest.mark.process
def test_stage0_bytes_are_what_deepspeed_holds():
    result = subprocess.run(
        [sys.executable, "-c", CENSUS, ROOT], capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert (figures["fp32"]["optimizer"], figures["bf16"]["optimizer"]) == ("FusedAdam", "FP16_Optimizer")
    for dtype, b in (("fp32", 4), ("bf16", 2)):
        held = figures[dtype]
        assert held["stage"] == 0
        planned, _, _ = plan.stage0_states(held["parameters"], b, fused=True)
        for phase in ("loading", "training", "sampling"):  # after initialize, after backward, after a step
            assert held[phase] == pytest.approx(planned[phase], rel=0.03), (dtype, phase)


def test_the_flags_that_save_memory_save_it(vicuna7b):
    base = vicuna7b["phases_gib"]
    off = plan_of("--config", VICUNA_7B, "--gather-for-generation", "off")["phases_gib"]
    assert base["sampling"] - off["sampling"] == pytest.approx(6_738_415_616 * 2 / GiB, abs=0.5)
    small = plan_of("--config", VICUNA_7B, "--kv-cache-tokens", "8192")
    assert small["parts"]["kv_cache"]["sampling_gib"] == 5 * 1536 * 0.5 * MiB / GiB  # 8192 // 1536 = 5 rows
    ckpt = plan_of("--config", VICUNA_7B, "--gradient-checkpointing")
    a = vicuna7b["activations_gib"]
    assert a["with_checkpointing"] < a["without_checkpointing"] / 5
    assert ckpt["phases_gib"]["training"] < base["training"] - 10
    assert not plan_of("--config", VICUNA_13B, "--gpu-gib", "40")["fits"]


def tiny_llama(layers, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
    )
    return config, LlamaForCausalLM(config).to(dtype)


def test_kv_cache_bytes_are_what_generate_keeps():
    config, model = tiny_llama(3, torch.float32)
    ids = torch.randint(0, 256, (3, 40))
    cache = model(input_ids=ids, use_cache=True).past_key_values
    held = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == 3 * 40 * plan.kv_bytes_per_token(plan.shapes(config), 4)


def bytes_saved_for_backward(model):
    """The bytes of the storages autograd saves in a forward of 2 left-padded rows of 64 tokens, parameters excluded."""
    params, seen = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids, mask = torch.randint(0, 256, (2, 64)), torch.ones(2, 64, dtype=torch.long)
    mask[0, :5] = 0  # left-padded, as iqstar's batches are
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_per_layer_are_what_autograd_saves(dtype):
    """The per-layer count against the storages autograd saves in a forward (parameters excluded): the difference
    between 3 layers and 1 is two layers' worth. Within 5 %."""
    saved = {}
    for layers in (1, 3):
        config, model = tiny_llama(layers, dtype)
        saved[layers] = bytes_saved_for_backward(model)
    per_token_layer = (saved[3] - saved[1]) / 2 / (2 * 64)
    b = 2 if dtype == torch.bfloat16 else 4
    assert plan.activation_bytes_per_token(plan.shapes(config), b) == pytest.approx(per_token_layer, rel=0.05)


@pytest.mark.process
@pytest.mark.parametrize("extra", [[], ["--lora-r", "4"]], ids=["full", "lora"])
def test_gpu_check_runs_on_cpu(tmp_path, extra):
    """make gpu-check's script, on CPU with a tiny Llama: it builds the model, tokenizer and prompts, runs two bf16
    epochs of iqstar's main() and reports every phase beside the plan; so too its LoRA case."""
    figures = tmp_path / "gpu-check.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.gpu_check",
            "--size",
            "tiny",
            "--max-new-tokens",
            "32",
            "--out",
            str(tmp_path / "work"),
            "--json",
            str(figures),
        ]
        + extra,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=clean_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sample tok/s" in result.stdout and "planned (tools/plan.py, 1 rank) / measured" in result.stdout
    saved = json.loads(figures.read_text())
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2]
    assert all(0 < e["response_tokens"] <= 4 * 32 for e in saved["epochs"])
    for phase in ("loading", "sampling", "scoring", "training"):
        assert saved["measured_gib"][phase] > 0 and saved["planned_gib"][phase] > 0
    with open(tmp_path / "work" / "run" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"  # trained and saved in bf16
    assert saved["lora_r"] == (4 if extra else 0) and os.path.isdir(tmp_path / "work" / "run" / "adapter") == bool(
        extra
    )
    assert ("LoRA r=4" in result.stdout) == bool(extra)


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"]])
def test_the_adapter_is_what_peft_trains(targets):
    """plan.adapter_params counts the parameters PEFT's get_peft_model makes trainable, as iqstar.py calls it."""
    import peft

    config, model = tiny_llama(2, torch.float32)
    lora = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets[0] if len(targets) == 1 else targets
    )
    trainable = sum(p.numel() for p in peft.get_peft_model(model, lora).parameters() if p.requires_grad)
    assert plan.adapter_params(config, 8, targets)[0] == trainable > 0


def test_lora_on_one_gpu_holds_one_copy_of_the_weights():
    """--lora-r: μ's bf16 weights once (no frozen copy), the adapter with its AdamW states as stage 0 holds them
    (14 B a parameter, 16 in training); a frozen copy again with --reference-model; Vicuna-7B fits one 24 GiB GPU with
    the flags the README names, and not at the defaults."""
    flags = ["--config", VICUNA_7B, "--ranks", "1", "--gpu-gib", "24", "--lora-r", "16"]
    result = plan_of(*flags)
    parts, adapter = result["parts"], result["trained_parameters"]
    assert adapter == 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # q, k, v, o; gate, up, down
    assert parts["lora_base"]["training_gib"] * GiB == 2 * LLAMA_7B
    assert parts["frozen_shards"]["training_gib"] == 0
    assert parts["policy_states"]["loading_gib"] * GiB == 14 * adapter
    assert parts["policy_states"]["training_gib"] * GiB == 16 * adapter
    assert (
        plan_of(*flags, "--reference-model", VICUNA_7B)["parts"]["frozen_shards"]["training_gib"] * GiB == 2 * LLAMA_7B
    )
    assert not result["fits"]
    assert plan_of(*flags, "--kv-cache-tokens", "8192", "--gradient-checkpointing")["total_gib"] < 0.9 * 24
