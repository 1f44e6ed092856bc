"""ZeRO-3 parity: sampling, frozen targets and one Inverse-Q* step under DeepSpeed (one process) and in plain
PyTorch."""

import os
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

import iqstar
from conftest import HELPERS, ROOT, iqstar_command
from tools import reference


@pytest.mark.process
def test_zero3_samples_scores_and_steps_as_plain_pytorch(world_model, tmp_path):
    """The run's ZeRO-3 pieces against plain PyTorch: the policy gathered for sampling (DeepSpeed's
    unwrap_model_for_generation) samples the very tokens that layer-by-layer sampling does and gives its shards
    and hooks back; a frozen ZeRO-3 inference engine gives the targets of the full-vocabulary formula; and one
    step of the chunked loss moves the weights as AdamW with clipping (ds_config.json) does in plain PyTorch."""
    torch.manual_seed(0)
    sft = AutoModelForCausalLM.from_pretrained(world_model).eval()
    prompts = [[5, 9, 14, 3, 4, 5], [6, 20, 21]]  # no shared start: ZeRO-3 runs none (response_hidden)
    responses = [[40, 41, 42, 2], [43, 44]]
    principled = [[3, 7] + p for p in prompts]
    targets = reference.superior_targets(sft, sft, principled, prompts, responses, 1.4, 0, "cpu")
    torch.save(
        {
            "prompts": prompts,
            "responses": responses,
            "targets": targets,
            "pad": 0,
            "lr": 1e-3,
            "principled": principled,
        },
        tmp_path / "batch.pt",
    )
    command, env = iqstar_command(
        [world_model, tmp_path / "batch.pt", tmp_path / "out.pt"], script=os.path.join(HELPERS, "zero3_step.py")
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    zero3 = torch.load(tmp_path / "out.pt")

    assert zero3["tokens_True"] == zero3["tokens_False"]  # same seeds, same tokens, gathered or not
    assert len({len(y) for call in zero3["tokens_True"] for y in call}) > 1  # responses of several lengths
    assert zero3["whole_while_sampling_True"] and not zero3["whole_while_sampling_False"]
    assert zero3["partitioned_after"] and zero3["hooks_after"] == zero3["hooks_before"]
    mask = iqstar.make_batch(prompts, responses, 0, "cpu")[4]  # the response tokens, each row's last ones
    torch.testing.assert_close(zero3["targets"][mask], targets[mask], rtol=1e-5, atol=1e-5)

    # The same step in plain PyTorch, with the optimizer and clipping that ds_config.json asks for.
    config = zero3["config"]
    params = config["optimizer"]["params"]
    policy = iqstar.load_model(world_model, torch.float32).train()
    optimizer = torch.optim.AdamW(
        policy.parameters(),
        lr=params["lr"],
        betas=params["betas"],
        eps=params["eps"],
        weight_decay=params["weight_decay"],
    )
    policy_logps, mask = iqstar.policy_logprobs(policy, prompts, responses, 0, "cpu")
    loss = iqstar.iqstar_loss(policy_logps, targets, mask)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), config["gradient_clipping"])
    optimizer.step()
    assert abs(zero3["loss"] - loss.item()) < 1e-5, (zero3["loss"], loss.item())
    plain, before = policy.state_dict(), sft.state_dict()  # tied weights appear under both names
    moved = 0
    for name, value in zero3["state_dict"].items():
        torch.testing.assert_close(value, plain[name], rtol=1e-4, atol=1e-6, msg=name)
        moved += not torch.equal(value, before[name])
    assert set(zero3["state_dict"]) == set(plain)
    assert moved > 0.9 * len(plain)  # the step moved (nearly) every tensor
