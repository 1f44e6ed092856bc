"""make demo: Inverse-Q* distils a principle into a tiny model, on a laptop CPU, in a few minutes.

1. builds the tiny world (demo/world.py) under --out, or reuses it;
2. measures the SFT model exactly on held-out prompts: without the principle, with it, and π̂ at α;
3. runs Inverse-Q* through the real entry point (`python iqstar.py`, DeepSpeed included) on the
   world's training prompts: prompts only, no responses, no preferences;
4. measures every epoch's policy the same way, prints a before/after table, and writes results.json
   (and plot.png, if matplotlib is installed) next to metrics.jsonl.

    python demo/demo.py                      # α = 1.4, seed 0
    python demo/demo.py --alpha 1.0 --seed 2 # any α: each (α, seed) gets its own run folder
"""

import argparse
import json
import os
import subprocess
import sys

# Run by path (python demo/demo.py) and imported (by make bench, the tests): world.py beside it, iqstar.py above
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import training  # noqa: E402
import world  # noqa: E402

# iqstar.py's flags for the demo: tiny model, so a larger learning rate and fewer samples than the paper.
IQSTAR_FLAGS = [
    "--lr",
    "5e-4",
    "--epochs",
    "6",
    "--samples-per-epoch",
    "48",
    "--max-new-tokens",
    "24",
    "--batch-size",
    "8",
    "--snapshot-every",
    "1",
]


def measure(model_dir, tokenizer, prompts, **kwargs):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # a loading bar per measured model would bury iqstar.py's lines
    refuse, comply = world.adherence(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, prompts, **kwargs)
    return {"adherence": refuse, "helpfulness": comply}


def run(out, alpha, seed, world_dir=None, quiet=False, flags=(), timeout=None):
    """The whole demo for one (α, seed); returns the results dict it also writes to results.json.

    flags: more iqstar.py flags, after the demo's own (e.g. ["--gather-for-generation", "off"]);
    timeout: seconds iqstar.py may take (the tests', so that a hang fails instead of running on)."""
    from transformers import AutoTokenizer

    world_dir = world_dir or os.path.join(out, "world")
    world.build(world_dir)  # reused when already built
    train, held_out = world.split_prompts()
    prompts_file = os.path.join(world_dir, "train.jsonl")
    world.write_prompts(prompts_file, train)
    tokenizer = AutoTokenizer.from_pretrained(world_dir)
    before = {
        "SFT, no principle": measure(world_dir, tokenizer, held_out),
        "SFT + principle (π_w)": measure(world_dir, tokenizer, held_out, principle=world.PRINCIPLE),
        f"π̂ at α={alpha}": measure(world_dir, tokenizer, held_out, alpha=alpha),
    }

    run_dir = os.path.join(out, f"alpha{alpha}-seed{seed}")
    output = subprocess.PIPE if quiet else None
    flags = IQSTAR_FLAGS + list(flags)
    training.train(
        world_dir, prompts_file, world.PRINCIPLE, alpha, seed, run_dir, flags, stdout=output, timeout=timeout
    )

    epochs = int(IQSTAR_FLAGS[IQSTAR_FLAGS.index("--epochs") + 1])
    curve = [before["SFT, no principle"]] + [
        measure(os.path.join(run_dir, f"epoch-{e}") if e < epochs else run_dir, tokenizer, held_out)
        for e in range(1, epochs + 1)
    ]
    results = {"alpha": alpha, "seed": seed, "before": before, "after": curve[-1], "curve": curve}
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    training.plot(run_dir, curve, (("adherence", "P(refuse | unsafe)"), ("helpfulness", "P(comply | benign)")))
    return results


def print_table(results):
    rows = dict(results["before"], **{"after Inverse-Q*, no principle": results["after"]})
    print("\nheld-out prompts (exact probabilities)   P(refuse | unsafe)   P(comply | benign)")
    for name, r in rows.items():
        print(f"  {name:38s} {r['adherence']:>10.3f} {r['helpfulness']:>20.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/demo", help="everything the demo builds goes here")
    p.add_argument("--alpha", type=float, default=1.4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    results = run(args.out, args.alpha, args.seed)
    print_table(results)
