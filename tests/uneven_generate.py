"""Ranks sample under ZeRO-3 with iqstar.sample_responses, their responses ending at different lengths,
layer by layer (synced generate) and with the policy gathered (gathered_for_generation, no synced_gpus).

Run by tests/test_train.py under `deepspeed --num_gpus 2`, or as one process with plain python; rank 0 writes,
per mode, every call's per-rank lengths and tokens, and what the gathering left behind.
Without synced generation (or gathering) the rank that finishes first would leave the other waiting in a gather: a hang.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import iqstar  # noqa: E402


def main(model_path, out_path):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    args = iqstar.parse_args(["--model", model_path])
    rank, world_size, device = iqstar.init_distributed()
    with open(args.ds_config) as f:
        config = iqstar.fill_ds_config(json.load(f), args, world_size, bf16=False)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every layer partitioned, none kept whole
    hf_ds_config = HfDeepSpeedConfig(config)  # noqa: F841  (kept alive: partitioned loading, synced generate)
    policy = iqstar.load_model(model_path, torch.float32)
    engine, *_ = deepspeed.initialize(model=policy, model_parameters=policy.parameters(), config=config)
    engine.eval()
    iqstar.use_pure_sampling(policy, max_new_tokens=100, eos_token_ids=[2], pad_token_id=0)
    offload = engine.optimizer.parameter_offload
    hooks = len(offload.forward_hooks), len(offload.backward_hooks)
    report = {}
    for mode in ("off", "on"):
        torch.manual_seed(rank)
        calls = []
        with iqstar.gathered_for_generation(engine, mode, device) as gathered:
            whole = all(p.numel() == p.ds_numel for p in engine.parameters())
            for call in range(6):
                responses = iqstar.sample_responses(engine.module, [[4, 9, 5 + rank]], policy.generation_config,
                                                    device, synced_gpus=False if gathered else None)
                everyone = [None] * world_size
                torch.distributed.all_gather_object(everyone, responses[0])
                calls.append(everyone)
        report[mode] = {"gathered": gathered, "whole_inside": whole, "calls": calls,
                        "partitioned_after": all(p.numel() == 0 for p in engine.parameters()),
                        "hooks_after": [len(offload.forward_hooks), len(offload.backward_hooks)]}
    report["hooks_before"] = list(hooks)
    iqstar.GATHER_SHARE = 1e-12  # nothing fits: auto must turn itself off, on every rank alike
    with iqstar.gathered_for_generation(engine, "auto", device) as gathered:
        report["auto_when_nothing_fits"] = gathered
    # Training still works after the hooks came back: one step, and the loss is finite.
    engine.train()
    loss, _, _ = iqstar.lean_policy_loss(engine, [[4, 9]], [[5, 6, 2]], [torch.tensor([-1.0, -2.0, -0.5])], 0, device)
    engine.backward(loss)
    engine.step()
    report["loss_after"] = loss.item()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
