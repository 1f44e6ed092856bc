"""Two ranks sample under ZeRO-3 with iqstar.sample_responses, their responses ending at different lengths.

Run by tests/test_train.py under `deepspeed --num_gpus 2`; rank 0 writes every call's per-rank lengths.
Without synced generation the rank that finishes first would leave the other waiting in a gather: a hang.
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
    hf_ds_config = HfDeepSpeedConfig(config)  # noqa: F841  (kept alive: partitioned loading, synced generate)
    policy = iqstar.load_model(model_path, torch.float32)
    engine, *_ = deepspeed.initialize(model=policy, model_parameters=policy.parameters(), config=config)
    engine.eval()
    iqstar.use_pure_sampling(policy, max_new_tokens=100, eos_token_ids=[2], pad_token_id=0)
    torch.manual_seed(rank)
    lengths = []
    for call in range(6):
        responses = iqstar.sample_responses(engine.module, [[4, 9, 5 + rank]], policy.generation_config, device)
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, len(responses[0]))
        lengths.append(gathered)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(lengths, f)


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
