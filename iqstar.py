"""Inverse-Q*: token-level RL that aligns an LLM with no preference data, reward or value model. A frozen copy of the
SFT model scores each sampled token with a principle in its system prompt (log π_w) and without it (log π_l); the policy
is pulled towards π̂ = softmax(α log π_w + (1−α) log π_l). Paper: Xia et al. 2024, arXiv 2408.14874 (Algorithm 1, §4.2).

python iqstar.py --model path/or/hub-id --output-dir out  # one process, GPU (bf16) or CPU (fp32); every flag: --help
deepspeed iqstar.py --model lmsys/vicuna-7b-v1.5 --output-dir out/vicuna  # 8 GPUs: the paper's run, its defaults
deepspeed iqstar.py --model HuggingFaceH4/mistral-7b-sft-beta --aligned-model HuggingFaceH4/zephyr-7b-beta  # π_w (§5.3)
"""
import argparse
import atexit
import collections
import contextlib
import functools
import importlib.util
import itertools
import json
import os
import random
import re
import shutil
import signal
import sys
import time
import warnings

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

DEFAULT_PRINCIPLE = (  # our wording of the five points in the paper's Appendix C
    "Follow these principles. Be factually accurate; if you are unsure, say so. If a request could cause harm or "
    "raises safety concerns, do not fulfil it: explain why and point the user to a safe alternative. If the "
    "conversation so far has not solved the user's problem, keep working on it. Stay on the topic of the "
    "conversation. Add background information that helps the user understand the answer.")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")  # Vicuna v1.5's: it has no template

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = fail  # argparse's errors in one line too, without its usage
    g = p.add_argument_group("models and data")
    g.add_argument("--model", required=True, help="SFT model to align (hub id or local path): the initial policy μ")
    g.add_argument("--reference-model", help="frozen model scoring π_l (and π_w); default: --model")
    g.add_argument("--aligned-model", help="frozen aligned model: π_w on the plain prompt, not the principle (§5.3)")
    g.add_argument("--dataset", default="Anthropic/hh-rlhf", help="the contexts D = {x}: hub dataset or local .jsonl")
    g.add_argument("--principle", help="principle given to π_w as a system message; default: the paper's Appendix C")
    g.add_argument("--principle-file", help="read the principle from this file")
    g = p.add_argument_group("Inverse-Q*")
    g.add_argument("--alpha", type=float, default=1.4, help="α in π̂ = softmax(α log π_w + (1−α) log π_l) (§5.4)")
    g.add_argument("--lr", type=float, default=1e-6, help="learning rate γ (Algorithm 1, line 7)")
    g.add_argument("--epochs", type=int, default=15, help="iterations M of Algorithm 1")
    g.add_argument("--samples-per-epoch", type=int, default=500, help="prompts m sampled per epoch, over all ranks")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="longest sampled response")
    g.add_argument("--max-prompt-tokens", type=int, help="skip longer prompts; default: context - --max-new-tokens")
    g = p.add_argument_group("sizes and runtime")
    g.add_argument("--kv-cache-tokens", type=int, default=32768, help="a generate() call's rows × (longest prompt + "
                   "--max-new-tokens) at most, per rank: its KV cache's worst case")
    g.add_argument("--batch-size", type=int, default=2, help="training (and scoring) micro-batch, per rank")
    g.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on GPUs that have it")
    g.add_argument("--gather-for-generation", choices=("on", "off"), default="on", help="off: sample with the policy "
                   "sharded, gathering each layer for every token (slow, but no rank holds the whole policy)")
    g.add_argument("--ds-config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_config.json"),
                   help="DeepSpeed config; its \"auto\" values are filled from these flags")
    g.add_argument("--output-dir", default="out", help="final policy (HF format) and metrics.jsonl")
    g.add_argument("--report-to", choices=("none", "tensorboard", "wandb"), default="none", help="also log there")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    g.add_argument("--save-every", type=int, default=1, help="checkpoint every N epochs (0: at the end only)")
    g.add_argument("--resume", action="store_true", help="go on from the checkpoint in --output-dir/checkpoints")
    g.add_argument("--max-skipped-steps", type=int, default=10, help="stop after N non-finite steps in a row")
    g.add_argument("--snapshot-every", type=int, default=0, help="also save the policy to OUTPUT_DIR/epoch-N (Fig. 6)")
    g.add_argument("--seed", type=int, default=0, help="data order and initial sampling; rank r samples with seed+1+r")
    g.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)

def fail(message, code=2, exit=sys.exit):
    """One line on rank 0 (every rank fails alike) and exit status `code`: 2, an error in the input."""
    if os.environ.get("RANK", "0") == "0":
        print(f"iqstar.py: {'error: ' * (code == 2)}{message}", file=sys.stderr, flush=True)
    exit(code)

# === Algorithm 1, input: the contexts D = {x}. Prompts only; no responses are used ===============================
def row_to_messages(row):
    """One dataset row -> the conversation to prompt with, ending on a user turn; ValueError says why not."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    if row.get("prompt") is not None:
        if not isinstance(row["prompt"], str):
            raise ValueError("'prompt' is not a string")
        messages = [{"role": "user", "content": row["prompt"]}]
    elif row.get("messages") is not None:
        messages = row["messages"]
        roles = ("system", "user", "assistant")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str) for m in messages):
            raise ValueError("'messages' is not a list of {role: system|user|assistant, content: string}")
        if any(m["role"] == "system" for m in messages[1:]):  # templates would render it as another role
            raise ValueError("a system message after the first turn")
    elif isinstance(row.get("chosen"), str) or isinstance(row.get("rejected"), str):
        # HH, "\n\nHuman: …\n\nAssistant: …": the turns that chosen and rejected share, not their final replies (§5.1)
        convs = [re.split(r"\n\n(Human|Assistant): ?", "\n\n" + row[k].lstrip("\n")) for k in ("chosen", "rejected")
                 if isinstance(row.get(k), str)]
        convs = [[{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
                  for r, c in zip(p[1::2], p[2::2])] for p in convs]
        messages = [turns[0] for turns in itertools.takewhile(lambda turns: turns[0] == turns[-1], zip(*convs))]
    else:
        raise ValueError("has none of 'prompt', 'messages', 'chosen'/'rejected'")
    while messages and messages[-1]["role"] == "assistant":  # the policy writes its own reply
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ValueError("no user turn to answer")
    # encode, decode: a lone surrogate ("\ud800") is valid JSON but no text, and raises a UnicodeError
    return [{"role": m["role"], "content": m["content"].encode().decode()} for m in messages]

def load_conversations(dataset):
    """(where, conversation) and (where, why skipped) lists of a local .jsonl or a hub dataset's train split."""
    if os.path.isfile(dataset) or dataset.endswith((".jsonl", ".json")):
        if not os.path.isfile(dataset):
            fail(f"--dataset {dataset}: no such file")
        with open(dataset, "rb") as f:  # each line parsed below, where a bad one is skipped
            rows = [(f"line {number}", line) for number, line in enumerate(f, 1) if line.strip()]
    else:
        import datasets
        try:
            rows = [(f"row {i}", row) for i, row in enumerate(datasets.load_dataset(dataset, split="train"))]
        except Exception as e:
            fail(f"--dataset {dataset}: cannot load it from the hub ({type(e).__name__}: {str(e).splitlines()[0]})")
    conversations, skipped = [], []
    for where, row in rows:
        try:
            conversations.append((where, row_to_messages(json.loads(row.decode()) if isinstance(row, bytes) else row)))
        except (ValueError, RecursionError) as e:  # UnicodeError and JSONDecodeError are ValueErrors
            skipped.append((where, "not UTF-8 text" if isinstance(e, UnicodeError) else "JSON nested too deeply"
                            if isinstance(e, RecursionError) else "not valid JSON"
                            if isinstance(e, json.JSONDecodeError) else str(e)))
    return conversations, skipped

def read_principle(principle, principle_file):
    """The principle of --principle or --principle-file, else the default; ValueError says what is wrong."""
    if principle is not None and principle_file is not None:
        raise ValueError("give --principle or --principle-file, not both")
    if principle_file is not None:
        if not os.path.isfile(principle_file):
            raise ValueError(f"--principle-file {principle_file}: no such file")
        principle = open(principle_file, encoding="utf-8").read().strip()
        if not principle:
            raise ValueError(f"--principle-file {principle_file}: the file is empty")
    return DEFAULT_PRINCIPLE if principle is None else principle

def format_prompt(tokenizer, messages, principle=None, tokenize=True):
    """Token ids (or text) of the conversation ready for the reply, in its chat template, else Vicuna v1.5's (with the
    tokenizer's BOS). π_w's prompt is π_l's with the principle added to its system message: they differ by it alone."""
    if principle is not None:  # π_l's system message: the conversation's, else the one its template writes
        system = [m["content"] for m in messages[:1] if m["role"] == "system"]
        messages = messages[len(system):]
        if not system and tokenizer.chat_template:  # e.g. SmolLM2's "You are a helpful AI assistant named SmolLM, …"
            render = lambda head: tokenizer.apply_chat_template(head + messages, tokenize=False)  # noqa: E731
            (before, _, after), text = render([{"role": "system", "content": "\0"}]).partition("\0"), render([])
            if text.startswith(before) and text.endswith(after) and len(text) > len(before) + len(after):
                system = [text[len(before):len(text) - len(after)]]
        messages = [{"role": "system", "content": "\n\n".join(system + [principle])}] + messages
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        turns = {"system": "{} ", "user": "USER: {} ", "assistant": "ASSISTANT: {}" + tokenizer.eos_token}
        text = VICUNA_SYSTEM + " " + "".join(turns[m["role"]].format(m["content"]) for m in messages) + "ASSISTANT:"
    return tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"] if tokenize else text

def build_prompts(conversations, tokenizer, principle, max_prompt_tokens):
    """(plain, principled) token ids per conversation (principle=None: plain twice), and (where, why) skipped."""
    prompts, skipped = [], []
    for where, messages in conversations:
        try:
            plain = format_prompt(tokenizer, messages)
            principled = plain if principle is None else format_prompt(tokenizer, messages, principle)
        except Exception as e:  # e.g. a template that insists on alternating roles, or refuses a system role
            skipped.append((where, f"the chat template rejects it ({(str(e) or type(e).__name__).splitlines()[0]})"))
            continue
        if max_prompt_tokens is not None and max(len(plain), len(principled)) > max_prompt_tokens:
            skipped.append((where, f"over {max_prompt_tokens} prompt tokens"))  # not cut: the principle comes first
        else:
            prompts.append((plain, principled))
    return prompts, skipped

def skip_report(dataset, skipped, total):
    """One line: how many were skipped and why, naming the first few places of each reason."""
    reasons = {why: [where for where, w in skipped if w == why] for why in dict.fromkeys(w for _, w in skipped)}
    return f"--dataset {dataset}: skipped {len(skipped)} of {total}: " + "; ".join(
        f"{len(places)} {why} ({', '.join(places[:3])}{', ...' if len(places) > 3 else ''})"
        for why, places in sorted(reasons.items(), key=lambda r: -len(r[1])))

def draw_prompts(n, m, epoch, seed):
    """Epoch j's m prompts: items (j−1)m … jm−1 of endless shuffled passes over the n (a resumed run draws the same)."""
    passes = range((epoch - 1) * m // n, (epoch * m - 1) // n + 1)  # a string seed: the same on every rank and machine
    stream = [i for p in passes for i in random.Random(f"{seed}-{p}").sample(range(n), n)]
    return stream[(epoch - 1) * m % n:][:m]

# === Algorithm 1, line 5: sample y ~ π_θ(·|x) =====================================================================
def completion_mask(completion_ids, eos_token_ids):
    """(B, T) mask of the response tokens up to and including the first EOS: the EOS is a decision too."""
    is_eos = torch.isin(completion_ids, torch.as_tensor(eos_token_ids, device=completion_ids.device))
    return is_eos.long().cumsum(-1) - is_eos.long() == 0  # no EOS strictly before position t

def make_batch(prompts, responses, pad_token_id, device):
    """Left-padded rows of prompt + response: input_ids, attention_mask, position_ids; the response ids and mask."""
    W, T = max(len(x) + len(y) for x, y in zip(prompts, responses)), max(len(y) for y in responses)
    rows = [[pad_token_id] * (W - len(x) - len(y)) + x + y for x, y in zip(prompts, responses)]
    real = [[0] * (W - len(x) - len(y)) + [1] * (len(x) + len(y)) for x, y in zip(prompts, responses)]
    input_ids, attention_mask = torch.tensor(rows, device=device), torch.tensor(real, device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # real tokens only: padded, a row sees what it would
    response_mask = torch.tensor([[False] * (T - len(y)) + [True] * len(y) for y in responses], device=device)
    return input_ids, attention_mask, position_ids, input_ids[:, W - T:], response_mask

def use_pure_sampling(model, max_new_tokens, eos_token_ids, pad_token_id):
    """Make generate() sample from π_θ itself, not with the model's generation_config (top_k=50, say); returns that."""
    original, model.generation_config = model.generation_config, GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos_token_ids,
        pad_token_id=pad_token_id)
    return original

@torch.no_grad()
def sample_responses(model, prompts, sampling_config, device, synced_gpus=None):
    """One generate() call: a response per prompt, its token ids up to the first EOS; synced_gpus=None: generate()'s."""
    input_ids, attention_mask, *_ = make_batch(prompts, [[] for _ in prompts], sampling_config.pad_token_id, device)
    completion_ids = model.generate(input_ids, attention_mask=attention_mask, generation_config=sampling_config,
                                    synced_gpus=synced_gpus)[:, input_ids.shape[1]:]
    mask = completion_mask(completion_ids, sampling_config.eos_token_id)
    return [ids[m].tolist() for ids, m in zip(completion_ids, mask)]

def rollout_batches(rows, kv_cache_tokens):
    """Each rank's generate() calls as index lists into its rows (prompt + most new tokens), longest first: one too big
    fails at once. Call i of every rank takes the rows that fit kv_cache_tokens beside all ranks' i-th longest (≥ 1)."""
    orders = [sorted(range(len(sizes)), key=lambda i: -sizes[i]) for sizes in rows]  # ties stay in drawn order
    cuts = [0]  # the same for every rank's order
    while cuts[-1] < len(orders[0]):
        longest = max(sizes[order[cuts[-1]]] for sizes, order in zip(rows, orders))
        cuts.append(cuts[-1] + max(1, kv_cache_tokens // longest))
    return [[order[a:b] for a, b in itertools.pairwise(cuts)] for order in orders]

# === Algorithm 1, line 6: log π̂(y_t) (§4.2) and log π_θ(y_t) at the sampled tokens, and the loss ===============
def superior_logprobs(logits_w, logits_l, alpha):
    """log π̂ = log softmax(α log π_w + (1−α) log π_l): (B, T, V) ×2 -> (B, T, V) float32. α = 1 gives π_w, α = 0
    gives π_l; α > 1 moves past π_w, away from π_l (the paper uses α ≈ 1.4)."""
    # log π = logits − logsumexp(logits): each log-softmax would shift a row by a constant, which the last one removes
    return (alpha * logits_w.float() + (1 - alpha) * logits_l.float()).log_softmax(-1)  # the mixture, normalised

def iqstar_loss(policy_logps, target_logps, mask):
    """L = Σ_t (log π̂(y_t) − log π_θ(y_t))² as a mean over response tokens, (B, T) ×3 -> scalar. The target is a
    fixed label; ∂L/∂log π_θ(y_t) = −2·m_t·(log π̂(y_t) − log π_θ(y_t)) / Σm: each token is pushed by its credit."""
    squared = ((target_logps.detach() - policy_logps) ** 2).masked_fill(mask == 0, 0)  # 0·inf would be NaN
    return squared.sum() / mask.sum().clamp(min=1)  # an all-masked batch gives 0, not 0/0

LOGIT_CHUNK = 2 ** 25  # float32 logits (128 MiB) a chunk: whole (B, T, V) ones of π_w, π_l, π_θ would fill memory

def response_hidden(model, prompts, responses, pad_token_id, device):
    """(B, T, H) last hidden states predicting each response token, the head, the (B, T) ids and mask. The prompts'
    shared start runs once, as every row's KV cache (not under ZeRO-3, whose ranks must run as many forwards, nor with
    checkpointing, which drops caches). One position's logits check they are head(hidden) (not soft-capped)."""
    module = getattr(model, "module", model)  # the HF model inside a DeepSpeed engine
    head, seen, cache = module.get_output_embeddings(), {}, None
    alone = getattr(model, "zero_optimization", bool)() or any(getattr(m, "gradient_checkpointing", 0) for m in
                                                               module.modules())  # its flag in any version
    n = 0 if alone else len(os.path.commonprefix(prompts)[:min(map(len, prompts)) - 1])  # a token left in each row
    tokens, attention_mask, positions, ids, mask = make_batch([x[n:] for x in prompts], responses, pad_token_id, device)
    if n:  # the rows go on from the shared start's cache: their masks cover it, their positions follow it
        cache = module.base_model(torch.tensor([prompts[0][:n]], device=device), use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(prompts))
        attention_mask, positions = torch.nn.functional.pad(attention_mask, (n, 0), value=1), positions + n
    with (module.base_model.register_forward_hook(lambda m, args, out: seen.update(hidden=out[0])),
          head.register_forward_hook(lambda m, args, out: seen.update(head_in=args[0], head_out=out))):
        logits = model(input_ids=tokens, attention_mask=attention_mask, position_ids=positions, logits_to_keep=1,
                       past_key_values=cache, use_cache=False).logits
    hidden = seen["hidden"]
    if not (torch.equal(seen["head_in"], hidden[:, -1:]) and torch.equal(seen["head_out"].float(), logits.float())):
        raise ValueError(f"{type(module).__name__}: its logits are not its output embeddings applied to its last "
                         "hidden state; iqstar's chunked log-probs cannot score it")
    return hidden[:, -ids.shape[1] - 1:-1], head, ids, mask

def chunked(distribution, heads, hiddens, token_ids, chunk_elements=None):
    """distribution(*[head(hidden) per model])[token_ids], (B, T) float32, a chunk of positions at a time. With
    gradients and several chunks, each is recomputed in backward (checkpoint), so backward too holds one (B, c, V)."""
    step = max(1, (chunk_elements or LOGIT_CHUNK) // (token_ids.shape[0] * heads[0].out_features))
    def chunk(s):
        logits = [head(hidden[:, s:s + step]) for head, hidden in zip(heads, hiddens)]
        return distribution(*logits).gather(-1, token_ids[:, s:s + step, None]).squeeze(-1)
    recompute = torch.is_grad_enabled() and any(h.requires_grad for h in hiddens) and step < token_ids.shape[1]
    out = [torch.utils.checkpoint.checkpoint(chunk, s, use_reentrant=False) if recompute else chunk(s)
           for s in range(0, token_ids.shape[1], step)]
    return torch.cat(out, 1) if out else hiddens[0].new_zeros(token_ids.shape, dtype=torch.float32)

@torch.no_grad()
def superior_targets(model_w, model_l, principled, plain, responses, alpha, pad_token_id, device, chunk_elements=None):
    """log π̂(y_t), (B, T), a fixed label: π_w is model_w on `principled` (aligned: `plain`), π_l model_l on `plain`."""
    hidden_w, head_w, ids, _ = response_hidden(model_w, principled, responses, pad_token_id, device)
    hidden_l, head_l, _, _ = response_hidden(model_l, plain, responses, pad_token_id, device)
    distribution = functools.partial(superior_logprobs, alpha=alpha)
    return chunked(distribution, [head_w, head_l], [hidden_w, hidden_l], ids, chunk_elements)

def policy_logprobs(model, prompts, responses, pad_token_id, device, chunk_elements=None):
    """log π_θ(y_t) with its gradient, and the response mask: (B, T) each."""
    hidden, head, ids, mask = response_hidden(model, prompts, responses, pad_token_id, device)
    return chunked(lambda logits: logits.float().log_softmax(-1), [head], [hidden], ids, chunk_elements), mask

# === DeepSpeed plumbing, checkpoints and input checks: nothing above this line knows about them ===================
def init_distributed():
    """rank, world_size, device; `python iqstar.py` without a launcher is a world of one."""
    import deepspeed
    if "RANK" not in os.environ:  # port 0: the one-process group's store takes a free port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # on CPU, DeepSpeed says at each start its op is built
        deepspeed.init_distributed()
    deepspeed.utils.logger.setLevel("WARNING")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's old names
    device = torch.device(deepspeed.get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))
    deepspeed.get_accelerator().set_device(device.index or 0)  # on CPU, nothing
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device

def fill_ds_config(config, args, bf16):
    """ds_config.json's "auto" values from the flags and world size (DeepSpeed derives train_batch_size)."""
    many = int(os.environ.get("WORLD_SIZE", 1)) > 1  # ZeRO-3 on one rank shards nothing, and its hooks cost time
    values = {"train_micro_batch_size_per_gpu": args.batch_size, "lr": args.lr, "enabled": bf16,
              "stage": 3 if many else 0, "memory_efficient_linear": many}  # ZeRO-3's linear re-gathers for backward
    fill = lambda node: {k: fill(v) if isinstance(v, dict) else values.get(k, v) if v == "auto" else v  # noqa: E731
                         for k, v in node.items()}
    if '"auto"' in json.dumps(config := fill(config)):
        fail(f"--ds-config: iqstar.py fills \"auto\" only in {', '.join(values)}; give the others a value")
    return config

def load_model(name, dtype):  # without dropout: log π_θ must be the distribution that sampled y
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, torch.nn.Dropout) else None)

def load_frozen(name, dtype, train_config):
    """π_l or π_w as a DeepSpeed inference engine, as TRL's prepare_deepspeed: sharded like the policy, no optimizer."""
    import deepspeed
    config = {k: v for k, v in train_config.items() if k not in ("optimizer", "scheduler")}
    config["zero_optimization"] = {k: v for k, v in config["zero_optimization"].items() if k != "offload_optimizer"}
    engine, *_ = deepspeed.initialize(model=load_model(name, dtype), config=config)
    return engine.eval() or engine

def open_tracker(args):
    """log(record) to TensorBoard (OUTPUT_DIR/runs) or Weights & Biases, by their own writers; both end at exit."""
    if args.report_to == "wandb":  # WANDB_MODE=offline keeps the run in OUTPUT_DIR/wandb
        import wandb
        run = wandb.init(project="iqstar", dir=args.output_dir, config=vars(args))
        return lambda record: run.log(record, step=record["epoch"])
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(os.path.join(args.output_dir, "runs"))
    return lambda record: [writer.add_scalar(k, v, record["epoch"]) for k, v in record.items()] and writer.flush()

def save_policy(engine, tokenizer, generation_config, output_dir, is_main):
    """The policy (gathered from ZeRO-3) in the run's dtype, as an HF model + tokenizer; files appear when complete."""
    state_dict = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization() else None  # None: as is
    if is_main:  # the ZeRO-3 gather above is a collective; its save_16bit_model writes no HF model
        staging = os.path.join(output_dir, ".saving")
        shutil.rmtree(staging, ignore_errors=True)
        engine.module.save_pretrained(staging, state_dict=state_dict)
        generation_config.save_pretrained(staging)  # the model's own, not the pure sampling one iqstar set
        tokenizer.save_pretrained(staging)
        [os.replace(os.path.join(staging, name), os.path.join(output_dir, name)) for name in os.listdir(staging)]
        os.rmdir(staging)
        print(f"saved the aligned policy to {output_dir}")
    torch.distributed.barrier()

def save_checkpoint(engine, directory, epoch, is_main):
    """Policy, optimizer and RNGs after `epoch`, to directory/epoch-N; latest.json names it once all ranks are done."""
    tag, latest = f"epoch-{epoch}", os.path.join(directory, "latest.json")
    rngs = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rngs, torch.get_rng_state())  # DeepSpeed's checkpoint does not hold them
    engine.save_checkpoint(directory, tag=tag, client_state={"rngs": rngs}, save_latest=False)  # ends in a barrier
    if is_main:
        with open(latest + ".tmp", "w") as f:
            json.dump({"tag": tag, "epoch": epoch, "world_size": len(rngs)}, f)
        os.replace(latest + ".tmp", latest)
        for name in os.listdir(directory):  # keep one (a 7B one is ~100 GB), deleted only now: a killed save keeps it
            if name != tag and os.path.isdir(os.path.join(directory, name)):
                shutil.rmtree(os.path.join(directory, name))
    torch.distributed.barrier()
    return os.path.join(directory, tag)

def load_checkpoint(engine, directory, rank, lr):
    """Load the latest checkpoint and this rank's RNG, but take `lr` from this command; returns its folder, epoch."""
    latest = json.load(open(os.path.join(directory, "latest.json")))
    torch.set_rng_state(engine.load_checkpoint(directory, tag=latest["tag"])[1]["rngs"][rank])
    [group.update(lr=lr) for group in engine.optimizer.param_groups]
    return os.path.join(directory, latest["tag"]), latest["epoch"]

class Stopped(BaseException):
    """SIGINT/SIGTERM as an exception, so that torch's `finally` frees a DeepSpeed op build's lock (killed: never)."""

def raise_stopped(signum, frame):
    raise Stopped(signum)

def check_model(flag, name):
    """The model's config, or a one-line error; also catches a path that does not exist before a hub lookup."""
    if name.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(name)):
        fail(f"{flag} {name}: no such directory")
    try:
        return AutoConfig.from_pretrained(name)
    except Exception as e:
        fail(f"{flag} {name}: not a model directory and not loadable from the hub ({str(e).splitlines()[0]})")

def check_args(args):
    """Everything that can be wrong with the flags, found before anything long starts or is written."""
    for rule, flags in (("> 0", ("alpha", "lr")), (">= 0", ("save_every", "snapshot_every")), ("a positive integer", (
            "epochs", "samples_per_epoch", "max_new_tokens", "kv_cache_tokens", "batch_size", "max_skipped_steps",
            "max_prompt_tokens"))):
        for flag, value in ((f, getattr(args, f)) for f in flags if getattr(args, f) is not None):
            if not (value >= 0 if rule == ">= 0" else value > 0):
                fail(f"--{flag.replace('_', '-')} must be {rule} (got {value})")
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        fail(f"--report-to {args.report_to}: the package is not installed (pip install {args.report_to})")
    try:
        args.principle = read_principle(args.principle, args.principle_file)
        args.ds = json.load(open(args.ds_config))
    except OSError:
        fail(f"--ds-config {args.ds_config}: no such file")
    except ValueError as e:  # read_principle's, or the config's JSON
        fail(f"--ds-config {args.ds_config}: not valid JSON ({e})" if isinstance(e, json.JSONDecodeError) else e)
    if args.ds.get("zero_optimization", {}).get("stage") not in (3, "auto"):  # auto: 0 on one rank, else 3
        fail(f"--ds-config {args.ds_config}: iqstar.py expects ZeRO stage 3 or \"auto\"")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        fail(f"--output-dir {args.output_dir}: exists and is not a directory")
    latest = os.path.join(args.output_dir, "checkpoints", "latest.json")
    if args.resume and (args.overwrite or not os.path.isfile(latest)):
        fail("give --resume (go on with the run) or --overwrite (replace it), not both" if args.overwrite
             else f"--resume: {os.path.dirname(latest)} holds no complete checkpoint")
    if args.resume:  # ZeRO-3 shards the optimizer by rank: a checkpoint loads into as many ranks only
        saved, world_size = json.load(open(latest))["world_size"], int(os.environ.get("WORLD_SIZE", 1))
        if saved != world_size:
            fail(f"--resume: the checkpoint in {os.path.dirname(latest)} was written by {saved} rank(s) and this run "
                 f"has {world_size}; resume with {saved}")
    held = [n for n in ("config.json", "model.safetensors", "pytorch_model.bin", "metrics.jsonl", "checkpoints")
            if os.path.exists(os.path.join(args.output_dir, n))]
    if held and not args.overwrite and not args.resume:
        fail(f"--output-dir {args.output_dir} already holds a run ({', '.join(held)}); pass --resume to go on "
             "with it or --overwrite to replace it")

def eos_token_ids(tokenizer, config):
    """Every token that ends a response: the tokenizer's EOS and the model's (chat models may have several)."""
    eos = getattr(config, "eos_token_id", None)
    return sorted({tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})

def read_prompts(args, tokenizer, config):
    """--dataset's usable conversations as (plain, principled) token ids; one line says what was skipped, and why."""
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    max_prompt = args.max_prompt_tokens or (context - args.max_new_tokens if context else None)
    if max_prompt is not None and max_prompt < 1:
        fail(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in {context} positions")
    conversations, skipped = load_conversations(args.dataset)
    # Each prompt twice: plain (π_θ, π_l; π_w too when it is an aligned model) and with the principle (π_w).
    prompts, more = build_prompts(conversations, tokenizer, None if args.aligned_model else args.principle, max_prompt)
    skipped += more
    if not prompts:
        fail(skip_report(args.dataset, skipped, len(skipped)) + "; nothing left to train on" if skipped
             else f"--dataset {args.dataset}: holds no prompts")
    if skipped and os.environ.get("RANK", "0") == "0":
        print(skip_report(args.dataset, skipped, len(prompts) + len(skipped)))
    return prompts

# === Algorithm 1 ================================================================================================
def main(argv=None):
    [signal.signal(s, raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)]  # deepspeed sends Ctrl-C on as SIGTERM
    args = parse_args(argv)
    check_args(args)
    config = check_model("--model", args.model)
    for flag, name in (("--reference-model", args.reference_model), ("--aligned-model", args.aligned_model)):
        other = name and check_model(flag, name)  # π̂ mixes the models' distributions token by token
        if other and other.vocab_size != config.vocab_size:
            fail(f"{flag} has a vocabulary of {other.vocab_size} tokens, --model of {config.vocab_size}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = eos_token_ids(tokenizer, config)
    if not eos:
        fail(f"--model {args.model}: the tokenizer has no EOS token to end responses")
    prompts = read_prompts(args, tokenizer, config)
    epoch, checkpoint = 0, None  # the epoch under way, and the checkpoint a stopped run resumes from
    try:
        rank, world_size, device = init_distributed()
        is_main = rank == 0
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig
        bf16 = args.dtype == "bf16" or args.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
        ds_config = fill_ds_config(args.ds, args, bf16=bf16)
        per_rank = -(-args.samples_per_epoch // world_size)  # rounded up: every rank runs as many steps
        if is_main:
            print(f"{len(prompts)} prompts, {per_rank * world_size} samples an epoch, {world_size} rank(s), {dtype}")
        # Algorithm 1, line 3: π_θ ← μ. The same seed on every rank for loading; offset by rank for sampling below.
        torch.manual_seed(args.seed)
        hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 (alive all run: transformers keeps a weak ref to it)
        policy = load_model(args.model, dtype)
        if args.gradient_checkpointing:
            getattr(policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable)()  # the newer name
        hub_config = use_pure_sampling(policy, args.max_new_tokens, eos, pad_token_id)  # the one saved with it
        engine, *_ = deepspeed.initialize(model=policy, model_parameters=policy.parameters(), config=ds_config)
        reference = load_frozen(args.reference_model or args.model, dtype, ds_config)  # π_l; π_w with the principle
        aligned = load_frozen(args.aligned_model, dtype, ds_config) if args.aligned_model else reference  # π_w
        torch.manual_seed(args.seed + 1 + rank)  # CRUCIAL: each rank must sample different responses
        checkpoints, metrics_path = (os.path.join(args.output_dir, n) for n in ("checkpoints", "metrics.jsonl"))
        checkpoint, done = load_checkpoint(engine, checkpoints, rank, args.lr) if args.resume else (None, 0)
        if is_main:
            if args.resume:
                print(f"resumed from {checkpoint} after epoch {done}", flush=True)
            else:  # --overwrite: never resume into another run's state, nor add to its TensorBoard curves
                [shutil.rmtree(d, ignore_errors=True) for d in (checkpoints, os.path.join(args.output_dir, "runs"))]
            os.makedirs(checkpoints, exist_ok=True)
            old = open(metrics_path).readlines() if args.resume and os.path.exists(metrics_path) else []
            with open(metrics_path, "w") as f:  # a resumed run's metrics go on from its checkpoint's epoch
                f.writelines(line for line in old if json.loads(line)["epoch"] <= done)
        # On a terminal a bar vanishes when done; in a log it ends its line, so that each epoch's line has its own.
        bar = functools.partial(tqdm, disable=not is_main, leave=not sys.stderr.isatty(), dynamic_ncols=True)
        skipped_in_a_row, gather = 0, args.gather_for_generation == "on" and engine.zero_optimization()  # ZeRO-3's
        log = open_tracker(args) if is_main and args.report_to != "none" else lambda record: None
        for epoch in range(done + 1, args.epochs + 1):  # Algorithm 1, line 4
            # line 5: x ~ D, the same draw on every rank, split between them; y ~ π_θ(·|x)
            drawn = draw_prompts(len(prompts), per_rank * world_size, epoch, args.seed)
            plain, principled = ([prompts[i][k] for i in drawn[rank::world_size]] for k in (0, 1))
            seconds, started, responses = dict.fromkeys(("sample", "score", "train"), 0.0), time.time(), []
            rows = [[len(prompts[i][0]) + args.max_new_tokens for i in drawn[r::world_size]] for r in range(world_size)]
            engine.eval()
            # Gathered (TRL's ds3_gather_for_generation): the whole policy on each rank; else every token gathers it
            with deepspeed.runtime.zero.unwrap_model_for_generation(engine) if gather else contextlib.nullcontext():
                for call in bar(rollout_batches(rows, args.kv_cache_tokens)[rank], desc=f"epoch {epoch} sample"):
                    responses += zip(call, sample_responses(policy, [plain[i] for i in call], policy.generation_config,
                                                            device, False if gather else None))  # None: generate()'s
            # micro-batches of similar lengths pad less; the longest first, so that a lack of memory shows at once
            places, responses = zip(*sorted(responses, key=lambda pair: -len(plain[pair[0]]) - len(pair[1])))
            plain, principled = ([column[i] for i in places] for column in (plain, principled))  # with their responses
            seconds["sample"] = time.time() - started
            engine.train()
            tally, skipped = collections.Counter(), 0
            with bar(range(0, len(responses), args.batch_size), desc=f"epoch {epoch} train") as progress:
                for start in progress:
                    batch, started = slice(start, start + args.batch_size), time.time()
                    ys = responses[batch]
                    # line 6, its target: log π̂(y_t) from the frozen model(s), §4.2
                    target_logps = superior_targets(aligned, reference, principled[batch], plain[batch], ys,
                                                    args.alpha, pad_token_id, device)
                    seconds["score"], started = seconds["score"] + time.time() - started, time.time()
                    # line 6: L = Σ_t (log π̂(y_t) − log π_θ(y_t))²
                    policy_logps, mask = policy_logprobs(engine, plain[batch], ys, pad_token_id, device)
                    loss = iqstar_loss(policy_logps, target_logps, mask)
                    # line 7: θ ← θ − γ∇L by ds_config.json's optimizer; DeepSpeed skips a non-finite step on all ranks
                    engine.backward(loss)  # DeepSpeed's fp32 optimizer without ZeRO would take a non-finite step
                    grads = (p.grad for p in policy.parameters() if p.grad is not None)  # ZeRO-3 holds them elsewhere
                    finite = torch.nn.utils.get_total_norm(grads).isfinite().item()  # a generator: none kept after it
                    engine.step() if finite else engine.zero_grad()  # a skipped step: its gradients dropped
                    applied = finite and engine.was_step_applied()
                    skipped_in_a_row, skipped = (0, skipped) if applied else (skipped_in_a_row + 1, skipped + 1)
                    credit = (target_logps - policy_logps.detach()) * mask
                    if applied:  # a skipped step's numbers may be NaN
                        tally.update(squared=(credit ** 2).sum().item(), credit=credit.sum().item(),
                                     target=(target_logps * mask).sum().item(), trained=mask.sum().item())
                    tally.update(tokens=mask.sum().item(), responses=len(ys), ended=sum(y[-1] in eos for y in ys))
                    seconds["train"] += time.time() - started
                    if skipped_in_a_row >= args.max_skipped_steps:
                        progress.close()  # its last line first, then ours
                        fail(f"stopped: {skipped_in_a_row} steps in a row had a non-finite loss or gradient, and "
                             f"none of them changed the policy (epoch {epoch}). Lower --lr or check the data; " +
                             (f"resume from {checkpoint} with --resume" if checkpoint else "nothing was saved"), 3)
            tallies = [None] * world_size  # log: one line per epoch, and one in metrics.jsonl; sums over all ranks
            torch.distributed.all_gather_object(tallies, tally)
            t = collections.Counter({k: sum(x[k] for x in tallies) for k in set().union(*tallies)})
            trained = max(t["trained"], 1)
            record = {"epoch": epoch, "loss": t["squared"] / trained, "credit": t["credit"] / trained,
                      "target_logp": t["target"] / trained, "response_tokens": int(t["tokens"]),
                      "mean_response_length": t["tokens"] / t["responses"], "eos_rate": t["ended"] / t["responses"],
                      "skipped_steps": skipped, **{f"{k}_seconds": round(v, 2) for k, v in seconds.items()}}
            if is_main:
                print(f"epoch {epoch}/{args.epochs}  " + "  ".join(f"{k} {v:.4g}" for k, v in list(record.items())[1:]),
                      flush=True)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                log(record)
            # checkpoint: a run stopped from here on resumes from the end of this epoch
            if epoch == args.epochs or (args.save_every and epoch % args.save_every == 0):
                checkpoint = save_checkpoint(engine, checkpoints, epoch, is_main)
            if args.snapshot_every and epoch % args.snapshot_every == 0 and epoch < args.epochs:
                save_policy(engine, tokenizer, hub_config, os.path.join(args.output_dir, f"epoch-{epoch}"), is_main)
        save_policy(engine, tokenizer, hub_config, args.output_dir, is_main)
    except (Stopped, RuntimeError) as e:  # a RuntimeError too: a collective breaks when another rank has stopped
        [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)]  # whatever the launcher sends on
        store = torch.distributed.is_initialized() and torch.distributed.distributed_c10d._get_default_store()
        with contextlib.suppress(Exception):  # the ranks' shared store tells the others why this one stopped
            store.set("stopped", str(e.args[0])) if isinstance(e, Stopped) else None
        if not (isinstance(e, Stopped) or store and store.check(["stopped"])):
            raise
        signum = e.args[0] if isinstance(e, Stopped) else int(store.get("stopped"))
        fail(f"stopped by {signal.Signals(signum).name} {f'in epoch {epoch}' if epoch else 'while starting'}; "
             + (f"resume from {checkpoint}: run the same command with --resume" if checkpoint else "nothing was saved"),
             128 + signum, os._exit)  # no teardown: freeing a process group that a rank has left can abort
    finally:
        if torch.distributed.is_initialized():  # else a rank may crash at exit, its comm threads still running
            torch.distributed.destroy_process_group()

if __name__ == "__main__":
    main()  # then atexit's handlers (wandb's end) and no teardown: DeepSpeed holds the process groups to the end, and
    atexit._run_exitfuncs(), sys.stdout.flush(), os._exit(0)  # freeing them there can abort a rank (terminate called)
