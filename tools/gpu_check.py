"""make gpu-check: two epochs of iqstar.py in bf16 at the paper's lengths on one GPU, beside the memory plan.

It builds everything it needs (no download, no network): a random-weight Llama from a config (TinyLlama-1.1B's
shape by default; --size 7b: Llama-2-7B's, with the optimizer offloaded to CPU unless --lora-r trains an adapter on
one copy of the weights; --size tiny: 2 layers, for CPU),
a word-level tokenizer of the same vocabulary with the `tokenizers` library, and a .jsonl of prompts of 128 to 384
words. It then runs iqstar's main() in this process, `--dtype bf16 --max-new-tokens 1024 --batch-size 2`, with
tools/phases.py marking the phases, and prints sample, score and train seconds, tokens/s, and each phase's peak GPU
memory (torch.cuda.max_memory_allocated, reset at each phase's start; on CPU, resident memory) beside
tools/plan.py's prediction for the same flags. Run from the repository root:

    python -m tools.gpu_check                          # on a GPU machine: make gpu-check
    python -m tools.gpu_check --size 7b --lora-r 16    # one GPU, LoRA: make gpu-check's second case
    python -m tools.gpu_check --size tiny --max-new-tokens 64   # on CPU, in under a minute

A pure sample from random weights seldom meets its EOS: the responses run to --max-new-tokens, the worst case.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import random
import time

from tools.common import ROOT

# Llama shapes: TinyLlama-1.1B (Llama-2's architecture at 1.1 B, 4 KV heads), Llama-2-7B (Vicuna-7B's), a tiny one
SIZES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=2048,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
}
SPECIAL = ["<unk>", "<s>", "</s>"]


def fixed_words():
    """The special tokens and every word of iqstar's Vicuna v1.5 format (the model has no chat template)."""
    from tokenizers import pre_tokenizers
    import iqstar

    text = iqstar.VICUNA_SYSTEM + " USER: ASSISTANT:"
    return SPECIAL + sorted({w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})


def build_tokenizer(path, vocab_size):
    """A word-level tokenizer of exactly vocab_size tokens: fixed_words(), then w0, w1, ... for the prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    fixed = fixed_words()
    words = fixed + [f"w{i}" for i in range(vocab_size - len(fixed))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def build_model(path, size, device):
    """A random-weight Llama of SIZES[size] saved in bf16 with its tokenizer; returns its config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.isfile(os.path.join(path, "config.json")):
        return LlamaConfig.from_pretrained(path)
    config = LlamaConfig(
        **SIZES[size],
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it will run: a 7B model in seconds on a GPU, minutes on CPU
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    build_tokenizer(path, config.vocab_size)
    return config


def write_prompts(path, count, vocab_size, low=128, high=384, seed=0):
    """count prompts of low..high of the tokenizer's words, as HH's prompts run to a few hundred tokens."""
    rng, known = random.Random(seed), vocab_size - len(fixed_words())
    with open(path, "w") as f:
        for _ in range(count):
            words = [f"w{rng.randrange(known)}" for _ in range(rng.randint(low, high))]
            f.write(json.dumps({"prompt": " ".join(words)}) + "\n")


def ds_config(path, offload, fused_adam):
    """ds_config.json as shipped, with torch's AdamW (DeepSpeed's FusedAdam would JIT-compile with nvcc first, a
    minute or two of GPU time; the states it keeps are the same) and, for 7B on one GPU, the optimizer
    offloaded to CPU, which needs ZeRO: stage 3 on one rank too (ds_config.json's "auto" would give 0)."""
    with open(os.path.join(ROOT, "ds_config.json")) as f:
        config = json.load(f)
    if not fused_adam:
        config["optimizer"]["params"]["torch_adam"] = True
    if offload:
        config["zero_optimization"].update(stage=3, offload_optimizer={"device": "cpu", "pin_memory": True})
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
    return path


def longest_prompt(model, dataset, principle=None):
    """The longest prompt iqstar builds from the dataset, with the principle (what the plan's --prompt-tokens is)."""
    import iqstar
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    conversations, _ = iqstar.load_conversations(dataset)
    prompts, _ = iqstar.build_prompts(conversations, tokenizer, principle or iqstar.DEFAULT_PRINCIPLE, None)
    return max(max(len(a), len(b)) for a, b in prompts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="1b", help="the Llama shape (tiny: for CPU)")
    p.add_argument("--out", default="/tmp/gpu-check", help="working folder: model, prompts, iqstar's run")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--samples-per-epoch", type=int, help="default: 42 (1b: two generate calls), 24 (7b), 4 (tiny)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="the paper's")
    p.add_argument("--batch-size", type=int, default=2, help="the paper's")
    p.add_argument("--fused-adam", action="store_true", help="DeepSpeed's FusedAdam (JIT-compiled) for torch's AdamW")
    args, extra = p.parse_known_args(argv)  # anything else goes to iqstar.py as it is
    import torch
    import iqstar
    from tools import phases, plan

    cuda = torch.cuda.is_available()
    lora_r = iqstar.parse_args(["--model", "x"] + extra).lora_r  # LoRA on one GPU: μ once, nothing to offload
    samples = args.samples_per_epoch or {"1b": 42, "7b": 24, "tiny": 4}[args.size]
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    model = os.path.join(args.out, f"llama-{args.size}")
    config = build_model(model, args.size, "cuda" if cuda else "cpu")
    dataset = os.path.join(args.out, "prompts.jsonl")
    write_prompts(dataset, max(samples, 8), config.vocab_size)
    built = time.perf_counter() - started
    flags = [
        "--dtype",
        "bf16",
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--samples-per-epoch",
        str(samples),
        "--save-every",
        "0",
        "--ds-config",
        ds_config(os.path.join(args.out, "ds_config.json"), args.size == "7b" and not lora_r, args.fused_adam),
    ]
    flags += extra
    run_dir = os.path.join(args.out, "run")
    argv = ["--model", model, "--dataset", dataset, "--output-dir", run_dir, "--overwrite"] + flags
    print("python iqstar.py " + " ".join(argv), flush=True)
    meter = phases.CUDAMeter() if cuda else phases.RSSMeter()
    with phases.Phases(meter) as measured:
        iqstar.main(argv)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f]

    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 1000
    prompt_tokens = longest_prompt(model, dataset)
    predicted = plan.plan(
        plan.parse_args(
            [
                "--config",
                model,
                "--ranks",
                "1",
                "--gpu-gib",
                f"{gpu_gib:.1f}",
                "--device",
                "gpu" if cuda else "cpu",
                "--prompt-tokens",
                str(prompt_tokens),
            ]
            + flags
        )
    )
    figures = {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "deepspeed": importlib.metadata.version("deepspeed"),
        "python": platform.python_version(),
        "size": args.size,
        "lora_r": lora_r,
        "parameters": predicted["parameters"],
        "flags": flags,
        "prompt_tokens": prompt_tokens,
        "build_seconds": round(built, 1),
        "epochs": epochs,
        "phase_seconds": measured.seconds,
        "measured_gib": {k: v / 2**30 for k, v in measured.peaks.items()},
        "reserved_gib": {k: v / 2**30 for k, v in measured.reserved.items()},
        "planned_gib": predicted["phases_gib"],
        "plan_total_gib": predicted["total_gib"],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(report(figures, meter.name))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return figures


def report(figures, what):
    where = figures["gpu"] or "CPU (no GPU: resident memory instead of GPU memory)"
    trained = f"LoRA r={figures['lora_r']}" if figures["lora_r"] else "every weight trained"
    lines = [
        f"\ngpu-check: {where}; torch {figures['torch']}, transformers {figures['transformers']}, DeepSpeed "
        f"{figures['deepspeed']}; Llama {figures['size']} ({figures['parameters'] / 1e9:.2f} B parameters), "
        f"bf16, {trained}, prompts up to {figures['prompt_tokens']} tokens",
        f"{'epoch':>6s}{'sample s':>10s}{'score s':>10s}{'train s':>10s}{'tokens':>9s}{'sample tok/s':>14s}"
        f"{'train tok/s':>13s}",
    ]
    for e in figures["epochs"]:
        tokens = e["response_tokens"]
        lines.append(
            f"{e['epoch']:>6d}{e['sample_seconds']:>10.1f}{e['score_seconds']:>10.1f}"
            f"{e['train_seconds']:>10.1f}{tokens:>9d}{tokens / max(e['sample_seconds'], 1e-9):>14.1f}"
            f"{tokens / max(e['train_seconds'], 1e-9):>13.1f}"
        )
    lines.append(
        f"{what} by phase, GiB: planned (tools/plan.py, 1 rank) / measured"
        + (" / reserved by the allocator" if figures["reserved_gib"] else "")
    )
    for phase, planned in figures["planned_gib"].items():
        if phase in figures["measured_gib"]:
            measured = figures["measured_gib"][phase]
            reserved = f" / {figures['reserved_gib'][phase]:.2f}" if phase in figures["reserved_gib"] else ""
            lines.append(f"  {phase:10s}{planned:8.2f} / {measured:.2f}{reserved}   ({measured / planned - 1:+.0%})")
    lines.append(
        f"wall {figures['wall_seconds']:.0f} s (the model and prompts built in {figures['build_seconds']:.0f} s)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
