"""The real script, end to end, on the demo world: one process, and two DeepSpeed ranks on CPU."""

import json
import os
import re
import signal
import subprocess

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import world
from conftest import HELPERS, ROOT, iqstar_command, read_metrics, run_iqstar, world_args
from tools.common import deepspeed_launcher

KEYS = {
    "epoch",
    "loss",
    "credit",
    "target_logp",
    "response_tokens",
    "mean_response_length",
    "eos_rate",
    "skipped_steps",
    "sample_seconds",
    "score_seconds",
    "train_seconds",
}
FAULTY = os.path.join(HELPERS, "faulty.py")


def check_run(world_model, output_dir, epochs):
    """metrics.jsonl has every epoch and key; the saved policy loads like any HF model, and the un-prompted
    model moved towards the principled one without losing helpfulness."""
    metrics = read_metrics(output_dir)
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))
    assert all(set(m) == KEYS for m in metrics)
    assert all(m["response_tokens"] > 0 and m["loss"] >= 0 and m["skipped_steps"] == 0 for m in metrics)
    trained = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    sft = AutoModelForCausalLM.from_pretrained(world_model)
    _, held_out = world.split_prompts()
    refuse_before, _ = world.adherence(sft, tokenizer, held_out)
    refuse_with_principle, _ = world.adherence(sft, tokenizer, held_out, world.PRINCIPLE)
    refuse_after, comply_after = world.adherence(trained, tokenizer, held_out)
    assert refuse_before < 0.5 < refuse_with_principle
    assert refuse_after > refuse_before + 0.3, (refuse_before, refuse_after)
    assert comply_after > 0.85, comply_after
    return metrics


@pytest.mark.process
def test_single_process_run(world_model, straight):
    out, result = straight
    assert result.returncode == 0, result.stdout[-4000:]
    check_run(world_model, out, 4)
    # In a log (stdout and stderr in one file), each epoch's line is a line of its own, not after a bar's last frame.
    lines = re.findall(r"^epoch (\d)/4  loss [\d.]+  credit .*  train_seconds [\d.]+$", result.stdout, re.M)
    assert lines == ["1", "2", "3", "4"], result.stdout[-3000:]
    assert result.stdout.rstrip().endswith(f"saved the aligned policy to {out}")
    assert "Traceback" not in result.stdout and "FutureWarning" not in result.stdout
    # --snapshot-every 2: epoch 2's policy as an HF model; the last epoch's is the final one in --output-dir
    AutoModelForCausalLM.from_pretrained(os.path.join(out, "epoch-2"))
    assert not os.path.exists(os.path.join(out, "epoch-4"))
    # one checkpoint kept; one process runs without ZeRO, so DeepSpeed writes no zero_to_fp32.py beside it
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["epoch-4", "latest.json"]


@pytest.mark.process
def test_the_script_ends_after_atexit_handlers_with_its_output_flushed_and_no_teardown(world_model, tmp_path):
    """`python iqstar.py` runs atexit's handlers (wandb ends its run in one), flushes a block-buffered stdout and then
    ends without the interpreter's teardown, where DeepSpeed's process groups are freed and could abort a rank."""
    hooks, out = tmp_path / "hooks", str(tmp_path / "run")
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "atexit.register(os.write, 2, b'an atexit handler ran\\n')\n"
        "class Teardown:\n"
        "    def __del__(self, write=os.write):  # a module global: freed in the interpreter's teardown\n"
        "        write(2, b'the interpreter was torn down\\n')\n"
        "marker = Teardown()\n"
    )
    command, env = iqstar_command(world_args(world_model, out, 1, samples=8))
    del env["PYTHONUNBUFFERED"]  # stdout to a pipe is block-buffered: os._exit would drop what was not flushed
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(env, PYTHONPATH=str(hooks))
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rstrip().endswith(f"saved the aligned policy to {out}")
    assert "an atexit handler ran" in result.stderr and "torn down" not in result.stderr, result.stderr[-2000:]


@pytest.mark.process
@pytest.mark.launcher
@pytest.mark.slow
def test_two_ranks_a_signal_to_one_stops_both_and_they_resume(world_model, tmp_path):
    """Two DeepSpeed ranks; SIGTERM reaches rank 1 only, in epoch 3's first step. Both stop with 143; the line names
    epoch 2's checkpoint, from which two ranks go on, now sampling layer by layer (responses end at different
    lengths on the two ranks: generate() keeps them in step)."""
    out = str(tmp_path / "run")
    args = world_args(world_model, out, 3, samples=32) + ["--max-new-tokens", 24]  # 16 per rank: 2 steps an epoch
    stopped = run_iqstar(
        args,
        launcher=deepspeed_launcher(2),
        script=FAULTY,
        env={"IQSTAR_FAULTS": json.dumps({"signal_train": 5, "rank": 1})},
    )
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-4000:]
    assert (
        f"iqstar.py: stopped by SIGTERM in epoch 3; resume from {out}/checkpoints/epoch-2: run the same "
        "command with --resume" in stopped.stderr
    ), stopped.stderr[-4000:]
    assert len(read_metrics(out)) == 2 and not os.path.exists(os.path.join(out, "model.safetensors"))
    resumed = run_iqstar(args + ["--resume", "--gather-for-generation", "off"], launcher=deepspeed_launcher(2))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout and "terminate called" not in resumed.stderr
    check_run(world_model, out, 3)
