"""make bench-peer: iqstar against TRL's SDFTTrainer (TRL 1.16, experimental) on the same run, side by side.

The same budget (R rounds of S responses, micro-batch B, N new tokens, lr, the same thread count), on make demo-real's
principle and training prompts, each in a fresh process, one after the other:
1. `python iqstar.py` at α = 1.4 (its metrics.jsonl gives the phases);
2. SDFTTrainer with its `sampled_token` loss (iqstar's gradient at α = 1), 3. with its default `topk_logits` loss
   (bench/peer/sdft_run.py: the teacher sees iqstar's π_w prompt, checked token for token against iqstar.format_prompt).
Then, outside the timed runs, demo/real.py's held-out adherence of each final model and of the starting one. It prints
wall time by phase, max RSS (each run's own ru_maxrss), adherence and iqstar / SDFT ratios; all go to OUT/peer.json.

From the repository root:

    python -m bench.peer.peer --model out/smollm2 --out out/bench/peer  # the default budget, about 30 min on 2 cores
    python -m bench.peer.peer --rounds 1 --samples 16 --new-tokens 8 --held-out 3  # a check that it runs, minutes
    python -m bench.peer.peer --ranks 2  # iqstar under `deepspeed --num_gpus 2`, SDFT under `accelerate launch`
"""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import torch
from transformers.utils import logging

import iqstar
from demo import real  # make demo-real's principle, prompts and measure()
from tools.common import IQSTAR, ROOT, clean_env, deepspeed_launcher, free_port, machine

RUNS = ("iqstar", "sdft-sampled_token", "sdft-topk_logits")
PHASES = ("wall", "sample", "score", "train", "startup")
FRENCH = set("le la les de des du un une est et en pour que qui dans vous pas sur avec ce il elle au aux sont".split())
ENGLISH = set("the a an is are and of to in for you your it that with on can be this or not we as".split())


def in_french(text, ended):
    """Told apart by common words: at least 3 French ones, more than English ones (cut off or not: length is free)."""
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ']+", text.lower())
    french, english = sum(w in FRENCH for w in words), sum(w in ENGLISH for w in words)
    return french >= 3 and french > english


# The principle and its held-out check. Under "short" iqstar's answers shrink (to about 28 tokens by its second
# epoch), so it scores and trains on fewer tokens than SDFT; under "french" answers keep their length.
CASES = {"short": (real.PRINCIPLE, real.keeps_to_principle), "french": ("Answer in French.", in_french)}


def fail(message):
    print(f"peer.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default=os.path.join(ROOT, "out", "smollm2"), help="HF model folder (make demo-real's)")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "bench", "peer"), help="logs, models, peer.json")
    p.add_argument("--rounds", type=int, default=6, help="R: iqstar's epochs, SDFT's generation rounds")
    p.add_argument("--samples", type=int, default=64, help="S: responses a round, one generate() of them")
    p.add_argument("--batch-size", type=int, default=8, help="B: training micro-batch, per rank")
    p.add_argument("--new-tokens", type=int, default=48, help="N: longest response")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--alpha", type=float, default=1.4, help="iqstar's α")
    p.add_argument("--threads", type=int, default=2, help="torch threads, over all ranks")
    p.add_argument(
        "--ranks", type=int, default=1, help="processes a run: 2 launches iqstar with deepspeed, SDFT with accelerate"
    )
    p.add_argument("--held-out", type=int, help="measure adherence on the first K held-out prompts only (all: 24)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--case",
        choices=CASES,
        default="short",
        help="the principle: " + ", ".join(f"{k}: {v[0]!r}" for k, v in CASES.items()),
    )
    p.add_argument(
        "--sdft-modes",
        nargs="+",
        choices=("sampled_token", "topk_logits"),
        default=["sampled_token", "topk_logits"],
        help="the SDFT losses to run",
    )
    args = p.parse_args()
    args.principle, args.keeps = CASES[args.case]
    for flag in ("rounds", "samples", "batch_size", "new_tokens", "threads", "ranks", "held_out"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be a positive integer (got {getattr(args, flag)})")
    if args.samples % (args.batch_size * args.ranks):
        fail(
            f"--samples {args.samples} must be a multiple of --batch-size × --ranks ({args.batch_size * args.ranks}): "
            "SDFT splits a round's generate() into whole micro-batches on every rank"
        )
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        fail(f"--model {args.model}: no HF model there (make demo-real converts SmolLM2 into out/smollm2)")
    if importlib.util.find_spec("trl") is None:
        fail("TRL is not installed: pip install -r requirements-peer.txt (make bench-peer does)")
    return args


def launch(name, command, args, threads):
    """Run one timed child, its stdout and stderr to OUT/name.log: wall seconds, its max RSS (GB), exit status."""
    env = dict(
        clean_env(),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TRL_EXPERIMENTAL_SILENCE="1",
    )
    # as the Makefile: DeepSpeed's CPU ops built once per venv, not in a shared cache a killed build can lock
    env.setdefault(
        "TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(sys.executable)), "torch_extensions")
    )
    log, load = os.path.join(args.out, f"{name}.log"), os.getloadavg()[0]
    print(f"{name}: running, log in {log}", flush=True)
    if load > 0.5:  # other work on the cores: a phase can take 10× as long (seen here: one generate() 2 s, then 30 s)
        print(f"{name}: warning: load average {load:.1f} at the start; its times are not a quiet machine's", flush=True)
    with open(log, "w") as f:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        # wait4: this child's own peak (with a launcher, its largest process), not RUSAGE_CHILDREN over all runs
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        last = ([line.strip() for line in open(log, errors="replace") if line.strip()] or ["(no output)"])[-1]
        return {"error": f"exit {child.returncode}: {last[:300]}"}
    print(f"{name}: done in {wall:.0f} s", flush=True)
    # minor page faults: each a fresh page of memory, which a VM makes slow (glibc's reuse of freed memory avoids them)
    return {
        "wall": wall,
        "max_rss_gb": usage.ru_maxrss * 1024 / 1e9,
        "minor_faults": usage.ru_minflt,
        "load_at_start": load,
    }


def run_iqstar(args, dataset, threads):
    out = os.path.join(args.out, "iqstar")
    flags = [
        "--model",
        args.model,
        "--dataset",
        dataset,
        "--principle",
        args.principle,
        "--output-dir",
        out,
        "--epochs",
        args.rounds,
        "--samples-per-epoch",
        args.samples,
        "--batch-size",
        args.batch_size,
        "--max-new-tokens",
        args.new_tokens,
        "--lr",
        args.lr,
        "--alpha",
        args.alpha,
        "--seed",
        args.seed,
        "--save-every",
        0,
        "--overwrite",
    ]
    launcher = [sys.executable] if args.ranks == 1 else deepspeed_launcher(args.ranks)
    figures = launch("iqstar", launcher + [IQSTAR] + list(map(str, flags)), args, threads)
    if "error" not in figures:  # its own phase timers, summed over the epochs
        epochs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        figures.update({k: sum(e[f"{k}_seconds"] for e in epochs) for k in ("sample", "score", "train")})
    return figures, out


def run_sdft(args, mode, prompts, threads):
    name, out = f"sdft-{mode}", os.path.join(args.out, f"sdft-{mode}")
    script = [
        "-m",
        "bench.peer.sdft_run",
        "--model",
        args.model,
        "--prompts",
        prompts,
        "--principle",
        args.principle,
        "--mode",
        mode,
        "--out",
        out,
        "--samples",
        args.samples,
        "--batch-size",
        args.batch_size,
        "--new-tokens",
        args.new_tokens,
        "--lr",
        args.lr,
        "--threads",
        threads,
        "--seed",
        args.seed,
    ]
    # Not `--cpu`: with it, accelerate starts ONE process unless mpirun is there. --multi_gpu goes through torchrun,
    # and without GPUs the config's use_cpu=True makes each rank a CPU one (accelerate's MULTI_CPU, over gloo).
    launcher = (
        [sys.executable]
        if args.ranks == 1
        else [
            os.path.join(os.path.dirname(sys.executable), "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(args.ranks),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
        ]
    )
    figures = launch(name, launcher + list(map(str, script)), args, threads)
    if "error" not in figures:
        figures.update(json.load(open(os.path.join(out, "phases.json"))))
        if figures["settings"]["world_size"] != args.ranks:
            figures = {"error": f"SDFT ran in {figures['settings']['world_size']} process(es), not {args.ranks}"}
    return figures, out


def ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def print_table(results):
    runs, m = results["runs"], results["machine"]
    print(
        f"\n{m['cpu']}, {m['cores']} cores, {m['threads']} threads, {m['ranks']} rank(s); torch {m['torch']}, "
        f"trl {m['trl']}; {results['budget']}; principle {results['case']['principle']!r}"
    )
    columns = ["iqstar", "SDFT sampled_token", "SDFT topk_logits", "iqstar/sampled_token", "iqstar/topk_logits"]
    print(f"{'':26s}" + "".join(f"{c:>22s}" for c in columns))
    rss = "max RSS (GB)" if m["ranks"] == 1 else "max RSS (GB, a rank)"
    rows = [(f"{k} (s)", k) for k in PHASES] + [
        (rss, "max_rss_gb"),
        (f"adherence (before {results['before']['adherence']:.2f})", "adherence"),
    ]
    for label, key in rows:
        values = [runs.get(r, {}).get(key) for r in RUNS]
        cells = [
            f"{v:.2f}" if v is not None and key in ("adherence", "max_rss_gb") else f"{v:.1f}" if v is not None else "–"
            for v in values
        ]
        cells += [f"{x:.2f}×" if x is not None else "–" for x in (ratio(values[0], v) for v in values[1:])]
        print(f"{label:26s}" + "".join(f"{c:>22s}" for c in cells))
    for r in RUNS:
        if "error" in runs.get(r, {}):
            print(f"{r}: did not run: {runs[r]['error']}")


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    threads = max(1, args.threads // args.ranks)  # per process: the ranks share the cores
    train = [p for kind, prompts in real.PROMPTS.items() if kind not in real.HELD_OUT for p in prompts]
    held_out = [p for kind in real.HELD_OUT for p in real.PROMPTS[kind]][: args.held_out]
    dataset, prompts = os.path.join(args.out, "train.jsonl"), os.path.join(args.out, "sdft-prompts.json")
    with open(dataset, "w") as f:  # demo-real's training prompts, as it writes them
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in train)
    with open(prompts, "w") as f:  # SDFT gets iqstar's draws, round by round, in order: the same prompts each round
        json.dump(
            [
                train[i]
                for r in range(1, args.rounds + 1)
                for i in iqstar.draw_prompts(len(train), args.samples, r, args.seed)
            ],
            f,
        )

    runs, models = {}, {}
    runs["iqstar"], models["iqstar"] = run_iqstar(args, dataset, threads)
    for mode in args.sdft_modes:
        runs[f"sdft-{mode}"], models[f"sdft-{mode}"] = run_sdft(args, mode, prompts, threads)
    for name, r in runs.items():
        if "error" in r:
            print(f"{name} failed ({r['error']}); see {os.path.join(args.out, name + '.log')}", flush=True)
            if args.ranks == 1:
                sys.exit(1)
        else:
            r["startup"] = r["wall"] - r["sample"] - r["score"] - r["train"]  # imports, engines, loading, saving

    # Adherence: after the timed runs, in this process, as make demo-real measures it (no principle, seed 0)
    torch.set_num_threads(args.threads)
    logging.disable_progress_bar()
    print(f"measuring adherence on {len(held_out)} held-out prompts, {real.SAMPLES} samples each", flush=True)
    before = real.measure(args.model, held_out, 0.0, args.seed, args.principle, args.keeps)
    for name, r in runs.items():
        if "error" not in r:
            r.update(real.measure(models[name], held_out, 0.0, args.seed, args.principle, args.keeps))
            print(f"{name}: adherence {r['adherence']:.3f}", flush=True)

    results = {
        "machine": dict(
            machine(("torch", "transformers", "trl", "deepspeed", "accelerate")), threads=args.threads, ranks=args.ranks
        ),
        "before": before,
        "runs": runs,
        "case": {"name": args.case, "principle": args.principle},
        "budget": f"{args.rounds} rounds × {args.samples} samples, micro-batch {args.batch_size}, "
        f"{args.new_tokens} new tokens, lr {args.lr:g}, iqstar α {args.alpha:g}, CPU fp32",
        "ratios": {
            f"iqstar/{r}": {
                k: ratio(runs["iqstar"].get(k), runs[r].get(k)) for k in PHASES + ("max_rss_gb", "adherence")
            }
            for r in RUNS[1:]
            if r in runs
        },
    }
    with open(os.path.join(args.out, "peer.json"), "w") as f:
        json.dump(results, f, indent=1)
    print_table(results)
    print(f"figures in {os.path.join(args.out, 'peer.json')}")


if __name__ == "__main__":
    main()
