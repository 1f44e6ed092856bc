"""Runs that survive: resume, interruption and divergence; and responses that are only EOS or never end."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import iqstar
import world
from conftest import ROOT, iqstar_command, read_metrics, run_iqstar

FAULTY = os.path.join(ROOT, "tests", "faulty.py")
TIMES = {"sample_seconds", "score_seconds", "train_seconds"}


def world_args(world_model, output_dir, epochs):
    # 24 samples: 2 rollout batches (sample_responses calls) and 3 training steps (policy_loss calls) per epoch
    return ["--model", world_model, "--dataset", os.path.join(world_model, "train.jsonl"),
            "--principle", world.PRINCIPLE, "--lr", "1e-3", "--epochs", epochs, "--samples-per-epoch", 24,
            "--max-new-tokens", 16, "--batch-size", 8, "--rollout-batch-size", 12, "--output-dir", output_dir]


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def assert_same_run(out, reference):
    """The same weights, bit for bit, and the same metrics but for the seconds each phase took."""
    ours, theirs = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(reference, "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    strip = lambda metrics: [{k: v for k, v in m.items() if k not in TIMES} for m in metrics]  # noqa: E731
    assert strip(read_metrics(out)) == strip(read_metrics(reference))


def checkpoint_of(out):
    with open(os.path.join(out, "checkpoints", "latest.json")) as f:
        latest = json.load(f)
    folder = os.path.join(out, "checkpoints")
    assert [n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n))] == [latest["tag"]]  # one kept
    return latest


@pytest.fixture(scope="module")
def straight(world_model, tmp_path_factory):
    """Four epochs in one go: what every interrupted and resumed run below must reproduce exactly."""
    out = str(tmp_path_factory.mktemp("straight"))
    ok(run_iqstar(world_args(world_model, out, 4)))
    return out


def test_two_epochs_and_a_resume_to_four_equal_four_straight(world_model, straight, tmp_path):
    out = str(tmp_path / "run")
    ok(run_iqstar(world_args(world_model, out, 2)))
    assert checkpoint_of(out)["tag"] == "epoch-2"
    refused = run_iqstar(world_args(world_model, out, 4))
    assert refused.returncode == 2 and "pass --resume to go on with it or --overwrite" in refused.stderr
    resumed = ok(run_iqstar(world_args(world_model, out, 4) + ["--resume"]))
    assert "resumed from" in resumed.stdout and "after epoch 2" in resumed.stdout
    assert_same_run(out, straight)
    assert checkpoint_of(out)["tag"] == "epoch-4"


@pytest.mark.parametrize("fault, where, tag", [
    ({"sigterm_sample": 3}, "while sampling epoch 2", "epoch-1"),  # the epoch is abandoned, then redone
    ({"sigterm_train": 8}, "while training epoch 3", "epoch-3-step-2"),  # the step finishes; the epoch goes on
])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_loses_nothing(world_model, straight, tmp_path, fault, where,
                                                                       tag):
    out = str(tmp_path / "run")
    stopped = run_iqstar(world_args(world_model, out, 4), script=FAULTY, env={"IQSTAR_FAULTS": json.dumps(fault)})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert f"stopped by SIGTERM {where}; saved {out}/checkpoints/{tag}" in stopped.stderr
    assert "--resume" in stopped.stderr.strip().splitlines()[-1]
    assert checkpoint_of(out)["tag"] == tag
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    ok(run_iqstar(world_args(world_model, out, 4) + ["--resume"]))
    assert_same_run(out, straight)


def test_ctrl_c_from_outside_at_any_moment(world_model, straight, tmp_path):
    """A real SIGINT from another process, whenever it lands after epoch 1: exit 130, then resume to the same run."""
    out = str(tmp_path / "run")
    command, env = iqstar_command(world_args(world_model, out, 4))
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("epoch 1/4"):
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "stopped by SIGINT" in err and "Run the same command with --resume to go on." in err
    ok(run_iqstar(world_args(world_model, out, 4) + ["--resume"]))
    assert_same_run(out, straight)


def test_a_signal_while_starting_leaves_no_lock_behind(world_model, tmp_path):
    """SIGTERM while a first start JIT-builds DeepSpeed's ops: one line, exit 143, and no lock file left to make
    every later start wait forever (as a killed build's did, once, to CI)."""
    extensions = tmp_path / "torch_extensions"  # empty: this start builds its ops there
    command, env = iqstar_command(world_args(world_model, str(tmp_path / "run"), 1),
                                  env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(extensions.glob("*/lock")):  # the lock exists while an op builds
        assert process.poll() is None and time.time() < deadline, "no DeepSpeed op build was seen"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "iqstar.py: stopped by SIGTERM while starting; nothing was saved" in err
    assert not list(extensions.glob("*/lock"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "latest.json")


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_and_they_resume_as_one_run(world_model, tmp_path):
    """Two DeepSpeed ranks; SIGTERM reaches rank 1 only, in epoch 2's first step. Rank 0 learns it at the next
    check, both save their part of one checkpoint, and the resumed run equals an uninterrupted one."""
    from test_train import deepspeed_launcher
    straight, out = str(tmp_path / "straight"), str(tmp_path / "run")
    ok(run_iqstar(world_args(world_model, straight, 2), launcher=deepspeed_launcher(2)))
    stopped = run_iqstar(world_args(world_model, out, 2), launcher=deepspeed_launcher(2), script=FAULTY,
                         env={"IQSTAR_FAULTS": json.dumps({"sigterm_train": 3, "rank": 1})})
    assert stopped.returncode != 0
    assert f"stopped by SIGTERM while training epoch 2; saved {out}/checkpoints/epoch-2-step-1" in stopped.stderr
    ok(run_iqstar(world_args(world_model, out, 2) + ["--resume"], launcher=deepspeed_launcher(2)))
    assert_same_run(out, straight)


def test_non_finite_steps_are_skipped_and_counted(world_model, tmp_path):
    out = str(tmp_path / "run")
    faults = {"nan_loss": [2], "nan_grad": [4]}  # step 2 of epoch 1, step 1 of epoch 2
    result = ok(run_iqstar(world_args(world_model, out, 2), script=FAULTY, env={"IQSTAR_FAULTS": json.dumps(faults)}))
    metrics = read_metrics(out)
    assert [m["skipped_steps"] for m in metrics] == [1, 1]
    assert all(torch.isfinite(torch.tensor([m["loss"], m["credit"], m["target_logp"]])).all() for m in metrics)
    assert "skipped 1" in result.stdout
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_run_of_non_finite_steps_stops_it_and_the_weights_stay_good(world_model, tmp_path):
    out = str(tmp_path / "run")
    stopped = run_iqstar(world_args(world_model, out, 2) + ["--max-skipped-steps", 3], script=FAULTY,
                         env={"IQSTAR_FAULTS": json.dumps({"nan_loss_from": 1})})
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "stopped: 3 steps in a row had a non-finite loss or gradient" in stopped.stderr
    assert checkpoint_of(out)["tag"] == "epoch-1-step-3"
    # Nothing was applied: resumed with a tiny --lr (this command's, not the checkpoint's), the policy is the SFT model.
    ok(run_iqstar(world_args(world_model, out, 2) + ["--resume", "--lr", "1e-12"]))
    assert [m["skipped_steps"] for m in read_metrics(out)] == [3, 0]
    sft = AutoModelForCausalLM.from_pretrained(world_model).state_dict()
    trained = load_file(os.path.join(out, "model.safetensors"))
    assert max((trained[k] - sft[k]).abs().max().item() for k in trained) < 1e-8


def test_resume_needs_a_checkpoint_of_as_many_ranks(world_model, tmp_path):
    out = str(tmp_path / "run")
    result = run_iqstar(world_args(world_model, out, 2) + ["--resume"])
    assert result.returncode == 2
    assert f"--resume: {out}/checkpoints holds no complete checkpoint" in result.stderr
    os.makedirs(os.path.join(out, "checkpoints"))
    with open(os.path.join(out, "checkpoints", "latest.json"), "w") as f:
        json.dump({"tag": "epoch-1", "epoch": 1, "world_size": 2, "run": {}}, f)
    result = run_iqstar(world_args(world_model, out, 2) + ["--resume"])
    assert result.returncode == 2 and f"--resume: the checkpoint in {out}/checkpoints was written by 2 rank(s) and " \
        "this run has 1; resume with 2" in result.stderr, result.stderr[-2000:]


def degenerate_model(tiny_model, path, eos_logit):
    """The tiny model with a constant next-token distribution whose EOS logit is `eos_logit` above... or below."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with torch.no_grad():
        ln_f, wte = model.transformer.ln_f, model.transformer.wte.weight  # the unembedding is tied to wte
        ln_f.weight.zero_()  # every position's final hidden state is ln_f.bias, whatever the input
        ln_f.bias.copy_(torch.randn_like(ln_f.bias))
        wte[tokenizer.eos_token_id] = eos_logit * ln_f.bias / ln_f.bias.norm() ** 2
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("eos_logit, length, eos_rate", [(60.0, 1, 1.0), (-60.0, 5, 0.0)])
def test_responses_that_are_only_eos_or_never_end(tiny_model, tmp_path, eos_logit, length, eos_rate):
    """Only EOS: one token, trained on. No EOS before --max-new-tokens: all 5 tokens, counted as not ended.
    The data file is hostile too: the run reports its skipped lines at the start and trains on the rest."""
    model = degenerate_model(tiny_model, str(tmp_path / "model"), eos_logit)
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"prompt": "how do i bake a cake"}\n[1]\n{"prompt": "\xff"}\n{"prompt": "hi"}\n')
    out = str(tmp_path / "run")
    result = ok(run_iqstar(["--model", model, "--dataset", data, "--epochs", 1, "--samples-per-epoch", 8,
                            "--max-new-tokens", 5, "--batch-size", 4, "--output-dir", out]))
    assert f"--dataset {data}: skipped 2 of 4: 1 not a JSON object (line 2); 1 not UTF-8 text (line 3)" in result.stdout
    [m] = read_metrics(out)
    assert (m["mean_response_length"], m["eos_rate"], m["response_tokens"]) == (length, eos_rate, 8 * length)
    assert torch.isfinite(torch.tensor([m["loss"], m["credit"]])).all() and m["skipped_steps"] == 0
    AutoModelForCausalLM.from_pretrained(out)


def test_masks_of_an_eos_only_and_an_unended_response(tiny_model):
    eos, pad = 3, 0
    completions = torch.tensor([[eos, pad, pad, pad], [5, 6, 7, 8], [5, eos, 5, eos]])
    assert iqstar.completion_mask(completions, [eos]).tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
