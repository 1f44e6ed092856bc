"""One Inverse-Q* training step under DeepSpeed ZeRO-3, in one process, with iqstar's own pieces.

Run by tests/test_zero3.py as `python tests/zero3_step.py MODEL BATCH.pt OUT.pt LOSS`, LOSS being policy_loss
or lean_policy_loss; writes the loss, the updated weights gathered from ZeRO-3 and the targets that
lean_superior_targets computes with a frozen ZeRO-3 engine, for comparison with plain PyTorch.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import iqstar  # noqa: E402
import reference as straightforward  # noqa: E402  (tests/, beside this script)


def main(model_path, batch_path, out_path, loss_name):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    batch = torch.load(batch_path)
    args = iqstar.parse_args(["--model", model_path, "--lr", str(batch["lr"]), "--batch-size", "2"])
    rank, world_size, device = iqstar.init_distributed()
    with open(args.ds_config) as f:
        config = iqstar.fill_ds_config(json.load(f), args, world_size, bf16=False)
    hf_ds_config = HfDeepSpeedConfig(config)  # noqa: F841  (kept alive: partitioned loading)
    policy = iqstar.load_model(model_path, torch.float32)
    engine, *_ = deepspeed.initialize(model=policy, model_parameters=policy.parameters(), config=config)
    frozen, *_ = deepspeed.initialize(model=iqstar.load_model(model_path, torch.float32),
                                      config=iqstar.frozen_config(config))
    frozen.eval()
    targets = iqstar.lean_superior_targets(frozen, frozen, batch["principled"], batch["prompts"], batch["responses"],
                                           1.4, batch["pad"], device, chunk_elements=1)
    engine.train()
    loss_fn = straightforward.policy_loss if loss_name == "policy_loss" else iqstar.lean_policy_loss
    loss, _, _ = loss_fn(engine, batch["prompts"], batch["responses"], batch["targets"],
                         batch["pad"], device)
    engine.backward(loss)
    engine.step()
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    torch.save({"loss": loss.item(), "state_dict": state_dict, "config": config, "targets": targets}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
