"""Sampling tokens/s of a ZeRO-3 policy, layer by layer (synced generate) and gathered (unwrap_model_for_generation).

Run by bench/bench.py, from the repository root, as
`deepspeed --num_gpus 2 --module bench.sample_speed MODEL OUT.json [PROMPTS TOKENS]`; rank 0 writes the figures.
Every response is forced to its full length (min_new_tokens), so both modes generate the same number of tokens.
"""

import json
import os
import sys
import time

import torch

import iqstar


def main(model_path, out_path, prompts_per_rank=4, new_tokens=32, repeats=2):
    prompts_per_rank, new_tokens = int(prompts_per_rank), int(new_tokens)
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    args = iqstar.parse_args(["--model", model_path])
    rank, world_size, device = iqstar.init_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # one share of the cores per rank, not all
    with open(args.ds_config) as f:  # the project's own ds_config.json
        config = iqstar.fill_ds_config(json.load(f), args, bf16=False)
    hf_ds_config = HfDeepSpeedConfig(config)  # noqa: F841  (kept alive: partitioned loading, synced generate)
    policy = iqstar.load_model(model_path, torch.float32)
    engine, *_ = deepspeed.initialize(model=policy, model_parameters=policy.parameters(), config=config)
    engine.eval()
    iqstar.use_pure_sampling(policy, max_new_tokens=new_tokens, eos_token_ids=[2], pad_token_id=0)
    policy.generation_config.min_new_tokens = new_tokens
    prompts = [[5 + (rank * 31 + i * 7 + j) % 200 for j in range(8)] for i in range(prompts_per_rank)]
    figures = {}
    for mode in ("off", "on", "off", "on"):  # interleaved, so load from elsewhere on the machine hits both alike
        torch.manual_seed(rank)
        gathered = mode == "on"
        with deepspeed.runtime.zero.unwrap_model_for_generation(engine) if gathered else torch.no_grad():
            iqstar.sample_responses(
                engine.module, prompts[:1], policy.generation_config, device, synced_gpus=False if gathered else None
            )  # warm-up
            torch.distributed.barrier()
            start = time.perf_counter()
            tokens = 0
            for _ in range(repeats):
                responses = iqstar.sample_responses(
                    engine.module, prompts, policy.generation_config, device, synced_gpus=False if gathered else None
                )
                tokens += sum(len(y) for y in responses)
            torch.distributed.barrier()
            seconds = time.perf_counter() - start
        count = torch.tensor([tokens], device=device)
        torch.distributed.all_reduce(count)
        figures.setdefault(mode, []).append({"tokens": int(count.item()), "seconds": seconds})
    if rank == 0:
        result = {}
        for mode, runs in figures.items():  # the better of the two runs of each mode
            best = max(runs, key=lambda r: r["tokens"] / r["seconds"])
            result[mode] = dict(best, tokens_per_s=best["tokens"] / best["seconds"])
        result["ranks"] = world_size
        with open(out_path, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
