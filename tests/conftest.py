import importlib.util
import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import iqstar
import world
from tools import common
from tools.common import IQSTAR, ROOT

HELPERS = os.path.join(ROOT, "tests", "helpers")  # scripts run in a child process, beside iqstar.py or instead
# They run by path, under deepspeed too, and import iqstar from the repository root through PYTHONPATH
PYTHONPATH = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
TIMES = {"sample_seconds", "score_seconds", "train_seconds"}
# The marks that follow from a fixture, for every test that uses it, here or in any test file
FIXTURE_MARKS = {
    "world_model": ("world",),
    "straight": ("process",),
    "smollm2": ("smollm2",),
}


@pytest.hookimpl(tryfirst=True)  # before -m selects by the marks
def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, marks in FIXTURE_MARKS.items():
            if fixture in item.fixturenames:
                for mark in marks:
                    item.add_marker(mark)


def unavailable(message):
    """Something `make test` installs or builds is missing: fail under CI (.ci/run sets CI), skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


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


@pytest.fixture
def good(tiny_model, tmp_path):
    """The flags of a run that would start: the tiny model, one prompt, OUT (the last flag) not there yet."""
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "how do i bake a cake"}) + "\n")
    return [
        "--model",
        tiny_model,
        "--dataset",
        str(data),
        "--max-new-tokens",
        "16",
        "--output-dir",
        str(tmp_path / "out"),
    ]


def error_without(package, argv, monkeypatch, capsys):
    """iqstar.main(argv) as where `package` is not installed: exit status 2, and the error it printed."""
    real_find_spec = importlib.util.find_spec

    def hidden(name, *rest):
        return None if name == package else real_find_spec(name, *rest)

    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    with pytest.raises(SystemExit) as e:
        iqstar.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip()


def iqstar_command(args, launcher=None, script=IQSTAR, env=None):
    """The command line and environment of `python iqstar.py ...`, or of it under a launcher prefix (deepspeed), or of
    a script of tests/helpers/."""
    return common.iqstar_command(args, launcher, script, dict({"PYTHONPATH": PYTHONPATH}, **(env or {})))


def run_iqstar(args, launcher=None, timeout=600, script=IQSTAR, env=None):
    """Run the real script in a subprocess, to the end."""
    command, env = iqstar_command(args, launcher, script, env)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(out, reference):
    """The same weights, bit for bit, and the same metrics but for the seconds each phase took."""
    ours, theirs = (
        load_file(os.path.join(out, "model.safetensors")),
        load_file(os.path.join(reference, "model.safetensors")),
    )
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name

    def untimed(metrics):
        return [{k: v for k, v in m.items() if k not in TIMES} for m in metrics]

    assert untimed(read_metrics(out)) == untimed(read_metrics(reference))


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
