"""ZeRO-3 parity: the same Inverse-Q* step under DeepSpeed (one process) and in plain PyTorch."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT
import iqstar
import reference as straightforward


@pytest.mark.parametrize("loss_name", ["policy_loss", "lean_policy_loss"])
def test_one_zero3_step_equals_the_plain_pytorch_step(world_model, tmp_path, loss_name):
    """The lean path too: its chunks call the ZeRO-3 head module again in backward (checkpoint), and its frozen
    targets come from a ZeRO-3 inference engine; the reference is always the straightforward plain-PyTorch step."""
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(world_model).eval()
    prompts = [[5, 9, 14, 3, 4, 5], [5, 20, 21]]
    responses = [[40, 41, 42, 2], [43, 44]]
    principled = [[3, 7] + p for p in prompts]
    targets = straightforward.superior_targets(reference, reference, principled, prompts, responses, 1.4, 0, "cpu")
    lr = 1e-3
    torch.save({"prompts": prompts, "responses": responses, "targets": targets, "pad": 0, "lr": lr,
                "principled": principled},
               tmp_path / "batch.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "zero3_step.py"), world_model,
                             str(tmp_path / "batch.pt"), str(tmp_path / "out.pt"), loss_name],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    zero3 = torch.load(tmp_path / "out.pt")

    # The same step in plain PyTorch, with the optimizer and clipping that ds_config.json asks for.
    config = zero3["config"]
    params = config["optimizer"]["params"]
    policy = iqstar.load_model(world_model, torch.float32).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=params["lr"], betas=params["betas"], eps=params["eps"],
                                  weight_decay=params["weight_decay"])
    # The same function in plain PyTorch: the lean path sums in another order, and Adam turns float noise in
    # exactly-zero gradients (attention's key bias) into ±lr steps; lean = straightforward is test_lean.py's job.
    loss_fn = straightforward.policy_loss if loss_name == "policy_loss" else iqstar.lean_policy_loss
    loss, _, _ = loss_fn(policy, prompts, responses, targets, 0, "cpu")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), config["gradient_clipping"])
    optimizer.step()

    assert abs(zero3["loss"] - loss.item()) < 1e-5, (zero3["loss"], loss.item())
    for got, expected in zip(zero3["targets"], targets, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    plain, before = policy.state_dict(), reference.state_dict()  # tied weights appear under both names
    moved = 0
    for name, value in zero3["state_dict"].items():
        torch.testing.assert_close(value, plain[name], rtol=1e-4, atol=1e-6, msg=name)
        moved += not torch.equal(value, before[name])
    assert set(zero3["state_dict"]) == set(plain)
    assert moved > 0.9 * len(plain)  # the step moved (nearly) every tensor
