"""Inverse-Q* under DeepSpeed ZeRO-3 in one process, with iqstar's own pieces, for tests/test_zero3.py.

`python tests/helpers/zero3_step.py MODEL BATCH.pt OUT.pt` writes what plain PyTorch must reproduce: the tokens sampled
with the policy gathered (DeepSpeed's unwrap_model_for_generation) and layer by layer, from the same seeds; whether
the gathering gave the shards and ZeRO-3's hooks back; the targets of a frozen ZeRO-3 inference engine; and the
loss and the weights after one training step.
"""

import json
import sys

import torch

import iqstar


def main(model_path, batch_path, out_path):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    batch = torch.load(batch_path)
    args = iqstar.parse_args(["--model", model_path, "--lr", str(batch["lr"]), "--batch-size", "2"])
    rank, world_size, device = iqstar.init_distributed()
    with open(args.ds_config) as f:
        config = iqstar.fill_ds_config(json.load(f), args, bf16=False)
    config["zero_optimization"]["stage"] = 3  # ds_config.json's "auto" gives one rank stage 0: this checks ZeRO-3
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every layer partitioned, none kept whole
    hf_ds_config = HfDeepSpeedConfig(config)  # noqa: F841  (kept alive: partitioned loading)
    policy = iqstar.load_model(model_path, torch.float32)
    engine, *_ = deepspeed.initialize(model=policy, model_parameters=policy.parameters(), config=config)
    frozen = iqstar.load_frozen(model_path, torch.float32, config)
    report = {}

    engine.eval()
    iqstar.use_pure_sampling(policy, max_new_tokens=40, eos_token_ids=[2], pad_token_id=0)
    offload = engine.optimizer.parameter_offload
    report["hooks_before"] = [len(offload.forward_hooks), len(offload.backward_hooks)]
    for gather in (False, True):
        torch.manual_seed(0)
        with deepspeed.runtime.zero.unwrap_model_for_generation(engine) if gather else torch.no_grad():
            report[f"whole_while_sampling_{gather}"] = all(p.numel() == p.ds_numel for p in engine.parameters())
            report[f"tokens_{gather}"] = [
                iqstar.sample_responses(
                    engine.module, batch["prompts"], policy.generation_config, device, False if gather else None
                )
                for _ in range(3)
            ]
    report["partitioned_after"] = all(p.numel() == 0 for p in engine.parameters())
    report["hooks_after"] = [len(offload.forward_hooks), len(offload.backward_hooks)]

    report["targets"] = iqstar.superior_targets(
        frozen,
        frozen,
        batch["principled"],
        batch["prompts"],
        batch["responses"],
        1.4,
        batch["pad"],
        device,
        chunk_elements=1,
    )
    engine.train()
    policy_logps, mask = iqstar.policy_logprobs(engine, batch["prompts"], batch["responses"], batch["pad"], device)
    loss = iqstar.iqstar_loss(policy_logps, batch["targets"], mask)
    engine.backward(loss)
    engine.step()
    report.update(loss=loss.item(), config=config, state_dict=engine._zero3_consolidated_16bit_state_dict())
    torch.save(report, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
