import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IQSTAR = os.path.join(ROOT, "iqstar.py")
sys.path[:0] = [ROOT, os.path.join(ROOT, "demo")]

import world  # noqa: E402


def unavailable(message):
    """Something `make test` installs or builds is missing: fail under CI (.ci/run sets CI), skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process DeepSpeed runs (still part of `make test`)")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """An untrained 2-layer GPT-2 with the world's tokenizer, saved and reloaded like a user's model."""
    path = str(tmp_path_factory.mktemp("tiny"))
    world.random_model(path, seed=0)
    return path


@pytest.fixture(scope="session")
def world_model(tmp_path_factory):
    """The demo world's SFT model (built once per test session, ~20 s) and its prompt files."""
    path = str(tmp_path_factory.mktemp("world"))
    world.build(path, seed=0)
    train, held_out = world.split_prompts()
    world.write_prompts(os.path.join(path, "train.jsonl"), train)
    return path


def iqstar_command(args, launcher=None, script=IQSTAR, env=None):
    """The command line and environment of `python iqstar.py ...`, or of it under a launcher prefix (deepspeed)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return (launcher or [sys.executable]) + ([script] if script else []) + [str(a) for a in args], env


def run_iqstar(args, launcher=None, timeout=600, script=IQSTAR, env=None):
    """Run the real script in a subprocess, to the end."""
    command, env = iqstar_command(args, launcher, script, env)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def world_args(world_model, output_dir, epochs, samples=24):
    """iqstar.py on the demo world: 24 samples are 3 training steps (iqstar_loss calls) per epoch on one rank, and 4
    or so generate() calls (sample_responses calls): prompts of 7-10 tokens + 16 new ones, 7 or 8 rows within the
    --kv-cache-tokens budget of 200."""
    return [
        "--model",
        world_model,
        "--dataset",
        os.path.join(world_model, "train.jsonl"),
        "--principle",
        world.PRINCIPLE,
        "--lr",
        "1e-3",
        "--epochs",
        epochs,
        "--samples-per-epoch",
        samples,
        "--max-new-tokens",
        16,
        "--batch-size",
        8,
        "--kv-cache-tokens",
        200,
        "--output-dir",
        output_dir,
        "--seed",
        0,
    ]


@pytest.fixture(scope="session")
def straight(world_model, tmp_path_factory):
    """Four epochs in one go, one process (stderr joined to stdout, as in a log file): what the tests of the run's
    output check, and what every interrupted and resumed run must reproduce exactly."""
    out = str(tmp_path_factory.mktemp("straight"))
    command, env = iqstar_command(world_args(world_model, out, 4) + ["--snapshot-every", 2])
    result = subprocess.run(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    return out, result
