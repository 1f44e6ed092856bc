"""Each rank's peak memory in an iqstar.py run, on paper: by part and by phase, from the model's config alone.

    python -m tools.plan --config tools/configs/vicuna-7b-v1.5 --ranks 8 --gpu-gib 80
    python -m tools.plan --config tools/configs/vicuna-13b-v1.5 --ranks 8 --gpu-gib 40 --kv-cache-tokens 8192 \
        --gradient-checkpointing --json plan.json
    python -m tools.plan --config tools/configs/vicuna-7b-v1.5 --ranks 1 --gpu-gib 24 --lora-r 16 \
        --gradient-checkpointing --kv-cache-tokens 4096
    python -m tools.plan --readme      # the README's tables: Vicuna-7B and -13B on 8 × 80 and 8 × 40 GiB, and
                                       # with --lora-r 16 on one GPU of 24, 48 and 80 GiB

Run from the repository root (where iqstar.py is).

CONFIG is a model folder or its config.json; no weights are read (the parameters are counted on a model built on
PyTorch's meta device). Every other flag is iqstar.py's own (--batch-size, --max-new-tokens, --kv-cache-tokens,
--samples-per-epoch, --gradient-checkpointing, --gather-for-generation, --aligned-model, --reference-model,
--lora-r, --lora-target-modules, --dtype, --ds-config), read by iqstar's own parser, so that the defaults are the
ones a run gets. The plan's own: --prompt-tokens (the longest prompt, the principle included), --device (cpu:
resident memory of a CPU run, the check bench/memory.py makes). docs/memory.md explains each part and what it was
checked against.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

GiB = 2**30
PHASES = ("loading", "sampling", "scoring", "training")
CUDA_CONTEXT = 1 * GiB  # CUDA context, cuBLAS workspace, NCCL buffers: outside torch's allocator; an allowance


def fail(message):
    print(f"plan.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    """The plan's flags, then iqstar.py's parser on the rest (with --model CONFIG): one namespace."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Any other flag is iqstar.py's.")
    p.add_argument("--config", required=True, help="model folder or config.json (no weights are read)")
    p.add_argument("--ranks", type=int, default=8, help="ranks (GPUs) in all")
    p.add_argument("--gpu-gib", type=float, default=80, help="memory of one GPU, GiB (an 80 GB A100/A800: 80)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="the longest prompt, with the principle")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="cpu: a CPU run's resident memory")
    p.add_argument("--json", help="also write the plan to this file")
    own, rest = p.parse_known_args(argv)
    for flag in ("ranks", "gpu_gib", "prompt_tokens"):
        if getattr(own, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be positive (got {getattr(own, flag)})")
    config_folder(own.config)  # before the slow imports
    import iqstar

    args = iqstar.parse_args(rest + ["--model", own.config])
    for key, value in vars(own).items():
        setattr(args, key, value)
    return args


def config_folder(path):
    """The folder of a model folder or of a config.json; one line and exit 2 when it is neither."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if not os.path.isfile(os.path.join(folder, "config.json")) or not (
        os.path.isdir(path) or os.path.basename(path) == "config.json"
    ):
        fail(f"--config {path}: no config.json there")
    return folder


def read_config(path):
    """The transformers config of a folder or a config.json; one line and exit 2 when it is neither."""
    from transformers import AutoConfig

    folder = config_folder(path)
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:
        fail(f"--config {path}: not a model config ({(str(e) or type(e).__name__).splitlines()[0]})")


def count_params(config):
    """(parameters, largest layer's, those ZeRO-3 keeps whole below `threshold`) of the model, built on the meta
    device. Tied embeddings count once: parameters() yields a shared tensor once. (DeepSpeed's model_to_params
    deduplicates by data_ptr, which is 0 for every meta tensor, so it cannot be used here.)"""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sizes = [p.numel() for p in model.parameters()]
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return sum(sizes), largest, sizes


def adapter_params(config, r, targets):
    """(parameters, largest layer's) of a LoRA adapter of rank r on the model, as PEFT places it: r × (inputs +
    outputs) on each targeted linear layer; "all-linear" is every linear layer but the output head."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    sizes = []
    for name, module in model.named_modules():
        chosen = any(name == t or name.endswith("." + t) for t in targets)
        if isinstance(module, (torch.nn.Linear, Conv1D)) and (
            chosen or targets == ["all-linear"] and module is not head
        ):
            sizes.append(r * sum(module.weight.shape))
    if not sizes:
        fail(f"--lora-target-modules {' '.join(targets)}: no linear layer of the model is named so")
    return sum(sizes), max(sizes)


def shapes(config):
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return dict(
        layers=config.num_hidden_layers,
        hidden=hidden,
        heads=heads,
        head_dim=head_dim,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
        vocab=config.vocab_size,
    )


def kv_bytes_per_token(s, b):
    """K and V of every layer: layers × 2 × kv heads × head dim × bytes (Llama-2-7B in bf16: 0.5 MiB)."""
    return s["layers"] * 2 * s["kv_heads"] * s["head_dim"] * b


def activation_bytes_per_token(s, b):
    """What autograd saves for backward, per token, per decoder layer of a Llama-like model (transformers' sdpa
    path): the MLP's gate, up, SiLU(gate) and product (4 × intermediate); q, k and v at every head (k and v are
    repeated to the query heads), the attention output and o_proj's input (6 × heads × head dim, with the
    residual); each RMSNorm its input in float32 and its output (2 × (4 + b) × hidden). Checked against
    torch.autograd.graph.saved_tensors_hooks on SmolLM2's shapes: 3 % under, in fp32 and in bf16."""
    return 4 * s["intermediate"] * b + 6 * s["heads"] * s["head_dim"] * b + 2 * (4 + b) * s["hidden"]


def chunk_elements(rows, response_tokens, vocab, logit_chunk):
    """Logits of one chunk of iqstar's chunked(): rows × the positions of a chunk × the vocabulary."""
    step = max(1, logit_chunk // (rows * vocab))
    return rows * min(response_tokens, step) * vocab


def zero3_states(total, largest, ranks, b, offload_optimizer):
    """The policy's ZeRO-3 shard: parameters, gradients, fp32 master weights and AdamW's two moments, by
    DeepSpeed's own estimator (no offload: 18 bytes per parameter / ranks + 4 bytes × the largest layer; optimizer
    offloaded to CPU: 2 / ranks + 4 × largest). It assumes 16-bit parameters and gradients. In fp32 (a CPU run)
    parameters and gradients take 4 bytes instead of 2, and stage 3 still keeps a separate fp32 master copy (seen in
    a census of the engine's tensors on CPU: three fp32 copies, and AdamW's two moments after the first step), so
    fp32 counts 2 + 2 bytes more per parameter and 8 × the largest layer."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total,
        largest,
        num_gpus_per_node=ranks,
        num_nodes=1,
        cpu_offload=offload_optimizer,
        cpu_offload_params=False,
        zero_init=True,
    )
    if b == 4:
        gpu += (2 if offload_optimizer else 4) * total // ranks + 4 * largest
    return gpu, cpu


def stage0_states(total, b, fused):
    """The policy without ZeRO (one rank: ds_config's stage "auto" is 0 there): (bytes by phase, DeepSpeed's init
    transient, the optimizer step's transient), per parameter from a census of resident memory around DeepSpeed
    0.19.8's init, backward and step on CPU (SmolLM2; docs/memory.md).
    fp32: FusedAdam on the module's own parameters (4 B); AdamW's moments (8 B) from the first step; gradients on
    p.grad (4 B) from backward until the step's zero_grad; the step updates in place.
    bf16: gradients accumulate in the model's dtype (DeepSpeed's default), which picks FP16_Optimizer
    (FP16_UnfusedOptimizer with torch_adam), not BF16_Optimizer: bf16 parameters (2 B), float32 master weights
    (4 B) and AdamW's moments (8 B), all from deepspeed.initialize, which steps once on zero float32 gradients (4 B;
    unfused, bf16 ones too: 6 B); bf16 gradients on p.grad (2 B); the step converts them to float32 and flattens
    them (4 + 4 B; unfused: a float32 gradient each and, on a GPU, foreach AdamW's square roots)."""
    if b == 4:
        return {"loading": 4 * total, "sampling": 12 * total, "scoring": 12 * total, "training": 16 * total}, 0, 0
    return (
        {"loading": 14 * total, "sampling": 14 * total, "scoring": 14 * total, "training": 16 * total},
        (4 if fused else 6) * total,
        8 * total,
    )


def plan(args):
    """The plan as a dict: parts (bytes by phase), phases (totals), peak, fits. Sizes in GiB in the _gib keys."""
    import iqstar

    config = read_config(args.config)
    total, largest, sizes = count_params(config)
    s = shapes(config)
    with open(args.ds_config) as f:
        ds = json.load(f)
    zero = ds.get("zero_optimization", {})
    dtype = args.dtype if args.dtype != "auto" else "fp32" if args.device == "cpu" else "bf16"
    b = 2 if dtype == "bf16" else 4
    N, B, P, R = args.ranks, args.batch_size, args.prompt_tokens, args.max_new_tokens
    T = P + R  # a micro-batch is padded to its longest prompt and response: planned at the longest of both
    stage = zero.get("stage", 3)
    if stage not in (0, 3, "auto"):
        fail(f'--ds-config {args.ds_config}: iqstar.py expects ZeRO stage 3 or "auto" (got {stage!r})')
    zero3 = stage == 3 or stage == "auto" and N > 1  # iqstar's fill_ds_config: "auto" is 0 on one rank, else 3
    offload = zero3 and zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
    many = zero3 and N > 1  # one rank gathers nothing: DeepSpeed points a parameter at its own shard (NoGatherHandle)
    threshold = zero.get("stage3_param_persistence_threshold", 1e5)
    whole = sum(n for n in sizes if n < threshold)  # small parameters (norms) stay whole on every rank
    shard = (total - whole) / N + whole
    lora = args.lora_r > 0  # then the policy trains an adapter on μ's frozen weights, which also score π_w and π_l
    trainable, trainable_largest = (
        adapter_params(config, args.lora_r, args.lora_target_modules) if lora else (total, largest)
    )
    frozen_models = 0 if lora and not (args.reference_model or args.aligned_model) else 2 if args.aligned_model else 1
    bucket = zero.get("reduce_bucket_size", 5e8) * b if zero3 and zero.get("contiguous_gradients", True) else 0
    gathered_layers = (largest + zero.get("stage3_prefetch_bucket_size", 5e7)) * b if many else 0

    if zero3:
        states, states_cpu = zero3_states(trainable, trainable_largest, N, b, offload)
        adam = 0 if offload else 8 * trainable / N  # AdamW's moments appear at the first step, not at loading
        policy = {"loading": states - adam, "sampling": states, "scoring": states, "training": states}
        init = 0
    else:
        states_cpu = None
        policy, init, step = stage0_states(
            trainable, b, fused=not ds.get("optimizer", {}).get("params", {}).get("torch_adam", False)
        )
    frozen = frozen_models * shard * b
    base = (shard if zero3 else total) * b if lora else 0  # LoRA: μ's weights, frozen, in the policy
    # Loading: on a GPU a model arrives a parameter at a time; on CPU its checkpoint file is mapped and read whole
    # (but see `mapped` below).
    file_bytes = total * {"float32": 4, "float16": 2, "bfloat16": 2}.get(
        str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)).replace("torch.", ""), 4
    )
    # Without ZeRO, deepspeed.initialize's zero step on the policy comes before the frozen models are loaded.
    loading_transient = max(file_bytes if args.device == "cpu" else largest * b, init - frozen)
    # On CPU a checkpoint in the run's dtype is memory-mapped, and in fp32 without ZeRO nothing reads it at loading
    # (ZeRO-3 partitions, so copies, every parameter; bf16's optimizer copies them): its pages become resident at
    # their first use, in sampling.
    mapped = args.device == "cpu" and not zero3 and b == 4 and file_bytes == total * b
    if mapped and not lora:
        policy, loading_transient = dict(policy, loading=0), 0
    if mapped and lora:  # the adapter is made at loading, μ's weights read at their first use
        loading_transient = 0

    # Sampling: iqstar's own rollout_batches cuts this rank's prompts into generate() calls within the budget
    per_rank = -(-args.samples_per_epoch // N)
    calls = iqstar.rollout_batches([[T] * per_rank], args.kv_cache_tokens)[0]
    rows = max(len(c) for c in calls)
    kv = rows * T * kv_bytes_per_token(s, b)
    gathered_policy = total * b if args.gather_for_generation == "on" and many else gathered_layers
    # prefill without gradients: a layer's MLP at a time (SiLU(gate), up, their product), the residual stream and
    # normed input, the attention mask; then each step's float32 logits and probabilities
    prefill = rows * P * (3 * s["intermediate"] + 3 * s["hidden"] + P) * b + 2 * rows * s["vocab"] * 4

    # Scoring: π_w's and π_l's contexts in two forwards of B rows (the prompts' shared start run once is left out:
    # the plan holds rows that share none); both last hidden states stay while chunked() applies the head a chunk at
    # a time: π_w's and π_l's logits of a chunk in the model's dtype and three float32 temporaries of superior_logprobs.
    score_rows = B
    forward = score_rows * T * (3 * s["intermediate"] + 3 * s["hidden"] + T) * b
    hidden_kept = 2 * B * T * s["hidden"] * b
    c = chunk_elements(B, R, s["vocab"], iqstar.LOGIT_CHUNK)
    score_chunks = c * (2 * b + 3 * 4)

    # Training: log π_θ's forward keeps its activations for backward; with --gradient-checkpointing only each
    # layer's input, and one layer's activations while backward recomputes it. Backward recomputes a chunk of logits
    # at a time (its logits, float32 log-softmax and their gradients).
    per_token = activation_bytes_per_token(s, b)
    final = (4 + b) * s["hidden"] + T * b  # the last RMSNorm and the attention mask
    without = B * T * (s["layers"] * per_token + final)
    with_ckpt = B * T * (s["layers"] * s["hidden"] * b + per_token + final)
    activations = with_ckpt if args.gradient_checkpointing else without
    train_chunks = chunk_elements(B, R, s["vocab"], iqstar.LOGIT_CHUNK) * (b + 3 * 4)
    # ZeRO-3's step flattens the shard's 16-bit gradient and converts it to float32 (6 bytes a parameter in bf16,
    # measured on CPU; 4 in fp32); DeepSpeed's estimator leaves it out. It comes after backward has freed the
    # activations: the training phase's peak is the larger of the two (stage 0's step: stage0_states).
    # DeepSpeed steps one sub-group (zero_optimization.sub_group_size parameters) at a time.
    if zero3:
        step = (4 + (b if b < 4 else 0)) * min(trainable / N, zero.get("sub_group_size", 1e9)) if not offload else 0
    context = CUDA_CONTEXT if args.device == "gpu" else 0
    plural = "s" if frozen_models > 1 else ""

    if lora:
        trained = f"adapter r={args.lora_r}: " + (
            "ZeRO-3 shard, AdamW, gradients" if zero3 else "AdamW, gradients (stage 0)"
        )
    else:
        trained = "policy: " + (
            "ZeRO-3 shard, AdamW, gradients (DeepSpeed)" if zero3 else "whole, AdamW, gradients (no ZeRO, stage 0)"
        )
    parts = {  # part: (label, {phase: bytes})
        "policy_states": (trained, policy),
        "lora_base": (
            "μ's frozen weights (LoRA; π_w, π_l: adapter off)",
            dict(dict.fromkeys(PHASES, base), loading=0 if mapped else base),
        ),
        "zero3_buffers": ("ZeRO-3 reduce bucket", dict.fromkeys(PHASES, bucket)),
        "frozen_shards": (
            f"frozen model{plural}: " + (f"ZeRO-3 shard{plural}" if zero3 else "whole"),
            dict(dict.fromkeys(PHASES, frozen), loading=0 if mapped else frozen),
        ),
        "loading": (
            "loading: DeepSpeed's init step, zero gradients"
            if loading_transient == init - frozen and loading_transient > 0
            else "loading: one model's weights in flight",
            {"loading": loading_transient},
        ),
        "gathered_policy": (
            "policy gathered for sampling"
            if args.gather_for_generation == "on"
            else "policy layers gathered per token",
            {"sampling": gathered_policy},
        ),
        "kv_cache": (f"KV cache: {rows} rows × {T} tokens", {"sampling": kv}),
        "generate": ("generate: prefill and logits", {"sampling": prefill}),
        "gathered_layers": (
            "ZeRO-3 layers gathered in forward/backward",
            {"scoring": gathered_layers, "training": gathered_layers},
        ),
        "scoring_forward": (f"π_w/π_l forward: {score_rows} rows, hidden states", {"scoring": forward + hidden_kept}),
        "logit_chunks": ("logit chunks", {"scoring": score_chunks, "training": train_chunks}),
        "activations": (
            f"activations: {B} × {T} tokens" + (", checkpointed" if args.gradient_checkpointing else ""),
            {"training": activations},
        ),
        "cuda_context": ("CUDA context, NCCL (allowance)", dict.fromkeys(PHASES, context)),
    }
    phases = {phase: sum(p.get(phase, 0) for _, p in parts.values()) for phase in PHASES}
    step_peak = (
        sum(
            parts[k][1]["training"]
            for k in ("policy_states", "lora_base", "zero3_buffers", "frozen_shards", "cuda_context")
        )
        + step
    )
    if step_peak > phases["training"]:
        parts["activations"][1]["training"] = 0  # freed by then: the step is the peak
        parts["logit_chunks"][1]["training"] = 0
        parts["gathered_layers"][1]["training"] = 0
    parts["optimizer_step"] = (
        "optimizer step: float32 gradient" + "s, flattened" * (not zero3),
        {"training": step if step_peak > phases["training"] else 0},
    )
    phases = {phase: sum(p.get(phase, 0) for _, p in parts.values()) for phase in PHASES}
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    return {
        "config": args.config,
        "model_type": config.model_type,
        "parameters": total,
        "trained_parameters": trainable,
        "largest_layer": largest,
        "shapes": s,
        "ranks": N,
        "zero_stage": 3 if zero3 else 0,
        "dtype": dtype,
        "device": args.device,
        "gpu_gib": args.gpu_gib,
        "flags": {
            "batch_size": B,
            "prompt_tokens": P,
            "max_new_tokens": R,
            "kv_cache_tokens": args.kv_cache_tokens,
            "samples_per_epoch": args.samples_per_epoch,
            "gradient_checkpointing": args.gradient_checkpointing,
            "gather_for_generation": args.gather_for_generation,
            "aligned_model": bool(args.aligned_model),
            "lora_r": args.lora_r,
            "offload_optimizer": offload,
        },
        "kv_bytes_per_token": kv_bytes_per_token(s, b),
        "generate_rows": rows,
        "generate_calls": len(calls),
        "activations_gib": {"without_checkpointing": without / GiB, "with_checkpointing": with_ckpt / GiB},
        "deepspeed_estimate_gib": {"gpu": states / GiB, "cpu": states_cpu / GiB} if zero3 else None,
        "parts": {
            name: {"label": label, **{f"{ph}_gib": v / GiB for ph, v in by_phase.items()}}
            for name, (label, by_phase) in parts.items()
        },
        "phases_gib": {phase: v / GiB for phase, v in phases.items()},
        "peak_phase": peak_phase,
        "total_gib": peak / GiB,
        "fits": peak <= args.gpu_gib * GiB,
    }


def table(result):
    """The plan as the text plan.py prints."""
    f = result["flags"]
    name = os.path.basename(os.path.normpath(result["config"])).replace("config.json", "") or result["config"]
    lines = [
        f"{name}: {result['parameters'] / 1e9:.2f} B parameters, {result['shapes']['layers']} layers, "
        f"{result['ranks']} rank(s), ZeRO stage {result['zero_stage']}, {result['dtype']} on "
        f"{result['device'].upper()}, --batch-size {f['batch_size']}, prompts of {f['prompt_tokens']} + "
        f"{f['max_new_tokens']} new tokens, "
        f"--kv-cache-tokens {f['kv_cache_tokens']} ({result['generate_calls']} generate call(s) of at most "
        f"{result['generate_rows']} rows)",
        f"{'per rank, GiB':54s}" + "".join(f"{p:>10s}" for p in PHASES),
    ]
    for part in result["parts"].values():
        cells = [part.get(f"{p}_gib") for p in PHASES]
        if any(cells):
            lines.append(f"  {part['label']:52s}" + "".join(f"{c:10.2f}" if c else f"{'':10s}" for c in cells))
    lines.append(f"  {'total':52s}" + "".join(f"{result['phases_gib'][p]:10.2f}" for p in PHASES))
    a = result["activations_gib"]
    lines.append(
        f"activations of a micro-batch: {a['without_checkpointing']:.2f} GiB without "
        f"--gradient-checkpointing, {a['with_checkpointing']:.2f} with it"
    )
    free = result["gpu_gib"] - result["total_gib"]
    lines.append(
        f"peak: {result['total_gib']:.2f} GiB ({result['peak_phase']}) of {result['gpu_gib']:g} GiB: "
        + (f"fits, {free:.1f} GiB to spare" if result["fits"] else f"does NOT fit, {-free:.1f} GiB over")
    )
    return "\n".join(lines)


# What to change when a run does not fit, cheapest first (cumulative): a lower KV budget costs more, shorter generate
# calls; checkpointing recomputes each layer in backward (about a third more training time); offloading AdamW to
# CPU slows each step and needs DeepSpeed's CPU estimate in host memory; sampling with the policy sharded is many
# times slower (README, Performance).
REMEDIES = [
    ["--kv-cache-tokens", "16384"],
    ["--kv-cache-tokens", "8192"],
    ["--kv-cache-tokens", "8192", "--gradient-checkpointing"],
    ["--kv-cache-tokens", "8192", "--gradient-checkpointing", "OFFLOAD"],
    ["--kv-cache-tokens", "4096", "--gradient-checkpointing", "OFFLOAD"],
    ["--kv-cache-tokens", "8192", "--gradient-checkpointing", "OFFLOAD", "--gather-for-generation", "off"],
]
# One GPU with LoRA (no ZeRO, nothing to offload): the same, without offloading, then a micro-batch of one
LORA_REMEDIES = [
    ["--kv-cache-tokens", "16384"],
    ["--kv-cache-tokens", "8192"],
    ["--kv-cache-tokens", "8192", "--gradient-checkpointing"],
    ["--kv-cache-tokens", "4096", "--gradient-checkpointing"],
    ["--kv-cache-tokens", "2048", "--gradient-checkpointing"],
    ["--kv-cache-tokens", "2048", "--gradient-checkpointing", "--batch-size", "1"],
]
OFFLOAD = "ds_config's offload_optimizer on CPU"
HEADROOM = 0.9  # a remedy is chosen when the plan leaves a tenth of the GPU free (for what it does not model)


def first_fit(flags, remedies, gib, offload_config):
    """(the plan at flags, the README's cell for the first remedy that fits, cheapest first)."""
    base = plan(parse_args(flags))
    if base["total_gib"] <= HEADROOM * gib:
        return base, "none needed"
    for remedy in remedies:
        extra = [a for e in remedy for a in (["--ds-config", offload_config] if e == "OFFLOAD" else [e])]
        fixed = plan(parse_args(flags + extra))
        if fixed["total_gib"] <= HEADROOM * gib:
            label = " ".join(f"`{e}`" if e != "OFFLOAD" else OFFLOAD for e in remedy).replace("` `", " ")
            return base, f"{label} ({fixed['total_gib']:.1f} GiB, {fixed['peak_phase']})"
    if base["parts"]["lora_base"]["loading_gib"] > HEADROOM * gib:
        return base, "none: μ's weights alone do not fit"
    return base, "none of plan.py's remedies"


def readme():
    """The README's tables: Vicuna-7B and -13B on 8 GPUs of 80 and 40 GiB at the defaults, and with --lora-r 16 on
    one GPU of 24, 48 and 80 GiB; each with the first remedy that fits."""
    import tempfile
    import iqstar

    with open(iqstar.parse_args(["--model", "x"]).ds_config) as f:
        config = json.load(f)
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    header = [
        "| model | GPUs | peak at the defaults (phase) | fits | first change that fits (peak) |",
        "|---|---|---|---|---|",
    ]
    tables = []
    for ranks, sizes, extra, remedies in (
        (8, (80, 40), [], REMEDIES),
        (1, (24, 48, 80), ["--lora-r", "16"], LORA_REMEDIES),
    ):
        lines = list(header)
        for name in ("vicuna-7b-v1.5", "vicuna-13b-v1.5"):
            folder = os.path.join(HERE, "configs", name)
            for gib in sizes:
                flags = ["--config", folder, "--ranks", str(ranks), "--gpu-gib", str(gib)] + extra
                base, change = first_fit(flags, remedies, gib, f.name)
                lines.append(
                    f"| {name} | {ranks} × {gib} GiB | {base['total_gib']:.1f} GiB ({base['peak_phase']}) | "
                    f"{'yes' if base['fits'] else 'no'} | {change} |"
                )
        tables.append("\n".join(lines))
    os.unlink(f.name)
    return "\n\n".join(tables)


def main(argv=None):
    # the plan runs nothing on a device: DeepSpeed need not look for one (and print on stdout that it found none)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if (argv if argv is not None else sys.argv[1:]) == ["--readme"]:
        print(readme())
        return
    args = parse_args(argv)
    result = plan(args)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
