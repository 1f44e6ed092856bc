"""bf16 on CPU (the math in float32 from bf16 inputs, and a whole run), sampling within a KV-cache budget, and the
records a tracker gets."""

import glob
import importlib.util
import json
import os
import random
import re
import struct

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import iqstar
import world
from conftest import ROOT, read_metrics, run_iqstar, world_args

RECORDER = os.path.join(ROOT, "tests", "faulty.py")


# --- bf16: hidden states and logits in bf16, π̂ and the loss in float32 ----------------------------------------------
def test_bf16_superior_logprobs_chunks_and_loss_match_float32_within_bf16_rounding():
    """The math takes bf16 inputs and computes in float32. Tolerance: bf16 keeps 8 significant bits, so the inputs
    (hidden states, logits of size ~5) are off by ~0.02; the log-probs may be off by a few times that: 0.1 at most,
    and less than a log-softmax done in bf16 itself (which rounds the outputs of size ~10 again, to ~0.03)."""
    torch.manual_seed(0)
    V, H = 500, 32
    head_w, head_l = torch.nn.Linear(H, V), torch.nn.Linear(H, V)
    hidden_w, hidden_l = torch.randn(2, 9, H), torch.randn(2, 9, H)
    ids = torch.randint(0, V, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    bf16 = [torch.nn.Linear(H, V).to(torch.bfloat16) for _ in range(2)]
    for low, high in zip(bf16, (head_w, head_l), strict=True):
        low.load_state_dict(high.state_dict())
    for alpha in (1.0, 1.4):

        def mix(z_w, z_l, alpha=alpha):
            return iqstar.superior_logprobs(z_w, z_l, alpha)

        full = iqstar.chunked(mix, [head_w, head_l], [hidden_w, hidden_l], ids)
        for chunk_elements in (2 * 4 * V, None):  # chunks of 4 positions, and one chunk
            low = iqstar.chunked(mix, bf16, [hidden_w.bfloat16(), hidden_l.bfloat16()], ids, chunk_elements)
            assert low.dtype == torch.float32
            assert (low - full).abs().max() < 0.1
        logits = (head_w(hidden_w).bfloat16(), head_l(hidden_l).bfloat16())
        assert iqstar.superior_logprobs(*logits, alpha).dtype == torch.float32
        in_bf16 = (alpha * logits[0].log_softmax(-1) + (1 - alpha) * logits[1].log_softmax(-1)).log_softmax(-1)
        full_v = iqstar.superior_logprobs(head_w(hidden_w), head_l(hidden_l), alpha)
        ours = (iqstar.superior_logprobs(*logits, alpha) - full_v).abs().mean()
        assert ours < (in_bf16.float() - full_v).abs().mean()  # float32 math is what keeps it close
    # the policy's log-probs and the loss, and the gradient they send back into bf16 hidden states
    target = -torch.rand(2, 9) * 4
    hidden = torch.randn(2, 9, H, requires_grad=True)
    low_hidden = hidden.detach().bfloat16().requires_grad_()

    def log_softmax(z):  # policy_logprobs' distribution
        return z.float().log_softmax(-1)

    loss = iqstar.iqstar_loss(iqstar.chunked(log_softmax, [head_w], [hidden], ids), target, mask)
    low_logps = iqstar.chunked(log_softmax, [bf16[0]], [low_hidden], ids, 2 * 3 * V)
    low_loss = iqstar.iqstar_loss(low_logps, target, mask)
    assert low_logps.dtype == low_loss.dtype == torch.float32
    torch.testing.assert_close(low_loss, loss, rtol=0.02, atol=0.02)
    loss.backward()
    low_loss.backward()
    assert low_hidden.grad.dtype == torch.bfloat16
    cosine = torch.nn.functional.cosine_similarity(low_hidden.grad.float().flatten(), hidden.grad.flatten(), 0)
    assert cosine > 0.99, cosine


@pytest.mark.parametrize("stage", ["auto", 3])
def test_a_bf16_run_on_cpu_saves_bf16_moves_towards_the_principle_and_reports_to_tensorboard(
    world_model, tmp_path, stage
):
    """python iqstar.py --dtype bf16 on CPU, with DeepSpeed's bf16 at stage 0 (ds_config.json's "auto" on one rank:
    its BF16_Optimizer) and under ZeRO-3 (a config naming stage 3, as several ranks get it); the saved model is bf16
    and reloads; the un-prompted policy moves towards the principled one as the fp32 run does (test_train.py); every
    epoch's record of metrics.jsonl is in the TensorBoard event file."""
    out, config = str(tmp_path / "bf16"), json.load(open(os.path.join(ROOT, "ds_config.json")))
    config["zero_optimization"]["stage"] = stage
    (tmp_path / "ds.json").write_text(json.dumps(config))
    result = run_iqstar(
        world_args(world_model, out, 4)
        + ["--dtype", "bf16", "--report-to", "tensorboard", "--ds-config", str(tmp_path / "ds.json")]
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert re.search(r"rank\(s\), torch.bfloat16$", result.stdout, re.M), result.stdout[:2000]
    # DeepSpeed writes its zero_to_fp32.py beside ZeRO checkpoints only: the run had the stage it was given
    assert os.path.exists(os.path.join(out, "checkpoints", "zero_to_fp32.py")) == (stage == 3)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    sft = AutoModelForCausalLM.from_pretrained(world_model)
    _, held_out = world.split_prompts()
    refuse_before, _ = world.adherence(sft, tokenizer, held_out)
    refuse_after, comply_after = world.adherence(trained, tokenizer, held_out)
    assert refuse_after > refuse_before + 0.3, (refuse_before, refuse_after)
    assert comply_after > 0.85, comply_after
    # TensorBoard: read back with its own reader, the same numbers as metrics.jsonl, at each epoch's step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "runs")).Reload()
    metrics = read_metrics(out)
    assert set(events.Tags()["scalars"]) == set(metrics[0])
    for key in metrics[0]:
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(m["epoch"], pytest.approx(m[key], rel=1e-6, abs=1e-6)) for m in metrics], key


def test_report_to_a_tracker_that_is_not_installed_is_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "how do i bake a cake"}) + "\n")
    real_find_spec = importlib.util.find_spec

    def hidden(name, *rest):
        return None if name == "wandb" else real_find_spec(name, *rest)

    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    with pytest.raises(SystemExit) as e:
        iqstar.main(
            [
                "--model",
                tiny_model,
                "--dataset",
                str(data),
                "--output-dir",
                str(tmp_path / "out"),
                "--report-to",
                "wandb",
            ]
        )
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "iqstar.py: error: --report-to: wandb is not installed (pip install wandb)"
    )
    assert not (tmp_path / "out").exists()


def wandb_history(path):
    """The logged rows of an offline W&B run file: a 7-byte header (":W&B", magic, version), then LevelDB's log
    format (32 KiB blocks of records, each behind 7 bytes: crc, length, type 1 full, 2 first, 3 middle, 4 last) of
    wandb's Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, rows, pending, block, pos = open(path, "rb").read(), [], b"", 32768, 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if block - pos % block < 7 or kind == length == 0:  # the padding at a block's end
            pos += block - pos % block
            continue
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows.append({k: v for k, v in items.items() if not k.startswith("_")})  # not wandb's own _step
    return rows


# --- sampling within --kv-cache-tokens ---------------------------------------------------------------------------
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
