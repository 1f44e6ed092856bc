"""An epoch's sampling on SmolLM2-135M-Instruct with a mix of short and long prompts: tokens/s and peak memory, before
(one generate() call for all of a rank's prompts, left-padded to the longest, as iqstar sampled before it had
--kv-cache-tokens) and after (iqstar's rollout_batches: longest first, each call within --kv-cache-tokens).

    python bench/sampling_memory.py --model out/smollm2 --json out/bench/sampling-memory.json

Each mode runs in a fresh process; its peak is the highest RSS a thread reads from /proc/self/statm every 2 ms
while it samples, minus the RSS just before (loading the model peaks higher than sampling, so the process's
high-water mark, ru_maxrss, would hide it). Every response is forced to its full length (min_new_tokens), so both
generate as many tokens. Run by bench/bench.py (make bench).
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

WORDS = (
    "the quick brown fox jumps over the lazy dog while a careful cook measures flour sugar and salt for a cake "
    "that the whole family will share after a long walk through the quiet autumn woods near the old river"
).split()


def prompt_mix(tokenizer, short=28, long=4, long_words=900):
    """28 everyday questions and 4 long ones (about a thousand tokens of context, then the question), shuffled as a
    draw would be: the long tail of a real dataset (HH's prompts run from a dozen tokens to thousands), which a
    left-padded single call pads every row to."""
    import random
    import iqstar

    rng = random.Random(0)
    questions = [f"How do I {' '.join(rng.sample(WORDS, 4))}?" for _ in range(short + long)]
    texts = questions[:short] + [
        " ".join(rng.choice(WORDS) for _ in range(long_words)) + "\n\n" + q for q in questions[short:]
    ]
    rng.shuffle(texts)
    return [iqstar.format_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts]


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(mode, model_path, new_tokens, kv_cache_tokens, result_path):
    import gc
    import torch
    from transformers import AutoTokenizer
    import iqstar

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = iqstar.load_model(model_path, torch.float32).eval()
    eos = iqstar.eos_token_ids(tokenizer, model.config)
    iqstar.use_pure_sampling(model, new_tokens, eos, tokenizer.pad_token_id)
    model.generation_config.min_new_tokens = new_tokens
    prompts = prompt_mix(tokenizer)
    if mode == "before":
        calls = [list(range(len(prompts)))]  # --rollout-batch-size 64 took them all in one call, in drawn order
    else:
        calls = iqstar.rollout_batches([[len(p) + new_tokens for p in prompts]], kv_cache_tokens)[0]
    torch.manual_seed(0)
    iqstar.sample_responses(model, prompts[:1], model.generation_config, "cpu")  # warm-up, before the baseline
    gc.collect()
    baseline, peak, done = rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start, responses = time.perf_counter(), [None] * len(prompts)
    for call in calls:
        for i, y in zip(
            call,
            iqstar.sample_responses(model, [prompts[i] for i in call], model.generation_config, "cpu"),
            strict=True,
        ):
            responses[i] = y
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    tokens = sum(len(y) for y in responses)
    kv = model.config.num_hidden_layers * 2 * model.config.num_key_value_heads * model.config.head_dim * 4  # fp32
    cache = max(len(c) * (max(len(prompts[i]) for i in c) + new_tokens) for c in calls) * kv
    with open(result_path, "w") as f:
        json.dump(
            {
                "mode": mode,
                "calls": [len(c) for c in calls],
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "peak_bytes": peak[0] - baseline,
                "kv_cache_bound_bytes": cache,
                "prompt_tokens": sorted(len(p) for p in prompts),
            },
            f,
        )


def run(model_path, out, new_tokens=32, kv_cache_tokens=8192):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", MALLOC_ARENA_MAX="2")
    figures = {}
    for mode in ("before", "after"):
        path = os.path.join(out, f"sampling-memory-{mode}.json")
        result = subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                mode,
                "--model",
                model_path,
                "--new-tokens",
                str(new_tokens),
                "--kv-cache-tokens",
                str(kv_cache_tokens),
                "--json",
                path,
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
        if result.returncode != 0:
            sys.exit(f"bench: sampling memory ({mode}) failed\n{result.stderr[-3000:]}")
        with open(path) as f:
            figures[mode] = json.load(f)
    figures.update(
        new_tokens=new_tokens,
        kv_cache_tokens=kv_cache_tokens,
        model=model_path,
        tokens_per_s_ratio=figures["after"]["tokens_per_s"] / figures["before"]["tokens_per_s"],
        peak_ratio=figures["after"]["peak_bytes"] / figures["before"]["peak_bytes"],
    )
    return figures


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.path.join(ROOT, "out", "smollm2"), help="SmolLM2 folder (make test makes it)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--kv-cache-tokens", type=int, default=8192, help="the budget of the 'after' mode")
    p.add_argument("--json", default=os.path.join(ROOT, "out", "bench", "sampling-memory.json"))
    p.add_argument("--child", choices=("before", "after"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.model, args.new_tokens, args.kv_cache_tokens, args.json)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    figures = run(args.model, os.path.dirname(os.path.abspath(args.json)), args.new_tokens, args.kv_cache_tokens)
    b, a, mib = figures["before"], figures["after"], 2**20
    print(f"{'':36s}{'before':>12s}{'after':>12s}{'after/before':>14s}")
    print(
        f"{'sampling tokens/s':36s}{b['tokens_per_s']:>12.1f}{a['tokens_per_s']:>12.1f}"
        f"{figures['tokens_per_s_ratio']:>13.2f}×"
    )
    print(
        f"{'peak RSS above baseline (MiB)':36s}{b['peak_bytes'] / mib:>12.1f}{a['peak_bytes'] / mib:>12.1f}"
        f"{figures['peak_ratio']:>13.2f}×"
    )
    print(
        f"{'KV cache bound of the largest call':36s}{b['kv_cache_bound_bytes'] / mib:>12.1f}"
        f"{a['kv_cache_bound_bytes'] / mib:>12.1f}"
    )
    print(f"calls: before {b['calls']}, after {a['calls']}")
    with open(args.json, "w") as f:
        json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
