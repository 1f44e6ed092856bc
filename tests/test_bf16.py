"""bf16 on CPU: the math in float32 from bf16 inputs, and whole runs (one without ZeRO, one under ZeRO-3)."""

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import iqstar
import world
from conftest import ROOT, read_metrics, run_iqstar, world_args


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


@pytest.mark.process
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
