"""The memory plan (tools/plan.py) against what a CPU run of iqstar.py measures, phase by phase.

One epoch of iqstar's main() on SmolLM2-135M-Instruct (one process, CPU, fp32), in a fresh process, with
tools/phases.py marking the phases: the peak resident memory of each phase above the process's baseline before
the first model is loaded, beside tools/plan.py's prediction for the same flags (--ranks 1, fp32, the prompts'
measured length). Once as iqstar runs by default, once with --gradient-checkpointing, once with --lora-r 16. The
child's glibc malloc is told to give freed blocks back to the OS (MALLOC_MMAP_THRESHOLD_, MALLOC_ARENA_MAX;
tools/phases.py child_env), so that resident memory follows what is allocated. Target: every phase within ±25 %
of the plan. From the repository root:

    python -m bench.memory --out out/bench/memory          # about 2 minutes on 2 cores; writes memory.json
"""

import argparse
import json
import os
import subprocess
import sys
import time

from tools import phases as phases_mod
from tools.common import ROOT

PRINCIPLE = "Answer in one short sentence."  # short, so that π_w's prompts are as long as the plain ones
SENTENCES = [
    "The kettle in the office broke again on Monday.",
    "Maria ordered a new one, with a longer cord.",
    "The printer on the second floor is out of toner.",
    "Our team lunch moved to Thursday at noon.",
    "Two people asked for standing desks this month.",
    "The heating is too warm near the windows.",
    "Somebody left a bicycle in the hallway overnight.",
    "The plants by the door need water twice a week.",
    "The meeting room projector shows everything slightly green.",
    "We ran out of coffee filters.",
]
# Two epochs: AdamW's moments exist from the first step on, so the second epoch's sampling and scoring hold all that
# a long run holds. 4 prompts of about 300 tokens, 32 new tokens (SmolLM2 seldom ends a pure sample that soon, so
# the responses are as long as the plan assumes), micro-batches of 2; a checkpoint only at the end.
FLAGS = [
    "--epochs",
    "2",
    "--samples-per-epoch",
    "4",
    "--max-new-tokens",
    "32",
    "--batch-size",
    "2",
    "--save-every",
    "0",
    "--principle",
    PRINCIPLE,
    "--dtype",
    "fp32",
    "--seed",
    "0",
]
# run: (extra flags, the phases compared). Checkpointing changes training alone: one epoch is enough there.
RUNS = {
    "default": ([], ("loading", "sampling", "scoring", "training")),
    "gradient checkpointing": (["--gradient-checkpointing", "--epochs", "1"], ("loading", "training")),
    "LoRA r=16": (["--lora-r", "16"], ("sampling", "scoring", "training")),  # loading: nothing planned, as above
}
TARGET = 0.25


def write_prompts(path, model, count, tokens=300):
    """count prompts of at least `tokens` tokens in iqstar's own format; returns the longest, with the principle."""
    import iqstar
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    longest = 0
    with open(path, "w") as f:
        for i in range(count):
            notes, k = [], i
            while True:
                notes.append(SENTENCES[k % len(SENTENCES)])
                k += 3
                text = f"Notes from week {i + 1}: " + " ".join(notes) + " Summarise these notes for me."
                messages = [{"role": "user", "content": text}]
                length = len(iqstar.format_prompt(tokenizer, messages, PRINCIPLE))
                if len(iqstar.format_prompt(tokenizer, messages)) >= tokens:
                    break
            longest = max(longest, length)
            f.write(json.dumps({"prompt": text}) + "\n")
    return longest


def child(result_path, argv):
    """In a fresh process: iqstar.main(argv) with its phases marked; writes their peaks and seconds."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    import iqstar

    with phases_mod.Phases(phases_mod.RSSMeter()) as measured:
        iqstar.main(argv)
    with open(result_path, "w") as f:
        json.dump(
            {
                "peaks": measured.peaks,
                "seconds": measured.seconds,
                "baseline": measured.baseline,
                "exact": measured.meter.exact,
            },
            f,
        )


def measure(out, name, argv):
    """One run of iqstar.py in its own process; its phases' peaks (bytes above its baseline)."""
    result = os.path.join(out, f"measured-{name.replace(' ', '-')}.json")
    command = [sys.executable, "-m", "bench.memory", "--child", result] + argv
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=phases_mod.child_env(), cwd=ROOT)
    if run.returncode != 0:
        sys.exit(f"bench/memory.py: iqstar.py failed ({name})\n{run.stdout[-2000:]}{run.stderr[-3000:]}")
    with open(result) as f:
        return dict(json.load(f), wall_seconds=time.perf_counter() - started)


def compare(out, model):
    """Plan against measurement for each of RUNS: {run: {phase: {planned, measured, ratio}}, ...}."""
    from tools import plan

    os.makedirs(out, exist_ok=True)
    dataset = os.path.join(out, "prompts.jsonl")
    prompt_tokens = write_prompts(dataset, model, count=4)
    figures = {"model": model, "prompt_tokens": prompt_tokens, "flags": FLAGS, "runs": {}}
    for name, (extra, compared) in RUNS.items():
        flags = FLAGS + extra
        argv = ["--model", model, "--dataset", dataset, "--output-dir", os.path.join(out, "run"), "--overwrite"]
        measured = measure(out, name, argv + flags)
        planned = plan.plan(
            plan.parse_args(
                ["--config", model, "--ranks", "1", "--device", "cpu", "--prompt-tokens", str(prompt_tokens)] + flags
            )
        )
        rows = {}
        for phase, gib in planned["phases_gib"].items():
            if phase in compared:  # nothing planned: fp32 weights mapped at loading, resident from their first use
                rows[phase] = {
                    "planned_gib": gib,
                    "measured_gib": measured["peaks"][phase] / 2**30,
                    "ratio": measured["peaks"][phase] / 2**30 / gib if gib else None,
                }
        figures["runs"][name] = {
            "phases": rows,
            "seconds": measured["seconds"],
            "exact": measured["exact"],
            "saving_gib": measured["peaks"].get("saving", 0) / 2**30,
            "wall_seconds": round(measured["wall_seconds"], 1),
            "within_target": all(abs(r["ratio"] - 1) <= TARGET for r in rows.values() if r["ratio"] is not None),
        }
    return figures


def report(figures):
    """The table bench.py and this script print."""
    lines = [
        f"memory plan vs measured, SmolLM2-135M-Instruct, CPU fp32, 1 process, prompts of "
        f"{figures['prompt_tokens']} tokens, peak RSS above the baseline (GiB; target: ±{TARGET:.0%})"
    ]
    for name, run in figures["runs"].items():
        cells = "  ".join(
            f"{phase} {r['planned_gib']:.2f}/{r['measured_gib']:.2f} "
            + (f"({r['ratio'] - 1:+.0%})" if r["ratio"] is not None else "(none planned)")
            for phase, r in run["phases"].items()
        )
        lines.append(f"  {name:24s} planned/measured: {cells}  {'ok' if run['within_target'] else 'OUTSIDE'}")
    return "\n".join(lines)


def main():
    if sys.argv[1:2] == ["--child"]:  # python -m bench.memory --child RESULT IQSTAR_ARGS...: the measured process
        return child(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/bench/memory", help="working folder; memory.json is written here")
    p.add_argument("--model", default=os.path.join(ROOT, "out", "smollm2"), help="an HF model folder")
    args = p.parse_args()
    figures = compare(args.out, args.model)
    print(report(figures))
    with open(os.path.join(args.out, "memory.json"), "w") as f:
        json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
