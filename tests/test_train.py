"""The real script, end to end, on the demo world: one process and two DeepSpeed ranks on CPU."""
import json
import os
import socket
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import world
from conftest import ROOT, read_metrics, run_iqstar

KEYS = {"epoch", "loss", "credit", "response_tokens", "sample_seconds", "train_seconds"}


def deepspeed_launcher(ranks):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks),
            "--master_port", str(port)]


def world_args(world_model, output_dir, samples=32):
    return ["--model", world_model, "--dataset", os.path.join(world_model, "train.jsonl"),
            "--principle", world.PRINCIPLE, "--alpha", "1.4", "--lr", "1e-3", "--epochs", "3",
            "--samples-per-epoch", samples, "--max-new-tokens", "24", "--batch-size", "8",
            "--rollout-batch-size", "16", "--output-dir", output_dir, "--seed", "0"]


def check_run(result, world_model, output_dir, epochs=3):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    metrics = read_metrics(output_dir)
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))
    assert all(KEYS <= set(m) for m in metrics)
    assert all(m["response_tokens"] > 0 and m["loss"] >= 0 for m in metrics)
    assert sum(line.startswith("epoch ") for line in result.stdout.splitlines()) == epochs  # one line per epoch
    # The saved policy loads like any HF model, and the un-prompted model moved towards the principled one.
    trained = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    sft = AutoModelForCausalLM.from_pretrained(world_model)
    _, held_out = world.split_prompts()
    refuse_before, comply_before = world.adherence(sft, tokenizer, held_out)
    refuse_with_principle, _ = world.adherence(sft, tokenizer, held_out, world.PRINCIPLE)
    refuse_after, comply_after = world.adherence(trained, tokenizer, held_out)
    assert refuse_before < 0.5 < refuse_with_principle
    assert refuse_after > refuse_before + 0.3, (refuse_before, refuse_after)
    assert comply_after > 0.85, comply_after
    return metrics


def test_single_process_run(world_model, tmp_path):
    out = str(tmp_path / "run")
    result = run_iqstar(world_args(world_model, out))
    check_run(result, world_model, out)
    assert "saved the aligned policy" in result.stdout
    # A second run into the same directory is refused, and --overwrite replaces the first run.
    again = run_iqstar(world_args(world_model, out) + ["--epochs", "1"])
    assert again.returncode == 2 and "already holds a run" in again.stderr
    again = run_iqstar(world_args(world_model, out) + ["--epochs", "1", "--overwrite"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(read_metrics(out)) == 1


def check_generation_modes(report, ranks):
    """Both modes sampled the same tokens from the same seeds; gathering held the whole policy and gave it back."""
    assert report["off"]["gathered"] is False and report["on"]["gathered"] is True
    assert report["on"]["whole_inside"] and not report["off"]["whole_inside"]
    assert report["on"]["calls"] == report["off"]["calls"]  # identical tokens, every call, every rank
    assert all(len(call) == ranks for call in report["on"]["calls"]) and len(report["on"]["calls"]) == 6
    for mode in ("off", "on"):
        assert report[mode]["partitioned_after"]
        assert report[mode]["hooks_after"] == report["hooks_before"]  # ZeRO-3's hooks are back for training
    assert report["auto_when_nothing_fits"] is False
    assert report["loss_after"] == report["loss_after"]  # a training step after gathering: not NaN


def test_gathered_generation_samples_the_same_tokens_on_one_rank(tiny_model, tmp_path):
    out = tmp_path / "report.json"
    result = run_iqstar([tiny_model, out], script=os.path.join(ROOT, "tests", "uneven_generate.py"), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    check_generation_modes(json.loads(out.read_text()), ranks=1)
    assert "--gather-for-generation auto: off" in result.stdout  # one line saying why


@pytest.mark.slow
def test_two_ranks_generate_with_uneven_lengths(tiny_model, tmp_path):
    """Synced (layer by layer) and gathered (no synced_gpus): neither hangs when the ranks finish apart."""
    out = tmp_path / "report.json"
    result = run_iqstar([tiny_model, out], launcher=deepspeed_launcher(2) + [os.path.join(ROOT, "tests", "uneven_generate.py")],
                        timeout=300, script=None)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    check_generation_modes(report, ranks=2)
    lengths = [[len(y) for y in call] for call in report["on"]["calls"]]
    assert any(a != b for a, b in lengths), lengths  # the ranks did finish at different lengths
    assert result.stdout.count("--gather-for-generation auto: off") == 1  # rank 0 only


@pytest.mark.slow
def test_two_ranks_end_to_end(world_model, tmp_path):
    out = str(tmp_path / "run2")
    result = run_iqstar(world_args(world_model, out), launcher=deepspeed_launcher(2))
    check_run(result, world_model, out)
