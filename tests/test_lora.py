"""--lora-r: a LoRA adapter trained on one copy of the weights, π_w and π_l from the policy with its adapter off."""

import json
import os
import subprocess

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import iqstar
import world
from conftest import (
    HELPERS,
    ROOT,
    assert_same_run,
    error_without,
    iqstar_command,
    ok,
    read_metrics,
    run_iqstar,
    world_args,
)
from tools.common import deepspeed_launcher

PROBE = os.path.join(HELPERS, "lora_probe.py")
LORA = ["--lora-r", "16", "--lora-alpha", "16", "--lr", "1e-2"]  # 10 times the world's full run's lr (1e-3)
LAUNCHED = [pytest.mark.launcher, pytest.mark.slow]  # two ranks under deepspeed
BATCH = {  # the probe's fixed batch: two prompts with no shared start, and their responses
    "prompts": [[5, 9, 14, 3, 4, 5], [6, 20, 21]],
    "principled": [[3, 7, 5, 9, 14, 3, 4, 5], [3, 7, 6, 20, 21]],
    "responses": [[40, 41, 42, 2], [43, 44]],
    "pad": 0,
}


def probed_run(world_model, tmp_path, epochs, extra=(), launcher=None):
    """iqstar.py with LoRA through tests/helpers/lora_probe.py: (its output dir, what the probe saw at the start and
    end)."""
    torch.save(BATCH, tmp_path / "batch.pt")
    out = str(tmp_path / "lora")
    argv = [tmp_path / "batch.pt", tmp_path / "probe.pt"] + world_args(world_model, out, epochs) + LORA + list(extra)
    command, env = iqstar_command(argv, launcher, script=PROBE)
    ok(subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT))
    return out, torch.load(tmp_path / "probe.pt")


@pytest.fixture(scope="module")
def lora_run(world_model, tmp_path_factory):
    """Four epochs with LoRA in one process, fp32, probed."""
    return probed_run(world_model, tmp_path_factory.mktemp("lora"), 4)


def logprobs(model):
    return iqstar.policy_logprobs(model.eval(), BATCH["prompts"], BATCH["responses"], BATCH["pad"], "cpu")[0].float()


def frozen_targets(model):
    """log π̂ by a separately loaded copy of the model, π_w and π_l both."""
    batch = (BATCH["principled"], BATCH["prompts"], BATCH["responses"])
    return iqstar.superior_targets(model, model, *batch, 1.4, BATCH["pad"], "cpu")


def check_lora_run(world_model, out, probe, dtype):
    """What every LoRA run must show: no frozen copy loaded; at the first step π_θ = μ and the adapter-off targets are
    a frozen copy's; at the end μ has not moved and π_θ has moved towards π̂; the merged model and the adapter reload as
    π_θ, in the run's dtype."""
    sft = AutoModelForCausalLM.from_pretrained(world_model, dtype=dtype)
    start, end, tolerance = probe["start"], probe["end"], dict(rtol=1e-6, atol=1e-6)
    assert probe["frozen_copies"] == 0
    assert torch.equal(start["policy"], start["base"])  # B = 0: the adapter adds exactly nothing
    torch.testing.assert_close(start["base"], logprobs(sft), **tolerance)
    torch.testing.assert_close(start["targets"], frozen_targets(sft), **tolerance)
    assert torch.equal(end["base"], start["base"]) and torch.equal(end["targets"], start["targets"])  # μ never moves
    assert not torch.equal(end["policy"], start["policy"])  # π_θ moved (towards π̂: the adherence below)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert not any("lora" in k for k in f.keys()) and {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)  # plain transformers, as evaluate.py loads it
    torch.testing.assert_close(logprobs(merged), end["policy"], rtol=0, atol=1e-5 if dtype == torch.float32 else 0.1)
    base = AutoModelForCausalLM.from_pretrained(world_model, dtype=dtype)
    adapter = PeftModel.from_pretrained(base, out + "/adapter", autocast_adapter_dtype=False)  # as iqstar ran it
    torch.testing.assert_close(logprobs(adapter), end["policy"], **tolerance)
    config = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 16.0, 0.0)
    tokenizer = AutoTokenizer.from_pretrained(out)  # the un-prompted policy now keeps to the principle, as π̂ does
    _, held_out = world.split_prompts()
    refuse_before, _ = world.adherence(sft.float(), tokenizer, held_out)
    refuse_after, comply_after = world.adherence(merged.float(), tokenizer, held_out)
    assert refuse_after > refuse_before + 0.3, (refuse_before, refuse_after)
    assert comply_after > 0.85, comply_after


@pytest.mark.process
def test_lora_trains_an_adapter_on_the_base_and_saves_it_merged_and_alone(world_model, lora_run):
    """One process, fp32, as `python iqstar.py --lora-r 8` runs: every property of check_lora_run."""
    check_lora_run(world_model, *lora_run, torch.float32)


@pytest.mark.process
def test_lora_two_epochs_then_resume_to_four_equal_four_straight(world_model, lora_run, tmp_path):
    """The checkpoint holds the adapter and its optimizer state, not the frozen base: 2 epochs, then --resume to 4,
    give the same merged model, adapter and metrics, bit for bit, as 4 in one go."""
    out = str(tmp_path / "run")
    ok(run_iqstar(world_args(world_model, out, 2) + LORA))
    ok(run_iqstar(world_args(world_model, out, 4) + LORA + ["--resume"]))
    assert_same_run(out, lora_run[0])
    ours, theirs = (load_file(os.path.join(d, "adapter", "adapter_model.safetensors")) for d in (out, lora_run[0]))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    checkpoint = os.path.join(out, "checkpoints", "epoch-4", "mp_rank_00_model_states.pt")
    module = torch.load(checkpoint, weights_only=False)["module"]
    frozen = {k for k in module if "lora_" not in k}  # the adapter only, but for a name of the tied head
    assert len(module) > len(frozen) and frozen <= {"base_model.model.lm_head.weight"}, frozen


@pytest.mark.process
@pytest.mark.parametrize(
    "extra, ranks",
    [
        pytest.param(["--dtype", "bf16", "--gradient-checkpointing"], 1, id="bf16-checkpointing"),
        pytest.param(["--dtype", "bf16"], 2, id="zero3-2ranks-bf16", marks=LAUNCHED),
        pytest.param(["--gradient-checkpointing"], 2, id="zero3-2ranks-fp32-checkpointing", marks=LAUNCHED),
    ],
)
def test_lora_in_bf16_under_zero3_and_with_checkpointing(world_model, tmp_path, extra, ranks):
    """LoRA in the run's other forms, each with every property of check_lora_run: bf16 on CPU (PEFT's adapter in the
    model's dtype), ZeRO-3 on two ranks (the adapter-off targets a collective of the training engine), and with
    gradient checkpointing."""
    launcher = deepspeed_launcher(ranks) if ranks > 1 else None
    out, probe = probed_run(world_model, tmp_path, 4, extra, launcher)
    check_lora_run(world_model, out, probe, torch.bfloat16 if "bf16" in extra else torch.float32)
    assert len(read_metrics(out)) == 4


def test_lora_without_peft_installed_is_one_line(good, monkeypatch, capsys):
    err = error_without("peft", good + ["--lora-r", "8"], monkeypatch, capsys)
    assert err == "iqstar.py: error: --lora-r: peft is not installed (pip install peft)"
    assert not os.path.exists(good[-1])
