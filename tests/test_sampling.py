"""Sampling within --kv-cache-tokens: the calls' plan (each prompt once, longest first, within the budget, every rank
in step), and a run whose calls the budget cuts, which trains each response with its own prompt (and reports to W&B)."""

import glob
import json
import os
import random

import pytest
from transformers import AutoTokenizer

import iqstar
from conftest import HELPERS, read_metrics, run_iqstar, world_args
from test_trackers import wandb_history

RECORDER = os.path.join(HELPERS, "faulty.py")


def test_rollout_batches_cover_each_prompt_once_longest_first_within_the_budget():
    """Random ranks, prompt lengths and budgets: each rank's prompts once each, longest first, every call within the
    budget (or of one row), and every rank making as many calls of as many rows as the others (ranks in step)."""
    rng = random.Random(0)
    for _ in range(300):
        ranks, n = rng.randint(1, 4), rng.randint(1, 40)
        rows = [[rng.randint(1, 60) + 16 for _ in range(n)] for _ in range(ranks)]  # prompt + 16 new tokens
        budget = rng.choice([10, 64, 200, 10**6])
        plans = iqstar.rollout_batches(rows, budget)
        assert len(plans) == ranks and len({tuple(map(len, plan)) for plan in plans}) == 1, (rows, budget)
        for sizes, plan in zip(rows, plans, strict=True):
            order = [i for call in plan for i in call]
            assert sorted(order) == list(range(n))
            assert [sizes[i] for i in order] == sorted(sizes, reverse=True)  # longest first
            for call in plan:
                assert len(call) == 1 or len(call) * max(sizes[i] for i in call) <= budget
        if budget == 10**6:
            assert [len(plan) for plan in plans] == [1] * ranks


def test_the_budget_bounds_the_rows_and_cuts_the_longest_first():
    rows = [[100, 20, 20, 50, 20, 20]]
    assert iqstar.rollout_batches(rows, 100) == [[[0], [3, 1], [2, 4, 5]]]
    assert iqstar.rollout_batches(rows, 99) == [[[0], [3], [1, 2, 4, 5]]]  # a prompt over the budget: a call alone
    assert iqstar.rollout_batches(rows, 10**6) == [[[0, 3, 1, 2, 4, 5]]]
    # two ranks: call i takes the rows that fit beside the longer of the two ranks' i-th longest prompts
    assert iqstar.rollout_batches([[10] * 4, [50, 10, 10, 10]], 60) == [[[0], [1, 2, 3]], [[0], [1, 2, 3]]]


@pytest.mark.process
def test_a_run_trains_each_response_with_its_own_prompt_longest_first_and_reports_to_wandb(world_model, tmp_path):
    """Calls cut by --kv-cache-tokens and sorted by length; each training step scores the response that was sampled
    for its prompt, an epoch's steps take draw_prompts' prompts, and they come longest (prompt + response) first, so
    that a micro-batch holds rows of similar lengths. The same run logs to an offline W&B run: every epoch's record
    of metrics.jsonl, at its epoch's step."""
    out, record = str(tmp_path / "run"), str(tmp_path / "record.json")
    budget = 110  # 23-26 tokens a row (prompts of 7-10 + 16 new): 4 rows a call
    result = run_iqstar(
        world_args(world_model, out, 2) + ["--kv-cache-tokens", budget, "--report-to", "wandb"],
        script=RECORDER,
        env={"IQSTAR_FAULTS": json.dumps({"record": record}), "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    [run_file] = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    assert wandb_history(run_file) == read_metrics(out)
    with open(record) as f:
        record = json.load(f)
    sampled, trained = record["sampled"], record["trained"]
    assert len(sampled) == 2 * 6  # 24 prompts an epoch, 4 a call
    for prompts, _ in sampled:
        assert len(prompts) * (max(map(len, prompts)) + 16) <= budget
        assert [len(p) for p in prompts] == sorted(map(len, prompts), reverse=True)
    pairs = sorted((tuple(p), tuple(y)) for call in sampled for p, y in zip(*call, strict=True))
    assert sorted((tuple(p), tuple(y)) for step in trained for p, y in zip(*step, strict=True)) == pairs
    tokenizer = AutoTokenizer.from_pretrained(world_model)
    prompts = iqstar.build_prompts(
        iqstar.load_conversations(os.path.join(world_model, "train.jsonl"))[0], tokenizer, None, None
    )[0]
    for epoch in (1, 2):  # 3 steps of 8 an epoch
        steps = trained[3 * (epoch - 1) : 3 * epoch]
        drawn = [prompts[i][0] for i in iqstar.draw_prompts(len(prompts), 24, epoch, 0)]
        assert sorted(p for step in steps for p in step[0]) == sorted(drawn)
        lengths = [len(p) + len(y) for step in steps for p, y in zip(*step, strict=True)]
        assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 1, lengths
