import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "demo")]

import world  # noqa: E402


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


def iqstar_command(args, launcher=None, script=os.path.join(ROOT, "iqstar.py"), env=None):
    """The command line and environment of `python iqstar.py ...`, or of it under a launcher prefix (deepspeed)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return (launcher or [sys.executable]) + ([script] if script else []) + [str(a) for a in args], env


def run_iqstar(args, launcher=None, timeout=600, script=os.path.join(ROOT, "iqstar.py"), env=None):
    """Run the real script in a subprocess, to the end."""
    command, env = iqstar_command(args, launcher, script, env)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
