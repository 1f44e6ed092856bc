"""make bench: the performance figures, side by side, on whatever machine runs it; also written to a JSON file.

1. sampling tokens/s of a ZeRO-3 policy on two CPU ranks, layer by layer vs gathered (bench/sample_speed.py);
2. peak memory of log π_θ(y_t) + log π̂(y_t) + the loss and its backward at V = 128256, T = 1024, batch 1:
   the straightforward full-vocabulary path (tools/reference.py) vs iqstar's chunked one (superior_targets,
   policy_logprobs), each in a fresh process: peak RSS (ru_maxrss) minus the RSS just before the computation;
3. seconds per epoch of the demo world (make demo's settings), one process under ZeRO-3, gathered and not, and its
   adherence;
4. the memory plan (tools/plan.py) against SmolLM2's measured peak RSS by phase, CPU fp32 (bench/memory.py);
5. make demo-real's run, full fine-tuning against LoRA (--lora-r 16 at ten times the learning rate), each in a fresh
   process: iqstar.py's seconds and peak resident memory, and the held-out adherence reached.

From the repository root:

    python -m bench.bench --out out/bench          # writes out/bench/bench.json
    python -m bench.bench --parts 4 5              # some parts only
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from tools.common import ROOT, clean_env, deepspeed_launcher, machine, tiny_gpt2


def random_gpt2(path, vocab, layers, width, positions):
    """A random GPT-2 saved in HF format, once (no dropout: log π_θ is the sampling distribution)."""
    if not os.path.exists(os.path.join(path, "config.json")):
        no_dropout = {"resid_pdrop": 0, "embd_pdrop": 0, "attn_pdrop": 0}
        tiny_gpt2(vocab, layers, width, positions, bos_token_id=1, eos_token_id=2, **no_dropout).save_pretrained(path)
    return path


def sampling(out):
    """1. tokens/s with two ranks under ZeRO-3 (ds_config.json as shipped), layer by layer vs gathered."""
    # Deep and narrow, 4 prompts per rank: per-layer gathers against little compute per layer, as for a 7B model's
    # 32 layers on fast GPUs. The ratio falls with width and batch (more compute per gather) and rises with depth.
    model = random_gpt2(os.path.join(out, "sampler-8x256"), vocab=8192, layers=8, width=256, positions=512)
    figures = os.path.join(out, "sampling.json")
    command = deepspeed_launcher(2) + ["--module", "bench.sample_speed", model, figures, "4", "32"]
    result = subprocess.run(command, capture_output=True, text=True, env=clean_env(), cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"bench: sample_speed.py failed\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    with open(figures) as f:
        return json.load(f)


def memory_one(variant, model_path, result_path):
    """In a fresh process: one micro-batch through the estimator, the loss and backward; peak RSS over baseline."""
    import gc
    import torch
    import iqstar
    from tools import phases, reference

    torch.set_num_threads(2)
    model = iqstar.load_model(model_path, torch.float32).train()
    T, prompt = 1024, list(range(10, 26))
    plain, principled = [prompt], [list(range(30, 38)) + prompt]
    responses = [[(7 * t) % 128000 + 3 for t in range(T)]]
    path = reference if variant == "straightforward" else iqstar
    gc.collect()
    baseline = phases.status_bytes("VmRSS")
    start = time.perf_counter()
    targets = path.superior_targets(model, model, principled, plain, responses, 1.4, 0, "cpu")
    policy_logps, mask = path.policy_logprobs(model, plain, responses, 0, "cpu")
    loss = iqstar.iqstar_loss(policy_logps, targets, mask)
    credit = (targets - policy_logps.detach()) * mask
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    with open(result_path, "w") as f:
        json.dump(
            {
                "peak_bytes": peak - baseline,
                "baseline_bytes": baseline,
                "seconds": seconds,
                "loss": loss.item(),
                "credit_sum": credit.sum().item(),
            },
            f,
        )


def memory(out):
    """2. both variants, each in its own process so neither sees the other's high-water mark."""
    model = random_gpt2(os.path.join(out, "vocab128k"), vocab=128256, layers=2, width=256, positions=1088)
    figures = {}
    for variant in ("straightforward", "chunked"):
        path = os.path.join(out, f"memory-{variant}.json")
        result = subprocess.run(
            [sys.executable, "-m", "bench.bench", "--memory-variant", variant, model, path],
            capture_output=True,
            text=True,
            env=clean_env(),
            cwd=ROOT,
        )
        if result.returncode != 0:
            sys.exit(f"bench: memory ({variant}) failed\n{result.stderr[-3000:]}")
        with open(path) as f:
            figures[variant] = json.load(f)
    return figures


def demo_epochs(out):
    """3. make demo's run, one process under ZeRO-3, with and without gathering: seconds per epoch and the adherence
    reached. The config names stage 3: ds_config.json's "auto" runs one process without ZeRO, where nothing is
    gathered either way."""
    from demo import demo

    figures, config = {}, json.load(open(os.path.join(ROOT, "ds_config.json")))
    config["zero_optimization"]["stage"] = 3
    os.makedirs(out, exist_ok=True)
    zero3 = os.path.join(out, "ds_config_zero3.json")
    with open(zero3, "w") as f:
        json.dump(config, f)
    for mode in ("on", "off"):
        run_out = os.path.join(out, f"demo-gather-{mode}")
        results = demo.run(
            run_out,
            alpha=1.4,
            seed=0,
            world_dir=os.path.join(out, "world"),
            quiet=True,
            flags=["--gather-for-generation", mode, "--ds-config", zero3],
        )
        with open(os.path.join(run_out, "alpha1.4-seed0", "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
        mean = {k: sum(m[f"{k}_seconds"] for m in metrics) / len(metrics) for k in ("sample", "score", "train")}
        figures[mode] = dict(
            mean,
            epoch=sum(mean.values()),
            epochs=len(metrics),
            adherence=results["after"]["adherence"],
            helpfulness=results["after"]["helpfulness"],
        )
    return figures


def memory_plan(out):
    """4. tools/plan.py's prediction by phase against what iqstar.py's run on SmolLM2 measures (target ±25 %)."""
    from bench import memory as memory_check

    return memory_check.compare(os.path.join(out, "memory"), os.path.join(ROOT, "out", "smollm2"))


LORA_FLAGS = ["--lora-r", "16", "--lr", "1e-4"]  # make demo-real's lr is 1e-5


def lora_side_by_side(out):
    """5. make demo-real (α = 1.4, seed 0) as it is and with LORA_FLAGS, each demo in its own process."""
    figures = {}
    for name, flags in (("full", []), ("lora", LORA_FLAGS)):
        run_out = os.path.join(out, f"real-{name}")
        command = [sys.executable, os.path.join(ROOT, "demo", "real.py"), "--out", run_out, "--model-dir"]
        command += [os.path.join(ROOT, "out", "smollm2")] + flags
        result = subprocess.run(command, capture_output=True, text=True, env=clean_env(), cwd=ROOT)
        if result.returncode != 0:
            sys.exit(f"bench: demo/real.py {' '.join(flags)} failed\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
        with open(os.path.join(run_out, "alpha1.4-seed0", "results.json")) as f:
            results = json.load(f)
        after = results["after"]
        figures[name] = {
            "flags": flags,
            "iqstar_seconds": results["training_seconds"],
            "iqstar_max_rss_gib": results["training_max_rss_gib"],
            "adherence": after["adherence"],
            "eos_rate": after["eos_rate"],
            "mean_length": after["mean_length"],
        }
    figures["seconds_ratio"] = figures["lora"]["iqstar_seconds"] / figures["full"]["iqstar_seconds"]
    figures["rss_ratio"] = figures["lora"]["iqstar_max_rss_gib"] / figures["full"]["iqstar_max_rss_gib"]
    return figures


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/bench", help="working folder; bench.json is written here")
    p.add_argument("--json", help="where to write the figures (default: OUT/bench.json)")
    p.add_argument("--parts", nargs="+", type=int, choices=range(1, 6), default=range(1, 6), help="run these only")
    p.add_argument("--memory-variant", nargs=3, metavar=("VARIANT", "MODEL", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_variant:
        return memory_one(*args.memory_variant)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    figures = {"machine": machine(), "parts": sorted(args.parts)}
    host = figures["machine"]
    print(
        f"\nmachine: {host['cpu']}, {host['cores']} cores, {host['memory_gib']} GiB, torch {host['torch']}, "
        f"GPU: {host['gpu']}"
    )
    print(f"{'':44s}{'before':>14s}{'after':>14s}{'after/before':>14s}")
    gib = 2**30
    if 1 in args.parts:
        sample = sampling(args.out)
        s = figures["sampling_tokens_per_s"] = {
            "layer_by_layer": sample["off"]["tokens_per_s"],
            "gathered": sample["on"]["tokens_per_s"],
            "ratio": sample["on"]["tokens_per_s"] / sample["off"]["tokens_per_s"],
            "ranks": sample["ranks"],
            "model": "GPT-2, 8 layers, width 256, vocab 8192",
            "prompts_per_rank": 4,
            "new_tokens": 32,
        }
        print(
            f"{'sampling tokens/s, 2 ranks ZeRO-3':44s}{s['layer_by_layer']:>14.1f}{s['gathered']:>14.1f}"
            f"{s['ratio']:>13.2f}×   (layer by layer -> gathered; target ≥ 5×)"
        )
    if 2 in args.parts:
        mem = memory(args.out)
        m = figures["logprob_peak_memory_gib"] = {
            "straightforward": mem["straightforward"]["peak_bytes"] / gib,
            "chunked": mem["chunked"]["peak_bytes"] / gib,
            "ratio": mem["chunked"]["peak_bytes"] / mem["straightforward"]["peak_bytes"],
            "seconds": {k: v["seconds"] for k, v in mem.items()},
            "loss": {k: v["loss"] for k, v in mem.items()},
        }
        print(
            f"{'log-prob+estimator+loss peak GiB, V=128256':44s}{m['straightforward']:>14.3f}{m['chunked']:>14.3f}"
            f"{m['ratio']:>13.2f}×   (straightforward -> chunked; T=1024, batch 1; target ≤ 0.5×)"
        )
    if 3 in args.parts:
        epoch = demo_epochs(args.out)
        d = figures["demo_seconds_per_epoch"] = {"gathered": epoch["on"], "layer_by_layer": epoch["off"]}
        print(
            f"{'demo s/epoch, 1 process (sample+score+train)':44s}{d['layer_by_layer']['epoch']:>14.2f}"
            f"{d['gathered']['epoch']:>14.2f}{d['gathered']['epoch'] / d['layer_by_layer']['epoch']:>13.2f}×   "
            f"(sample {d['layer_by_layer']['sample']:.2f} -> {d['gathered']['sample']:.2f} s)"
        )
        print(
            f"{'demo adherence after training':44s}{d['layer_by_layer']['adherence']:>14.4f}"
            f"{d['gathered']['adherence']:>14.4f}   (must match: same seed)"
        )
    if 5 in args.parts:
        lora = figures["full_vs_lora_demo_real"] = lora_side_by_side(args.out)
        full, low = lora["full"], lora["lora"]
        print(
            f"{'demo-real iqstar.py s, full -> LoRA r=16':44s}{full['iqstar_seconds']:>14.0f}"
            f"{low['iqstar_seconds']:>14.0f}{lora['seconds_ratio']:>13.2f}×   (lr 1e-5 -> {LORA_FLAGS[-1]})"
        )
        print(
            f"{'demo-real iqstar.py max RSS GiB, full -> LoRA':44s}{full['iqstar_max_rss_gib']:>14.2f}"
            f"{low['iqstar_max_rss_gib']:>14.2f}{lora['rss_ratio']:>13.2f}×   (target ≤ 0.7×)"
        )
        print(
            f"{'demo-real held-out adherence, full -> LoRA':44s}{full['adherence']:>14.3f}{low['adherence']:>14.3f}"
            f"   (0.000 before; ends by itself {full['eos_rate']:.3f} -> {low['eos_rate']:.3f})"
        )
    if 4 in args.parts:
        from bench import memory as memory_check

        plan_check = figures["memory_plan_vs_measured"] = memory_plan(args.out)
        print(memory_check.report(plan_check))
    figures["bench_seconds"] = round(time.perf_counter() - started)
    path = args.json or os.path.join(args.out, "bench.json")
    with open(path, "w") as f:
        json.dump(figures, f, indent=1)
    print(f"wrote {path} ({figures['bench_seconds']} s)")


if __name__ == "__main__":
    main()
