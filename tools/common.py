"""What the demos, the benchmarks and the tests share: iqstar.py (or a script beside it) started as a child process in
an environment without a launcher's variables, DeepSpeed's launcher on a free port, a record of the machine that
measured, and a tiny random GPT-2.

Imported from the repository root: `python -m bench.bench` and pytest (pyproject.toml's pythonpath) run there.
"""

import importlib.metadata
import os
import platform
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IQSTAR = os.path.join(ROOT, "iqstar.py")
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(env=None, **extra):
    """A child's environment: this process's (or `env`) and `extra`, with unbuffered output and tokenizers without
    their thread pool, and without a launcher's variables, so that a child of a rank is a world of its own."""
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **extra)
    for key in LAUNCHER_VARIABLES:
        env.pop(key, None)
    return env


def iqstar_command(args, launcher=None, script=IQSTAR, env=None):
    """The command line and environment of `python iqstar.py ARGS`, of it under a launcher prefix (deepspeed ...), or
    of another script (script=None: the launcher's own command); `env`: variables to add."""
    command = (launcher or [sys.executable]) + ([script] if script else []) + [str(a) for a in args]
    return command, clean_env(**(env or {}))


def free_port():
    """A TCP port that is free on 127.0.0.1 now, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher(ranks):
    """This venv's `deepspeed --num_gpus RANKS --master_port PORT` (on CPU: RANKS processes), on a free port."""
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port())]


def machine(packages=("torch",)):
    """The machine that measured: CPU model, cores, memory (GiB), GPU (None without CUDA), and the versions of
    `packages`."""
    import torch

    cpu = platform.processor() or "?"
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(total / 2**30, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        **{name: importlib.metadata.version(name) for name in packages},
    }


def tiny_gpt2(vocab, layers, width, positions, seed=0, **config):
    """An untrained GPT-2 of this shape with 4 attention heads, its weights drawn from `seed`; `config`: any other
    GPT2Config field (token ids, dropout)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=4, **config)
    return GPT2LMHeadModel(config)
