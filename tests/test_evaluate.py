"""evaluate.py: verdict parsing, the swap and its undoing, the judge's cache, retries and one-line errors (against a
local OpenAI-compatible test server), the rating math against choix and hand-worked cases, report's files, generate
and the in-process judge on SmolLM2, reward scoring on a small sequence-classification model built here."""

import http.server
import importlib.util
import json
import math
import os
import socket
import sys
import threading

import numpy as np
import pytest
import torch

import evaluate
import iqstar
from conftest import ROOT, unavailable


def need(module):
    """An extra of requirements-eval.txt (make test installs them): missing, it fails under CI and skips elsewhere."""
    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed: `make test` installs it (requirements-eval.txt)"
        unavailable(message)
    return importlib.import_module(module)


def run(argv, capsys):
    """evaluate.py in this process: (exit status, stdout, stderr)."""
    code = 0
    try:
        evaluate.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def responses(path, model, prompts, answer):
    """A response file as generate writes it, for these prompt texts."""
    rows = []
    for i, text in enumerate(prompts):
        messages = [{"role": "user", "content": text}]
        rows.append(
            {
                "id": evaluate.prompt_id(messages),
                "messages": messages,
                "response": answer(i),
                "model": model,
                "category": ["cars", "food", "pets"][i % 3],
            }
        )
    return write_jsonl(path, rows)


PROMPTS = [f"question number {i}?" for i in range(40)]


# ---------------------------------------------------------------------------------------------
# a local OpenAI-compatible server whose replies the tests choose
# ---------------------------------------------------------------------------------------------
class Server:
    """/v1/models and /v1/chat/completions on 127.0.0.1; `reply(messages)` gives the text or an HTTP status."""

    def __init__(self):
        self.requests, self.reply = [], lambda messages: "[[A]]"
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.send(200, {"object": "list", "data": [{"id": "test-judge", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                text = server.reply(body["messages"])
                if isinstance(text, int):
                    return self.send(text, {"error": {"message": f"status {text}", "type": "test"}})
                self.send(
                    200,
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                        ],
                    },
                )

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def server(monkeypatch):
    need("openai")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def pair(tmp_path):
    a = responses(tmp_path / "a.jsonl", "alpha", PROMPTS, lambda i: f"alpha's answer {i}")
    b = responses(tmp_path / "b.jsonl", "beta", PROMPTS, lambda i: f"beta's answer {i}")
    return a, b


def judge_args(server, pair, out, *extra):
    return [
        "judge",
        *pair,
        "--out",
        out,
        "--judge-url",
        server.url,
        "--judge-model",
        "test-judge",
        *extra,
    ]


# ---------------------------------------------------------------------------------------------
# parsing: the last verdict counts; none is asked again, then is an error
# ---------------------------------------------------------------------------------------------
def test_the_last_verdict_in_the_text_counts():
    assert evaluate.parse_verdict("Assistant A is clearly better. [[A]]") == "A"
    buried = "One could say [[A]] because it is longer, but B answers the question. Final verdict: [[B]]"
    assert evaluate.parse_verdict(buried) == "B"  # FastChat's first-match parser would say A
    assert evaluate.parse_verdict("[[B]] at first sight; on reflection [[ A ]]") == "A"
    assert evaluate.parse_verdict("Both are fine; I cannot choose.") is None
    assert evaluate.parse_verdict("[A] or [[C]] or A]]") is None
    assert evaluate.parse_verdict("") is None and evaluate.parse_verdict(None) is None


def test_the_template_is_filled_once_braces_in_answers_kept():
    text = evaluate.fill("Q: {prompt} A: {answer_a} B: {answer_b}", "x", '{answer_b} {"k": 1}', "y")
    assert text == 'Q: x A: {answer_b} {"k": 1} B: y'


def test_no_verdict_is_asked_again_and_then_an_error(server, pair, tmp_path, capsys):
    def reply(messages):
        if len(messages) == 1:  # the first answer gives no verdict; asked again, it gives one, or none for prompt 7
            return "They are both good."
        return "Still undecided." if "number 7?" in messages[0]["content"] else "Then [[B]]."

    server.reply = reply
    out = str(tmp_path / "battles.jsonl")
    code, stdout, _ = run(judge_args(server, pair, out), capsys)
    assert code == 0
    again = [r["messages"] for r in server.requests if len(r["messages"]) == 3]  # in the same conversation
    assert len(server.requests) == 80 and len(again) == 40
    assert all(
        m[1] == {"role": "assistant", "content": "They are both good."} and m[2]["content"] == evaluate.ASK_AGAIN
        for m in again
    )
    battles = {b["messages"][0]["content"]: b for b in read_jsonl(out)}
    assert battles["question number 7?"]["winner"] == "error"  # never a silent loss or tie
    assert "[asked again] Still undecided." in battles["question number 7?"]["judgment"]
    assert all(b["winner"] in ("model_a", "model_b") for q, b in battles.items() if q != "question number 7?")
    assert "1 errors" in stdout
    code, stdout, _ = run(["report", out, "--json", tmp_path / "r.json", "--bootstrap", 50], capsys)
    pairs = json.load(open(tmp_path / "r.json"))["pairs"]
    assert pairs[0]["error"] == 1 and pairs[0]["win"] + pairs[0]["lose"] + pairs[0]["tie"] == 39


# ---------------------------------------------------------------------------------------------
# the swap: a judge that always says [[A]] wins the battles shown in order and loses the swapped ones
# ---------------------------------------------------------------------------------------------
def test_an_always_A_judge_gives_half_wins_half_losses_after_unswapping(server, pair, tmp_path, capsys):
    out = str(tmp_path / "battles.jsonl")
    code, _, _ = run(judge_args(server, pair, out, "--seed", 3), capsys)
    assert code == 0
    battles = read_jsonl(out)
    assert len(battles) == 40 and {b["model_a"] for b in battles} == {"alpha"}
    for b in battles:  # each request showed the answers in the order recorded, drawn from (seed, prompt)
        assert b["order"] == ("BA" if evaluate.swapped(3, b["id"]) else "AB")
        assert b["winner"] == ("model_a" if b["order"] == "AB" else "model_b")
    shown_first = {
        r["messages"][0]["content"].split("[The Start of Assistant A's Answer]\n")[1].split("\n")[0]
        for r in server.requests
    }
    swapped = sum(b["order"] == "BA" for b in battles)
    assert sum("beta's" in s for s in shown_first) == swapped
    assert 12 <= swapped <= 28  # about half (binomial(40, 1/2): outside this 1 time in 800)
    wins = sum(b["winner"] == "model_a" for b in battles)
    assert wins + sum(b["winner"] == "model_b" for b in battles) == 40 and wins == 40 - swapped
    # the same seed draws the same orders; another seed others
    run(judge_args(server, pair, str(tmp_path / "again.jsonl"), "--seed", 3), capsys)
    assert [b["order"] for b in read_jsonl(tmp_path / "again.jsonl")] == [b["order"] for b in battles]
    assert [evaluate.swapped(4, b["id"]) for b in battles] != [b["order"] == "BA" for b in battles]


def test_both_orders_one_battle_per_prompt_disagreement_is_a_tie(server, pair, tmp_path, capsys):
    out = str(tmp_path / "battles.jsonl")
    code, stdout, _ = run(judge_args(server, pair, out, "--both-orders"), capsys)
    battles = read_jsonl(out)
    assert code == 0 and len(battles) == 40 and len(server.requests) == 80
    assert all(
        b["winner"] == "tie"
        and [v["order"] for v in b["verdicts"]] == ["AB", "BA"]
        and [v["winner"] for v in b["verdicts"]] == ["model_a", "model_b"]
        for b in battles
    )
    assert "consistent under swapping: 0/40 = 0.000" in stdout
    # a judge that sees through the order: every verdict consistent, alpha's answers win
    server.reply = lambda m: "[[A]]" if m[0]["content"].index("alpha's") < m[0]["content"].index("beta's") else "[[B]]"
    server.requests.clear()
    code, stdout, _ = run(
        judge_args(server, pair, out, "--both-orders", "--judge-extra-body", '{"grammar": "g"}'), capsys
    )  # a server's own options go with each request, and make other judgments
    assert all(b["winner"] == "model_a" for b in read_jsonl(out))
    assert len(server.requests) == 80 and all(r["grammar"] == "g" for r in server.requests)
    assert "consistent under swapping: 40/40 = 1.000" in stdout


# ---------------------------------------------------------------------------------------------
# the cache: a rerun asks nothing; an interrupted run goes on from it; retries with backoff
# ---------------------------------------------------------------------------------------------
def test_a_rerun_asks_nothing_and_an_interrupted_run_goes_on(server, pair, tmp_path, capsys):
    out = str(tmp_path / "battles.jsonl")
    calls = []

    def failing(messages):  # the server falls over after 15 judgments: 500, more times than --retries
        calls.append(1)
        return "[[B]]" if len(calls) <= 15 else 500

    server.reply = failing
    code, _, err = run(judge_args(server, pair, out, "--retries", 2, "--concurrency", 1), capsys)
    line = err.strip().splitlines()[-1]
    assert code == 1 and line.startswith("evaluate.py: error: ") and err.count("error: ") == 1
    assert "InternalServerError after 3 tries" in line and "15 judgments are cached" in err and "rerun" in err
    assert not os.path.exists(out)  # nothing half-written
    server.reply, server.requests[:] = (lambda m: "[[B]]"), []
    code, _, _ = run(judge_args(server, pair, out), capsys)
    assert code == 0 and len(server.requests) == 25 and len(read_jsonl(out)) == 40
    first = open(out).read()
    server.requests.clear()
    code, _, _ = run(judge_args(server, pair, out), capsys)
    assert code == 0 and server.requests == [] and open(out).read() == first
    # a cache line cut short by a kill is dropped, and that judgment asked again
    cache = str(tmp_path / "battles.cache.jsonl")
    text = open(cache).read()
    open(cache, "w").write(text[:-10])
    run(judge_args(server, pair, out), capsys)
    assert len(server.requests) == 1 and open(out).read() == first
    # another template is another judgment
    template = tmp_path / "t.txt"
    template.write_text("Which is better? {prompt}\nA: {answer_a}\nB: {answer_b}\nSay [[A]] or [[B]].")
    server.requests.clear()
    run(judge_args(server, pair, out, "--judge-template", template), capsys)
    assert len(server.requests) == 40 and server.requests[0]["messages"][0]["content"].startswith("Which is better?")


def test_rate_limits_and_server_errors_are_retried(server, pair, tmp_path, capsys):
    tries = {}

    def flaky(messages):  # each request first gets a 429 (rate limit), then a 503 (server error), then an answer
        tries[messages[0]["content"]] = tries.get(messages[0]["content"], 0) + 1
        return {1: 429, 2: 503}.get(tries[messages[0]["content"]], "[[A]]")

    server.reply = flaky
    out = str(tmp_path / "battles.jsonl")
    code, _, _ = run(judge_args(server, pair, out, "--concurrency", 4), capsys)
    assert code == 0 and len(server.requests) == 3 * 40 and len(read_jsonl(out)) == 40


def test_bad_input_gets_one_line_and_status_2(server, pair, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "battles.jsonl")

    def error(argv, *words):
        code, _, err = run(argv, capsys)
        line = err.strip().splitlines()[-1]  # after the progress bar, if it got that far
        assert code == 2 and line.startswith("evaluate.py: error: ") and err.count("error: ") == 1, err
        assert all(w in err for w in words), err
        assert not os.path.exists(out)

    short = responses(tmp_path / "short.jsonl", "beta", PROMPTS[:39], lambda i: "x")
    error(judge_args(server, [pair[0], short], out), "do not hold the same prompts", "1 only in the first")
    same = responses(tmp_path / "same.jsonl", "alpha", PROMPTS, lambda i: "y")
    error(judge_args(server, [pair[0], same], out), "both hold responses of model 'alpha'")
    error(judge_args(server, [pair[0], str(tmp_path / "none.jsonl")], out), "none.jsonl: no such file")
    with socket.socket() as s:  # a free port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    error(
        ["judge", *pair, "--out", out, "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-model", "m"],
        f"--judge-url http://127.0.0.1:{port}/v1: cannot reach it",
    )
    slotless = tmp_path / "t.txt"
    slotless.write_text("Compare {prompt} and {answer_a}.")
    error(judge_args(server, pair, out, "--judge-template", slotless), "no {answer_b} slot")
    error(["judge", *pair, "--out", out], "give --judge-url with --judge-model, or --judge-local")
    error(["judge", *pair, "--out", out, "--judge-url", server.url], "--judge-url needs --judge-model")
    error(judge_args(server, pair, out, "--judge-extra-body", "[1]"), "--judge-extra-body must be a JSON object")
    server.reply = lambda m: 404
    error(judge_args(server, pair, out), "refused the request (HTTP 404")
    monkeypatch.delenv("OPENAI_API_KEY")
    error(judge_args(server, pair, out), "no key in $OPENAI_API_KEY")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"model_a": "x", "model_b": "y", "winner": "model_a"}\n{"model_a": "x", "model_b": "y", "winner": "a"}\n'
    )
    error(["report", bad, "--json", tmp_path / "r.json"], "bad.jsonl, line 2: 'winner' must be one of")
    assert not os.path.exists(tmp_path / "r.json")


# ---------------------------------------------------------------------------------------------
# the rating math
# ---------------------------------------------------------------------------------------------
def test_bradley_terry_matches_choix_and_hand_worked_cases():
    choix = need("choix")
    # hand-worked: A beats B 3 times in 4, so P(A beats B) = 3/4 and the gap is 400 log10(3) points
    theta = evaluate.bradley_terry(np.array([[0.0, 3.0], [1.0, 0.0]]), alpha=0.0)
    assert theta[0] - theta[1] == pytest.approx(math.log(3), abs=1e-9)
    gap = np.diff(evaluate.elo_scale(theta, 1000.0))[0]
    assert -gap == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert evaluate.elo_scale(theta, 1000.0).mean() == pytest.approx(1000.0)
    # against choix's maximum-likelihood estimate on random battles among 6 models (ties doubled into one win each
    # way, since choix takes wins only; doubling scales the likelihood and leaves its maximum where it is)
    rng = np.random.default_rng(0)
    strength = rng.normal(size=6)
    wins, data = np.zeros((6, 6)), []
    for _ in range(400):
        i, j = rng.choice(6, 2, replace=False)
        p = 1 / (1 + math.exp(strength[j] - strength[i]))
        u = rng.random()
        if u < 0.1:  # a tie
            wins[i, j] += 0.5
            wins[j, i] += 0.5
            data += [(i, j), (j, i)]
        else:
            w, lose = (i, j) if u < 0.1 + 0.9 * p else (j, i)
            wins[w, lose] += 1
            data += [(w, lose), (w, lose)]
    ours = evaluate.bradley_terry(wins, alpha=0.0)
    theirs = choix.opt_pairwise(6, data, alpha=0.0, method="Newton-CG")
    assert ours - ours.mean() == pytest.approx(theirs - theirs.mean(), abs=1e-4)


def test_a_tie_is_half_a_win_each_way(tmp_path, capsys):
    # 2 wins and 2 ties: alpha has 2 + 1 wins' worth, beta 0 + 1, the odds of 3 wins in 4
    rows = [
        {"id": f"p{i}", "model_a": "alpha", "model_b": "beta", "winner": w}
        for i, w in enumerate(["model_a", "model_a", "tie", "tie"])
    ]
    run(["report", write_jsonl(tmp_path / "b.jsonl", rows), "--json", tmp_path / "r.json", "--bootstrap", 10], capsys)
    bt = json.load(open(tmp_path / "r.json"))["bradley_terry"]
    assert bt["alpha"]["rating"] - bt["beta"]["rating"] == pytest.approx(400 * math.log10(3), abs=1e-3)


def test_elo_by_hand_and_averaged_over_orderings(tmp_path, capsys):
    # one battle, K = 4, equal ratings: expected 1/2, the winner gains 4 * (1 - 1/2)
    history = evaluate.elo_run([(0, 1, 1.0)], [0], 2, 4.0, 1000.0)
    assert history.tolist() == [[1000.0, 1000.0], [1002.0, 998.0]]
    # then B wins: B's expected score is 1 / (1 + 10^(4/400)); B gains 4 times what it beat that by
    history = evaluate.elo_run([(0, 1, 1.0), (0, 1, 0.0)], [0, 1], 2, 4.0, 1000.0)
    gain = 4 * (1 - 1 / (1 + 10 ** (4 / 400)))
    assert history[-1] == pytest.approx([1002 - gain, 998 + gain])
    # report: 60 battles alpha-beta, each side winning half: orderings average out to about 1000 each, and the spread
    # over orderings is the interval; K is a flag
    rows = [
        {"id": f"p{i}", "model_a": "alpha", "model_b": "beta", "winner": ["model_a", "model_b"][i % 2]}
        for i in range(60)
    ]
    battles = write_jsonl(tmp_path / "b.jsonl", rows)
    for k in (4, 32):
        code, _, _ = run(
            ["report", battles, "--json", tmp_path / f"k{k}.json", "--elo-k", k, "--bootstrap", 20], capsys
        )
        elo = json.load(open(tmp_path / f"k{k}.json"))["elo"]
        assert code == 0 and elo["alpha"]["rating"] + elo["beta"]["rating"] == pytest.approx(2000)
        assert abs(elo["alpha"]["rating"] - 1000) < k and elo["alpha"]["lower"] < 1000 < elo["alpha"]["upper"]
    spread = {k: json.load(open(tmp_path / f"k{k}.json"))["elo"]["alpha"] for k in (4, 32)}
    assert spread[32]["upper"] - spread[32]["lower"] > 4 * (spread[4]["upper"] - spread[4]["lower"])  # K moves it
    one = run(["report", battles, "--json", tmp_path / "o.json", "--elo-orderings", 1, "--bootstrap", 20], capsys)
    assert one[0] == 0 and json.load(open(tmp_path / "o.json"))["elo"]["alpha"]["rating"] != elo["alpha"]["rating"]


def test_report_writes_pairs_ratings_categories_and_plots(tmp_path, capsys):
    # alpha beats beta on 30 of 40 prompts, ties 4, loses 6; beta beats gamma on every prompt but one (an error);
    # category = prompt number mod 3
    rows = []
    for i in range(40):
        cat = ["cars", "food", "pets"][i % 3]
        rows.append(
            {
                "id": f"p{i}",
                "model_a": "alpha",
                "model_b": "beta",
                "category": cat,
                "winner": "model_a" if i < 30 else "tie" if i < 34 else "model_b",
            }
        )
        rows.append(
            {
                "id": f"p{i}",
                "model_a": "gamma",
                "model_b": "beta",
                "category": cat,
                "winner": "error" if i == 0 else "model_b",
            }
        )
    battles = write_jsonl(tmp_path / "b.jsonl", rows)
    out = tmp_path / "r.json"
    code, stdout, _ = run(["report", battles, "--json", out, "--plots", tmp_path / "plots", "--seed", 1], capsys)
    assert code == 0
    r = json.load(open(out))
    ab, gb = r["pairs"]
    assert (ab["model"], ab["win"], ab["tie"], ab["lose"], ab["error"]) == ("alpha", 30, 4, 6, 0)
    assert ab["win_minus_lose"]["value"] == pytest.approx(24 / 40)
    assert ab["win_minus_lose"]["lower"] < 0.6 < ab["win_minus_lose"]["upper"] < 0.9
    assert (gb["win"], gb["lose"], gb["error"], gb["win_minus_lose"]["value"]) == (0, 39, 1, -1.0)
    bt = r["bradley_terry"]
    assert bt["alpha"]["rating"] > bt["beta"]["rating"] > bt["gamma"]["rating"]
    assert all(v["lower"] <= v["rating"] <= v["upper"] for v in bt.values())
    assert r["elo"]["alpha"]["rating"] > r["elo"]["beta"]["rating"] > r["elo"]["gamma"]["rating"]
    # composite win rate in 'cars' (prompts 0, 3, ..., 39: 14 of them): alpha won those below 30, tied 30 and 33
    cars = [i for i in range(40) if i % 3 == 0]
    alpha_cars = (sum(i < 30 for i in cars) + 0.5 * sum(30 <= i < 34 for i in cars)) / len(cars)
    assert r["categories"]["cars"]["alpha"] == pytest.approx(alpha_cars)
    assert r["categories"]["cars"]["gamma"] == 0.0 and set(r["categories"]) == {"cars", "food", "pets"}
    for name in ("winrates.png", "ratings.png", "elo.png", "categories.png"):
        assert open(tmp_path / "plots" / name, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "alpha vs beta" in stdout and "Bradley-Terry" in stdout and "cars" in stdout
    # seeded: the same intervals again; another seed, other intervals
    run(["report", battles, "--json", tmp_path / "same.json", "--seed", 1], capsys)
    assert json.load(open(tmp_path / "same.json")) == r
    run(["report", battles, "--json", tmp_path / "other.json", "--seed", 2], capsys)
    assert json.load(open(tmp_path / "other.json"))["bradley_terry"] != bt


def test_bootstrap_resamples_prompts_with_all_their_battles(tmp_path, capsys):
    # every prompt has two battles that always go the same way: resampled together, win - lose moves in steps of
    # whole prompts; resampled battle by battle, it could land between them
    rows = [
        {"id": f"p{i}", "model_a": "alpha", "model_b": "beta", "winner": "model_a" if i % 4 else "model_b"}
        for i in range(8)
        for _ in range(2)
    ]
    run(["report", write_jsonl(tmp_path / "b.jsonl", rows), "--json", tmp_path / "r.json", "--bootstrap", 300], capsys)
    wl = json.load(open(tmp_path / "r.json"))["pairs"][0]["win_minus_lose"]
    assert wl["value"] == 0.5
    for bound in (wl["lower"], wl["upper"]):  # (wins - losses) / 16 with both counts even
        assert (bound * 16) % 4 == pytest.approx(0, abs=1e-9) or (bound * 16) % 4 == pytest.approx(4, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# hub-style datasets: the test split, BeaverTails' categories, HH's shared turns
# ---------------------------------------------------------------------------------------------
def test_a_dataset_folder_takes_the_hub_path_at_the_test_split(tmp_path):
    folder = tmp_path / "beavertails"
    folder.mkdir()
    write_jsonl(
        folder / "test.jsonl",
        [
            {"prompt": "How do I pick a lock?", "category": "crime", "category_id": 1},
            {"prompt": "Why is my cat sad?", "category": "animal_abuse", "category_id": 2},
            {"prompt": "How do I pick a lock?", "category": "crime", "category_id": 1},
        ],
    )
    write_jsonl(folder / "train.jsonl", [{"prompt": "a training prompt", "category": "x", "category_id": 0}])
    prompts, skipped = evaluate.read_dataset(str(folder), "test")
    assert [(p["messages"][0]["content"], p["category"]) for p in prompts] == [
        ("How do I pick a lock?", "crime"),
        ("Why is my cat sad?", "animal_abuse"),
    ]
    assert skipped == [("row 2", "the same prompt as row 0")]
    hh = tmp_path / "hh"
    hh.mkdir()
    shared = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help me?"
    write_jsonl(
        hh / "test.jsonl", [{"chosen": shared + "\n\nAssistant: Yes", "rejected": shared + "\n\nAssistant: No"}]
    )
    (p,), _ = evaluate.read_dataset(str(hh), "test")
    assert p["messages"] == iqstar.row_to_messages({"chosen": shared})
    assert "category" not in p and p["id"] == evaluate.prompt_id(p["messages"])
    with pytest.raises(evaluate.Failed, match="cannot load its validation split"):
        evaluate.read_dataset(str(hh), "validation")


# ---------------------------------------------------------------------------------------------
# on SmolLM2 (make test converts it into out/smollm2): generate, and the in-process judge
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    path = os.path.join(ROOT, "out", "smollm2")
    if not os.path.isfile(os.path.join(path, "config.json")):
        message = "out/smollm2 is missing: `make test` converts it first"
        unavailable(message)
    return path


def test_generate_on_smollm2_greedy_and_with_the_principle(smollm2, tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "What is gravity?", "category": "science"},
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "What is Wi-Fi?"},
                ]
            },
            {"nothing": 1},
        ],
    )
    out = str(tmp_path / "r.jsonl")
    code, _, err = run(
        ["generate", "--model", smollm2, "--dataset", data, "--out", out, "--max-new-tokens", 6, "--batch-size", 2],
        capsys,
    )
    assert code == 0 and "skipped 1 of 3" in err and "line 3" in err
    rows = read_jsonl(out)
    assert [r["model"] for r in rows] == ["smollm2"] * 2 and rows[0]["category"] == "science"
    assert "category" not in rows[1] and rows[1]["messages"][1]["content"] == "Hello!"
    assert [r["id"] for r in rows] == [evaluate.prompt_id(r["messages"]) for r in rows]
    assert all(r["response"] and not r["ended"] for r in rows)  # 6 tokens: cut off
    # greedy, in a left-padded batch: what iqstar's own prompt gives alone, decoded
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(smollm2), AutoModelForCausalLM.from_pretrained(smollm2)

    def greedy(messages, principle=None):
        ids = iqstar.format_prompt(tokenizer, messages, principle)
        return tokenizer.decode(
            model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :],
            skip_special_tokens=True,
        ).strip()

    assert [r["response"] for r in rows] == [greedy(r["messages"]) for r in rows]
    # the Prompting baseline: the principle in the prompt as iqstar's π_w has it, the same ids, its own name
    principled = str(tmp_path / "p.jsonl")
    code, _, _ = run(
        [
            "generate",
            "--model",
            smollm2,
            "--dataset",
            data,
            "--out",
            principled,
            "--max-new-tokens",
            6,
            "--principle",
            "Answer in one short sentence.",
            "--limit",
            1,
        ],
        capsys,
    )
    (row,) = read_jsonl(principled)
    assert row["id"] == rows[0]["id"] and row["model"] == "smollm2+principle"
    assert row["response"] == greedy(row["messages"], "Answer in one short sentence.")


def test_generate_resumes_what_a_kill_cut_off_and_samples_as_it_would_have(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"how do i bake a cake {i}"} for i in range(5)])
    out, straight = str(tmp_path / "r.jsonl"), str(tmp_path / "straight.jsonl")
    argv = [
        "generate",
        "--model",
        tiny_model,
        "--dataset",
        data,
        "--max-new-tokens",
        5,
        "--batch-size",
        2,
        "--temperature",
        1,
        "--seed",
        7,
        "--name",
        "tiny",
        "--out",
    ]
    assert run(argv + [straight], capsys)[0] == 0
    rows = read_jsonl(straight)
    assert len(rows) == 5 and len({r["response"] for r in rows}) > 1
    assert run(argv + [out], capsys)[0] == 0 and read_jsonl(out) == rows  # seeded: the same samples again
    # killed while writing its last batch: a line cut short is dropped, the rest redone, sampled as they were
    text = open(out).read()
    open(out, "w").write(text[: text.index(rows[3]["id"]) + 5])
    code, stdout, _ = run(argv + [out], capsys)
    assert code == 0 and "2 responses of tiny written, 5 in all" in stdout and read_jsonl(out) == rows
    code, stdout, _ = run(argv + [out], capsys)
    assert "all 5 responses of tiny are there" in stdout and read_jsonl(out) == rows
    code, _, err = run(argv[:-3] + ["--name", "other", "--out", out], capsys)  # another model's file
    assert code == 2 and "holds responses of model 'tiny', not 'other'" in err
    code, _, err = run(argv[:-3] + ["--name", "t", "--out", tmp_path / "x.jsonl", "--temperature", -1], capsys)
    assert code == 2 and "--temperature must be >= 0" in err and not os.path.exists(tmp_path / "x.jsonl")


def test_the_in_process_judge_on_smollm2(smollm2, tmp_path, capsys):
    a = responses(tmp_path / "a.jsonl", "short", ["What is gravity?"], lambda i: "Gravity pulls things together.")
    b = responses(tmp_path / "b.jsonl", "long", ["What is gravity?"], lambda i: "I do not know, ask someone else.")
    out = str(tmp_path / "battles.jsonl")
    argv = [
        "judge",
        a,
        b,
        "--out",
        out,
        "--judge-local",
        smollm2,
        "--both-orders",
        "--max-tokens",
        8,
        "--batch-size",
        2,
    ]  # both orders in one generate() call, and any asked again in a second
    code, stdout, err = run(argv, capsys)
    assert code == 0 and "judging 2 of 2" in err
    (battle,) = read_jsonl(out)
    assert [v["order"] for v in battle["verdicts"]] == ["AB", "BA"]
    assert battle["judge"] == f"local {smollm2} max_tokens=8"
    cache = {c["key"]: c for c in read_jsonl(tmp_path / "battles.cache.jsonl")}
    for v in battle["verdicts"]:  # SmolLM2's own words, parsed: the verdict after asking again if there was none
        entry = next(c for c in cache.values() if c["text"] == v["judgment"])
        assert v["judgment"].strip() and v["winner"] == evaluate.unswap(entry["verdict"], v["order"])
        assert entry["verdict"] == evaluate.parse_verdict(v["judgment"].split("[asked again]")[-1])
    w = [v["winner"] for v in battle["verdicts"]]
    assert battle["winner"] == ("error" if "error" in w else w[0] if w[0] == w[1] else "tie")
    code, _, err = run(argv, capsys)  # all cached: the model is not even loaded
    assert code == 0 and "judging" not in err and read_jsonl(out) == [battle]


# ---------------------------------------------------------------------------------------------
# reward: a small sequence-classification model built here, SmolLM2's tokenizer and chat template
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_model(smollm2, tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    path = str(tmp_path_factory.mktemp("rm"))
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_scores_a_batch_as_one_at_a_time_and_draws_figure_6(reward_model, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts = [
        "What is gravity?",
        "Why is the sky blue?",
        "How do I boil an egg?",
        "What is a budget?",
        "Tell me a joke.",
    ]
    answers = [lambda i: "Yes.", lambda i: "A longer answer, " * (i + 1), lambda i: f"Answer {i}: it depends."]
    files = [responses(tmp_path / f"e{e}.jsonl", f"epoch-{e}", prompts, f) for e, f in enumerate(answers)]
    out = tmp_path / "reward.json"
    code, stdout, _ = run(
        [
            "reward",
            "--reward-model",
            reward_model,
            *files,
            "--json",
            out,
            "--plots",
            tmp_path,
            "--batch-size",
            3,
            "--epochs",
            "0,2,4",
        ],
        capsys,
    )
    assert code == 0
    r = json.load(open(out))
    # each response alone, unpadded, in the model's own template
    tokenizer, model = (
        AutoTokenizer.from_pretrained(reward_model),
        AutoModelForSequenceClassification.from_pretrained(reward_model).eval(),
    )
    scores = []
    for path in files:
        by_id = {}
        for row in read_jsonl(path):
            text = tokenizer.apply_chat_template(
                row["messages"] + [{"role": "assistant", "content": row["response"]}], tokenize=False
            )
            with torch.no_grad():
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                by_id[row["id"]] = model(torch.tensor([ids])).logits.item()
        assert r["scores"][path] == pytest.approx(by_id, abs=1e-5)
        scores.append(np.array([by_id[i] for i in sorted(by_id)]))
    assert r["padding_check"] < 1e-5 and [f["epoch"] for f in r["files"]] == [0, 2, 4]
    spread = scores[0].std(ddof=1)
    for inc, s in zip(r["increments"], scores, strict=True):
        d = s - scores[0]
        half = 1.959964 * d.std(ddof=1) / math.sqrt(len(d)) if d.any() else 0
        assert inc["value"] == pytest.approx(d.mean() / spread, rel=1e-4, abs=1e-6)
        assert inc["upper"] - inc["lower"] == pytest.approx(2 * half / spread, abs=1e-4)
    assert r["increments"][0] == {"epoch": 0, "model": "epoch-0", "value": 0.0, "lower": 0.0, "upper": 0.0}
    assert open(tmp_path / "reward.png", "rb").read(4) == b"\x89PNG"


# An ArmoRM-like reward model, loaded with trust_remote_code: its output has a `score`, read at the first pad
# position ("first_pad", as ArmoRM does), or at the last position whatever the padding ("last", a bug).
TOY_RM = """
from dataclasses import dataclass
import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


class ToyConfig(PretrainedConfig):
    model_type = "toy-rm"

    def __init__(self, vocab_size=49152, reads="first_pad", **kwargs):
        self.vocab_size, self.reads = vocab_size, reads
        super().__init__(**kwargs)


@dataclass
class ToyOutput(ModelOutput):
    score: torch.FloatTensor = None
    rewards: torch.FloatTensor = None


class ToyRM(PreTrainedModel):
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, 8)
        self.head = torch.nn.Linear(8, 3)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden = self.embed(input_ids).cumsum(1)  # a causal summary of the tokens so far
        if self.config.reads == "last":
            at = torch.full((len(input_ids),), input_ids.shape[1] - 1)
        else:
            at = (torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1) % input_ids.shape[1]
        rewards = self.head(hidden[torch.arange(len(input_ids)), at])
        return ToyOutput(score=rewards.sum(-1, keepdim=True), rewards=rewards)
"""


def toy_reward_model(folder, smollm2, reads):
    """The toy saved as remote code is: its module beside its weights, named in config.json's auto_map."""
    from transformers import AutoTokenizer

    os.makedirs(folder)
    source = os.path.join(os.path.dirname(folder), "modeling_toy.py")
    with open(source, "w") as f:
        f.write(TOY_RM)
    spec = importlib.util.spec_from_file_location("modeling_toy", source)
    module = sys.modules["modeling_toy"] = importlib.util.module_from_spec(spec)  # save_pretrained copies its file
    spec.loader.exec_module(module)
    module.ToyConfig.register_for_auto_class()
    module.ToyRM.register_for_auto_class("AutoModelForSequenceClassification")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    torch.manual_seed(0)
    model = module.ToyRM(
        module.ToyConfig(
            vocab_size=len(tokenizer), reads=reads, pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>")
        )
    )  # in no text
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_remote_code_reward_model_with_a_score_and_its_padding_checked(smollm2, tmp_path, capsys):
    prompts = ["What is gravity?", "Why is the sky blue?", "How do I boil an egg?"]
    files = [responses(tmp_path / "r.jsonl", "m", prompts, lambda i: "Yes. " * (3 * i + 1))]
    good = toy_reward_model(tmp_path / "good", smollm2, "first_pad")
    argv = ["reward", "--reward-model", good, *files, "--json", tmp_path / "good.json", "--batch-size", 3]
    code, _, err = run(argv, capsys)  # its own code runs only when asked to
    assert code == 2 and "cannot load it" in err
    code, _, err = run(argv + ["--trust-remote-code"], capsys)
    assert code == 0, err
    r = json.load(open(tmp_path / "good.json"))
    assert code == 0 and r["padding_check"] < 1e-5 and len(set(r["scores"][files[0]].values())) == 3
    bad = toy_reward_model(tmp_path / "bad", smollm2, "last")  # reads a pad token's position in a padded batch
    code, _, err = run(
        [
            "reward",
            "--reward-model",
            bad,
            *files,
            "--json",
            tmp_path / "bad.json",
            "--batch-size",
            3,
            "--trust-remote-code",
        ],
        capsys,
    )
    line = err.strip().splitlines()[-1]  # after the loading bars
    assert code == 2 and "a padded batch scores up to" in line and err.count("error: ") == 1
    assert not os.path.exists(tmp_path / "bad.json")
