"""What both demos do with iqstar.py: train, one run through the real entry point (`python iqstar.py`, DeepSpeed
included), and plot, its plot.png beside metrics.jsonl."""

import json
import os
import subprocess
import sys

from tools.common import iqstar_command


def train(model_dir, prompts_file, principle, alpha, seed, run_dir, flags, **run):
    """python iqstar.py on model_dir's model and prompts_file's prompts, with the principle at α and the seed, into
    run_dir (replacing an earlier run there); `flags` after these. `run`: more of subprocess.run's arguments (stdout,
    timeout). A failed run ends the demo with one line."""
    args = ["--model", model_dir, "--dataset", prompts_file, "--principle", principle, "--alpha", alpha, "--seed", seed]
    command, env = iqstar_command(args + ["--output-dir", run_dir, "--overwrite"] + list(flags))
    result = subprocess.run(command, env=env, text=True, **run)
    if result.returncode != 0:
        sys.exit(f"demo: iqstar.py failed (exit {result.returncode})")
    return result


def plot(run_dir, curve, series, levels=()):
    """RUN_DIR/plot.png: the training metrics by epoch; the held-out measures `series` (key, label) by epoch, from
    `curve` (before, then each epoch), and `levels` (label, value) as dashed lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for plot.png)")
        return
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [m["epoch"] for m in metrics]
    left.plot(epochs, [m["loss"] for m in metrics], "o-", label="loss")
    left.plot(epochs, [m["credit"] for m in metrics], "s-", label="credit")
    left.set(xlabel="epoch", title="Inverse-Q* training metrics")
    left.legend()
    for (key, label), marker in zip(series, "os^", strict=False):
        right.plot(range(len(curve)), [c[key] for c in curve], marker + "-", label=label)
    for (label, value), color in zip(levels, ("gray", "black"), strict=False):
        right.axhline(value, linestyle="--", color=color, label=label)
    right.set(xlabel="epoch (0 = before)", ylim=(0, 1.02), title="held-out prompts, no principle in the prompt")
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "plot.png"), dpi=100)
