"""Runs that survive: resume, signals and divergence; and responses that are only EOS or never end."""

import json
import os
import signal
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import iqstar
from conftest import HELPERS, ROOT, assert_same_run, iqstar_command, ok, read_metrics, run_iqstar, world_args

FAULTY = os.path.join(HELPERS, "faulty.py")


def checkpoint_of(out):
    with open(os.path.join(out, "checkpoints", "latest.json")) as f:
        latest = json.load(f)
    folder = os.path.join(out, "checkpoints")
    assert [n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n))] == [latest["tag"]]  # one kept
    return latest


@pytest.mark.process
def test_two_epochs_then_resume_to_four_equal_four_straight_through_a_ctrl_c(world_model, straight, tmp_path):
    """--overwrite replaces an old run; 2 epochs, then --resume to 4, stopped by SIGINT in epoch 4 (exit 130, one
    line naming epoch 3's checkpoint), resumed again past a half-saved checkpoint: the same weights and metrics
    as 4 epochs in one go."""
    out = tmp_path / "run"
    (out / "checkpoints" / "epoch-9").mkdir(parents=True)  # an old run, which --overwrite replaces
    (out / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 9}) + "\n")
    out = str(out)
    ok(run_iqstar(world_args(world_model, out, 2) + ["--overwrite"]))
    assert checkpoint_of(out)["tag"] == "epoch-2" and len(read_metrics(out)) == 2
    stopped = run_iqstar(
        world_args(world_model, out, 4) + ["--resume"],
        script=FAULTY,
        env={"IQSTAR_FAULTS": json.dumps({"signal_train": 5, "signal": "SIGINT"})},
    )  # epoch 4, step 2
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"iqstar.py: stopped by SIGINT in epoch 4; resume from "
        f"{out}/checkpoints/epoch-3: run the same command with --resume"
    )
    assert checkpoint_of(out)["tag"] == "epoch-3" and len(read_metrics(out)) == 3
    half_saved = os.path.join(out, "checkpoints", "epoch-4")  # as a save killed halfway leaves it: latest.json
    os.makedirs(half_saved)  # names the one before, which is resumed from; the next save replaces this one
    open(os.path.join(half_saved, "mp_rank_00_model_states.pt"), "w").write("cut short")
    resumed = ok(run_iqstar(world_args(world_model, out, 4) + ["--resume"]))
    assert f"resumed from {out}/checkpoints/epoch-3 after epoch 3" in resumed.stdout
    assert_same_run(out, straight[0])
    assert checkpoint_of(out)["tag"] == "epoch-4"


@pytest.mark.process
def test_a_signal_while_starting_leaves_no_lock_behind(world_model, tmp_path):
    """SIGTERM while a first start JIT-builds DeepSpeed's ops: one line, exit 143, and no lock file left to make
    every later start wait forever (as a killed build's did, once, to CI)."""
    extensions = tmp_path / "torch_extensions"  # empty: this start builds its ops there
    command, env = iqstar_command(
        world_args(world_model, str(tmp_path / "run"), 1), env={"TORCH_EXTENSIONS_DIR": str(extensions)}
    )
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not list(extensions.glob("*/lock")):  # the lock exists while an op builds: minutes, on 2 cores
            assert process.poll() is None, "the run ended before any DeepSpeed op build was seen"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1] == "iqstar.py: stopped by SIGTERM while starting; nothing was saved"
    assert not list(extensions.glob("*/lock"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "latest.json")


@pytest.mark.process
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(world_model, tmp_path):
    """NaN gradients (steps 1, 2) and NaN losses (from step 3) are skipped: epoch 1 ends with 3 skipped and
    its checkpoint; the 4th in a row (--max-skipped-steps 4) stops the run with status 3. Nothing skipped
    changed the policy: epoch 1's checkpoint holds the SFT weights, bit for bit."""
    out = str(tmp_path / "run")
    faults = {"nan_grad": [1, 2], "nan_loss_from": 3}
    stopped = run_iqstar(
        world_args(world_model, out, 2) + ["--max-skipped-steps", 4],
        script=FAULTY,
        env={"IQSTAR_FAULTS": json.dumps(faults)},
    )
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        "iqstar.py: stopped: 4 steps in a row had a non-finite loss or gradient, and none of them changed the policy "
        f"(epoch 2). Lower --lr or check the data; resume from {out}/checkpoints/epoch-1 with --resume"
    )
    [m] = read_metrics(out)
    assert m["skipped_steps"] == 3 and (m["loss"], m["credit"], m["target_logp"]) == (0, 0, 0)
    assert "skipped_steps 3" in stopped.stdout
    # one process runs without ZeRO: DeepSpeed's checkpoint holds the module's state dict whole
    weights = torch.load(os.path.join(out, "checkpoints", "epoch-1", "mp_rank_00_model_states.pt"), weights_only=False)[
        "module"
    ]
    sft = AutoModelForCausalLM.from_pretrained(world_model).state_dict()
    assert weights.keys() <= sft.keys() and len(weights) > 10
    assert all(torch.equal(weights[k], sft[k]) for k in weights)


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


@pytest.mark.process
def test_responses_that_are_only_eos(tiny_model, tmp_path):
    """Only EOS: one token, trained on, counted as ended (responses that never end: test_masks_... below). The data
    file is hostile too: the run reports its skipped lines at the start and trains on the rest."""
    model, length, eos_rate = degenerate_model(tiny_model, str(tmp_path / "model"), 60.0), 1, 1.0
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"prompt": "how do i bake a cake"}\n[1]\n{"prompt": "\xff"}\n{"prompt": "hi"}\n')
    out = str(tmp_path / "run")
    result = ok(
        run_iqstar(
            [
                "--model",
                model,
                "--dataset",
                data,
                "--epochs",
                1,
                "--samples-per-epoch",
                8,
                "--max-new-tokens",
                5,
                "--batch-size",
                4,
                "--output-dir",
                out,
            ]
        )
    )
    assert f"--dataset {data}: skipped 2 of 4: 1 not a JSON object (line 2); 1 not UTF-8 text (line 3)" in result.stdout
    [m] = read_metrics(out)
    assert (m["mean_response_length"], m["eos_rate"], m["response_tokens"]) == (length, eos_rate, 8 * length)
    assert torch.isfinite(torch.tensor([m["loss"], m["credit"]])).all() and m["skipped_steps"] == 0
    AutoModelForCausalLM.from_pretrained(out)


def test_masks_of_an_eos_only_and_an_unended_response():  # unended: every token up to --max-new-tokens trains
    eos, pad = 3, 0
    completions = torch.tensor([[eos, pad, pad, pad], [5, 6, 7, 8], [5, eos, 5, eos]])
    assert iqstar.completion_mask(completions, [eos]).tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
