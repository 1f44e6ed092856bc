"""bench/plan.py, the memory plan: its command line, and its arithmetic against hand-worked numbers, DeepSpeed's own
estimator and what transformers and autograd actually hold (small models, no run of iqstar.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import plan  # noqa: E402

VICUNA_7B = os.path.join(ROOT, "bench", "configs", "vicuna-7b-v1.5")
VICUNA_13B = os.path.join(ROOT, "bench", "configs", "vicuna-13b-v1.5")
MiB, GiB = 2 ** 20, 2 ** 30


def run_plan(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", "plan.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


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
            expected = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=ranks,
                                                             cpu_offload=offload, cpu_offload_params=False)[1]
            assert plan.zero3_states(total, largest, ranks, 2, offload)[0] == expected


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
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    return config, LlamaForCausalLM(config).to(dtype)


def test_kv_cache_bytes_are_what_generate_keeps():
    config, model = tiny_llama(3, torch.float32)
    ids = torch.randint(0, 256, (3, 40))
    cache = model(input_ids=ids, use_cache=True).past_key_values
    held = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == 3 * 40 * plan.kv_bytes_per_token(plan.shapes(config), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_per_layer_are_what_autograd_saves(dtype):
    """The per-layer count against the storages autograd saves in a forward (parameters excluded): the difference
    between 3 layers and 1 is two layers' worth. Within 5 %."""
    saved = {}
    for layers in (1, 3):
        config, model = tiny_llama(layers, dtype)
        params, seen = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        ids, mask = torch.randint(0, 256, (2, 64)), torch.ones(2, 64, dtype=torch.long)
        mask[0, :5] = 0  # left-padded, as iqstar's batches are
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        saved[layers] = sum(seen.values())
    per_token_layer = (saved[3] - saved[1]) / 2 / (2 * 64)
    b = 2 if dtype == torch.bfloat16 else 4
    assert plan.activation_bytes_per_token(plan.shapes(config), b) == pytest.approx(per_token_layer, rel=0.05)


def test_gpu_check_runs_on_cpu(tmp_path):
    """make gpu-check's script, on CPU with a tiny Llama: it builds the model, tokenizer and prompts, runs two bf16
    epochs of iqstar's main() and reports every phase beside the plan."""
    figures = tmp_path / "gpu-check.json"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--size", "tiny",
                             "--max-new-tokens", "32", "--out", str(tmp_path / "work"), "--json", str(figures)],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sample tok/s" in result.stdout and "planned (bench/plan.py, 1 rank) / measured" in result.stdout
    saved = json.loads(figures.read_text())
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2]
    assert all(0 < e["response_tokens"] <= 4 * 32 for e in saved["epochs"])
    for phase in ("loading", "sampling", "scoring", "training"):
        assert saved["measured_gib"][phase] > 0 and saved["planned_gib"][phase] > 0
    with open(tmp_path / "work" / "run" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"  # trained and saved in bf16
