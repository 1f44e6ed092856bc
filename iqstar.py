"""Inverse-Q*: token-level RL that aligns an LLM with no preference data, no reward model and no value model.
A frozen copy of the SFT model scores each sampled token with a principle in its system prompt (log π_w) and without
it (log π_l); the policy moves towards π̂ = softmax(α log π_w + (1−α) log π_l). Paper: Xia et al., arXiv 2408.14874.

python iqstar.py --model path/or/hub-id --output-dir out  # one process, GPU (bf16) or CPU (fp32); every flag: --help
deepspeed iqstar.py --model lmsys/vicuna-7b-v1.5 --output-dir out/vicuna  # 8 GPUs: the paper's run, its defaults
deepspeed iqstar.py --model HuggingFaceH4/mistral-7b-sft-beta --aligned-model HuggingFaceH4/zephyr-7b-beta  # π_w (§5.3)
"""

import argparse
import atexit
import collections
import contextlib
import ctypes
import functools
import importlib.util
import itertools
import json
import math
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
from transformers.integrations.deepspeed import HfDeepSpeedConfig, set_hf_deepspeed_config, unset_hf_deepspeed_config

DEFAULT_PRINCIPLE = (  # our wording of the five points in the paper's Appendix C
    "Follow these principles. Be factually accurate; if you are unsure, say so. If a request could cause harm or "
    "raises safety concerns, do not fulfil it: explain why and point the user to a safe alternative. If the "
    "conversation so far has not solved the user's problem, keep working on it. Stay on the topic of the "
    "conversation. Add background information that helps the user understand the answer."
)
VICUNA_SYSTEM = (  # Vicuna v1.5's: its tokenizer has no chat template
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)


def parse_args(argv=None):
    formatter = argparse.ArgumentDefaultsHelpFormatter  # --help shows the defaults
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=formatter)
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
    g = p.add_argument_group("sizes, runtime and LoRA (one copy of the weights: π_w and π_l are μ, the adapter off)")
    g.add_argument("--lora-r", type=int, default=0, help="rank of a LoRA adapter to train (0: train every weight)")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA's α: the adapter's update is scaled by α/r")
    g.add_argument("--lora-target-modules", nargs="+", default=["all-linear"], help="module names given an adapter")
    g.add_argument("--kv-cache-tokens", type=int, default=32768, help="a generate() call's KV-cache tokens, per rank")
    g.add_argument("--batch-size", type=int, default=2, help="training (and scoring) micro-batch, per rank")
    g.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on GPUs that have it")
    g.add_argument("--gather-for-generation", choices=("on", "off"), default="on", help="off: sample sharded (slow)")
    ds_config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_config.json")
    g.add_argument("--ds-config", default=ds_config, help='DeepSpeed config; its "auto" values come from these flags')
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
        print(f"iqstar.py: {'error: ' if code == 2 else ''}{message}", file=sys.stderr, flush=True)
    exit(code)


# === Algorithm 1, input: the contexts D = {x}. Prompts only; no responses are used ===============================
def hh_messages(row):
    """HH's "\n\nHuman: …\n\nAssistant: …" text of chosen (else rejected) as turns, its reply included (§5.1)."""
    text = row["chosen"] if isinstance(row.get("chosen"), str) else row["rejected"]
    parts = re.split(r"\n\n(Human|Assistant): ?", "\n\n" + text.lstrip("\n"))
    turns = zip(parts[1::2], parts[2::2], strict=True)  # (speaker, what they said)
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said.strip()} for who, said in turns]


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
            isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError("'messages' is not a list of {role: system|user|assistant, content: string}")
        if any(m["role"] == "system" for m in messages[1:]):  # templates would render it as another role
            raise ValueError("a system message after the first turn")
    elif isinstance(row.get("chosen"), str) or isinstance(row.get("rejected"), str):
        messages = hh_messages(row)
    else:
        raise ValueError("has none of 'prompt', 'messages', 'chosen'/'rejected'")
    while messages and messages[-1]["role"] == "assistant":  # the policy writes its own reply (HH: chosen's, dropped)
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ValueError("no user turn to answer")
    # encode, decode: a lone surrogate ("\ud800") is valid JSON but no text, and raises a UnicodeError
    return [{"role": m["role"], "content": m["content"].encode().decode()} for m in messages]


READ_ERRORS = {json.JSONDecodeError: "not valid JSON", RecursionError: "JSON nested too deeply"}
READ_ERRORS.update(dict.fromkeys((UnicodeDecodeError, UnicodeEncodeError), "not UTF-8 text"))


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
            row = json.loads(row.decode()) if isinstance(row, bytes) else row  # a line of a .jsonl, or a hub row
            conversations.append((where, row_to_messages(row)))
        except (ValueError, RecursionError) as e:  # UnicodeError and JSONDecodeError are ValueErrors
            skipped.append((where, READ_ERRORS.get(type(e), str(e))))
    return conversations, skipped


def read_principle(principle, principle_file):
    """The principle of --principle or --principle-file, else the default; ValueError says what is wrong."""
    if principle is not None and principle_file is not None:
        raise ValueError("give --principle or --principle-file, not both")
    if principle_file is not None:
        if not os.path.isfile(principle_file):
            raise ValueError(f"--principle-file {principle_file}: no such file")
        with open(principle_file, encoding="utf-8") as f:
            principle = f.read().strip()
        if not principle:
            raise ValueError(f"--principle-file {principle_file}: the file is empty")
    return DEFAULT_PRINCIPLE if principle is None else principle


def template_system(tokenizer, messages):
    """[The system message a chat template writes where there is none] (SmolLM2's "You are a helpful AI …"), or []."""
    placeholder = tokenizer.apply_chat_template([{"role": "system", "content": "\0"}] + messages, tokenize=False)
    before, _, after = placeholder.partition("\0")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if text.startswith(before) and text.endswith(after) and len(text) > len(before) + len(after):
        return [text[len(before) : len(text) - len(after)]]
    return []


def format_prompt(tokenizer, messages, principle=None, tokenize=True):
    """Token ids (or text) of the conversation ready for the reply, in its chat template, else Vicuna v1.5's (with the
    tokenizer's BOS). π_w's prompt is π_l's with the principle added to its system message: they differ by it alone."""
    if principle is not None:  # π_l's system message: the conversation's, else the one its template writes
        system = [m["content"] for m in messages[:1] if m["role"] == "system"]
        messages = messages[len(system) :]
        if not system and tokenizer.chat_template:
            system = template_system(tokenizer, messages)
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
    places = collections.defaultdict(list)
    for where, why in skipped:
        places[why].append(where)
    reasons = []
    for why, where in sorted(places.items(), key=lambda reason: -len(reason[1])):
        reasons.append(f"{len(where)} {why} ({', '.join(where[:3])}{', ...' if len(where) > 3 else ''})")
    return f"--dataset {dataset}: skipped {len(skipped)} of {total}: " + "; ".join(reasons)


def draw_prompts(n, m, epoch, seed):
    """Epoch j's m prompts: items (j−1)m … jm−1 of endless shuffled passes over the n (a resumed run draws the same)."""
    passes = range((epoch - 1) * m // n, (epoch * m - 1) // n + 1)  # a string seed: the same on every rank and machine
    stream = [i for p in passes for i in random.Random(f"{seed}-{p}").sample(range(n), n)]
    return stream[(epoch - 1) * m % n :][:m]


# === Algorithm 1, line 5: sample y ~ π_θ(·|x) =====================================================================
def completion_mask(completion_ids, eos_token_ids):
    """(B, T) mask of the response tokens up to and including the first EOS: the EOS is a decision too."""
    is_eos = torch.isin(completion_ids, torch.as_tensor(eos_token_ids, device=completion_ids.device))
    return is_eos.long().cumsum(-1) - is_eos.long() == 0  # no EOS strictly before position t


def make_batch(prompts, responses, pad_token_id, device):
    """Left-padded rows of prompt + response: input_ids, attention_mask, position_ids; the response ids and mask."""
    pairs = list(zip(prompts, responses, strict=True))
    width = max(len(x) + len(y) for x, y in pairs)
    longest = max(len(y) for y in responses)
    input_ids = torch.tensor([[pad_token_id] * (width - len(x) - len(y)) + x + y for x, y in pairs], device=device)
    real = [[0] * (width - len(x) - len(y)) + [1] * (len(x) + len(y)) for x, y in pairs]
    attention_mask = torch.tensor(real, device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # real tokens only: padded, a row sees what it would
    response_mask = torch.tensor([[False] * (longest - len(y)) + [True] * len(y) for y in responses], device=device)
    return input_ids, attention_mask, position_ids, input_ids[:, width - longest :], response_mask


def use_pure_sampling(model, max_new_tokens, eos_token_ids, pad_token_id):
    """Make generate() sample from π_θ itself, not with the model's generation_config (top_k=50, say); returns that."""
    original = model.generation_config
    ends = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_ids, pad_token_id=pad_token_id)
    model.generation_config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, **ends)
    return original


@torch.no_grad()
def sample_responses(model, prompts, sampling_config, device, synced_gpus=None):
    """One generate() call: a response per prompt, its token ids up to the first EOS; synced_gpus=None: generate()'s."""
    input_ids, attention_mask, *_ = make_batch(prompts, [[] for _ in prompts], sampling_config.pad_token_id, device)
    options = dict(attention_mask=attention_mask, generation_config=sampling_config, synced_gpus=synced_gpus)
    completion_ids = model.generate(input_ids, **options)[:, input_ids.shape[1] :]
    mask = completion_mask(completion_ids, sampling_config.eos_token_id)
    return [ids[m].tolist() for ids, m in zip(completion_ids, mask, strict=True)]


def rollout_batches(rows, kv_cache_tokens):
    """Each rank's generate() calls as index lists into its rows (prompt + most new tokens), longest first: one too big
    fails at once. Call i of every rank takes the rows that fit kv_cache_tokens beside all ranks' i-th longest (≥ 1)."""
    orders = [sorted(range(len(sizes)), key=sizes.__getitem__, reverse=True) for sizes in rows]  # ties: drawn order
    cuts = [0]  # the same for every rank's order
    while cuts[-1] < len(orders[0]):
        longest = max(sizes[order[cuts[-1]]] for sizes, order in zip(rows, orders, strict=True))
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


LOGIT_CHUNK = 2**25  # float32 logits (128 MiB) a chunk: whole (B, T, V) ones of π_w, π_l, π_θ would fill memory


def response_hidden(model, prompts, responses, pad_token_id, device):
    """(B, T, H) last hidden states predicting each response token, the head, the (B, T) ids and mask. The prompts'
    shared start runs once, as every row's KV cache (not under ZeRO-3, whose ranks must run as many forwards, nor with
    checkpointing, which drops caches). One position's logits check they are head(hidden) (not soft-capped)."""
    module = getattr(model, "module", model)  # the HF model inside a DeepSpeed engine
    head = module.get_output_embeddings()
    zero3 = hasattr(model, "zero_optimization") and model.zero_optimization()
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in module.modules())  # in any version
    shared = os.path.commonprefix(prompts)[: min(map(len, prompts)) - 1]  # every row keeps a token of its own
    n = 0 if zero3 or checkpointing else len(shared)
    tokens, attention_mask, positions, ids, mask = make_batch([x[n:] for x in prompts], responses, pad_token_id, device)
    cache = None
    if n:  # the rows go on from the shared start's cache: their masks cover it, their positions follow it
        cache = module.get_decoder()(torch.tensor([prompts[0][:n]], device=device), use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(prompts))
        attention_mask = torch.nn.functional.pad(attention_mask, (n, 0), value=1)
        positions = positions + n
    seen = {}  # what the hooks see of the one forward below
    hook_hidden = module.get_decoder().register_forward_hook(lambda m, args, out: seen.update(hidden=out[0]))
    hook_head = head.register_forward_hook(lambda m, args, out: seen.update(head_in=args[0], head_out=out))
    with hook_hidden, hook_head:
        inputs = dict(input_ids=tokens, attention_mask=attention_mask, position_ids=positions, past_key_values=cache)
        logits = model(**inputs, logits_to_keep=1, use_cache=False).logits
    hidden = seen["hidden"]
    if not (torch.equal(seen["head_in"], hidden[:, -1:]) and torch.equal(seen["head_out"].float(), logits.float())):
        why = "its logits are not its output embeddings applied to its last hidden state"
        raise ValueError(f"{type(module).__name__}: {why}; iqstar's chunked log-probs cannot score it")
    return hidden[:, -ids.shape[1] - 1 : -1], head, ids, mask


def chunked(distribution, heads, hiddens, token_ids, chunk_elements=None):
    """distribution(*[head(hidden) per model])[token_ids], (B, T) float32, a chunk of positions at a time. With
    gradients and several chunks, each is recomputed in backward (checkpoint), so backward too holds one (B, c, V)."""
    step = max(1, (chunk_elements or LOGIT_CHUNK) // (token_ids.shape[0] * heads[0].out_features))

    def chunk(s):
        logits = [head(hidden[:, s : s + step]) for head, hidden in zip(heads, hiddens, strict=True)]
        return distribution(*logits).gather(-1, token_ids[:, s : s + step, None]).squeeze(-1)

    recompute = torch.is_grad_enabled() and any(h.requires_grad for h in hiddens) and step < token_ids.shape[1]
    starts = range(0, token_ids.shape[1], step)
    out = [torch.utils.checkpoint.checkpoint(chunk, s, use_reentrant=False) if recompute else chunk(s) for s in starts]
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
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # on CPU it says its op is built
        deepspeed.init_distributed()
    deepspeed.utils.logger.setLevel("WARNING")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's old names
    device = torch.device(deepspeed.get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))
    deepspeed.get_accelerator().set_device(device.index or 0)  # on CPU, nothing
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def fill_ds_config(config, args, bf16):
    """ds_config.json's "auto" values from the flags and world size (DeepSpeed derives train_batch_size)."""
    many = int(os.environ.get("WORLD_SIZE", 1)) > 1  # ZeRO-3 on one rank shards nothing, and its hooks cost time
    values = {"train_micro_batch_size_per_gpu": args.batch_size, "lr": args.lr, "enabled": bf16}
    values.update(stage=3 if many else 0, memory_efficient_linear=many)  # ZeRO-3's linear re-gathers for backward

    def fill(node):  # json's object_hook: called for every object, the innermost first
        return {k: values[k] if v == "auto" and k in values else v for k, v in node.items()}

    config = json.loads(json.dumps(config), object_hook=fill)
    if '"auto"' in json.dumps(config):
        fail(f'--ds-config: iqstar.py fills "auto" only in {", ".join(values)}; give the others a value')
    return config


def load_model(name, dtype):
    """An HF causal LM without dropout: log π_θ must be the distribution that sampled y."""
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def load_frozen(name, dtype, train_config):
    """π_l or π_w as a DeepSpeed inference engine, as TRL's prepare_deepspeed: sharded like the policy, no optimizer."""
    import deepspeed

    config = {k: v for k, v in train_config.items() if k not in ("optimizer", "scheduler")}
    config["zero_optimization"] = {k: v for k, v in config["zero_optimization"].items() if k != "offload_optimizer"}
    engine, *_ = deepspeed.initialize(model=load_model(name, dtype), config=config)
    engine.eval()
    return engine


def save_policy(run, tokenizer, output_dir):
    """π_θ (gathered from ZeRO-3) as an HF model + tokenizer; LoRA: merged, and in adapter/; files appear when done."""
    # A collective under ZeRO-3 (without: None, the module's own); no public form: accelerate's get_state_dict calls it
    zero3 = run.engine.zero_optimization()  # frozen weights (LoRA's μ) left out: the HF model below is merged anew
    state_dict = run.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True) if zero3 else None
    if run.rank == 0:  # DeepSpeed's save_16bit_model writes no HF model
        staging = os.path.join(output_dir, ".saving")
        shutil.rmtree(staging, ignore_errors=True)
        policy = run.engine.module
        if run.args.lora_r:  # the adapter as PEFT writes it; then, for transformers, μ with it merged in by PEFT
            import peft

            policy.save_pretrained(os.path.join(staging, "adapter"), state_dict=state_dict)
            unset_hf_deepspeed_config()  # μ loaded whole, on this rank only: not sharded over all ranks (ZeRO-3)
            merged = peft.AutoPeftModelForCausalLM.from_pretrained(os.path.join(staging, "adapter"), dtype=policy.dtype)
            set_hf_deepspeed_config(run.hf_ds_config)
            policy = merged.merge_and_unload()
        policy.save_pretrained(staging, state_dict=None if run.args.lora_r else state_dict)
        run.hub_config.save_pretrained(staging)  # the model's own, not the pure sampling one iqstar set
        tokenizer.save_pretrained(staging)
        shutil.rmtree(os.path.join(output_dir, "adapter"), ignore_errors=True)  # an older run's: os.replace keeps none
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        os.rmdir(staging)
        print(f"saved the aligned policy to {output_dir}")
    torch.distributed.barrier()


def save_checkpoint(engine, directory, epoch, is_main):
    """Policy, optimizer and RNGs after `epoch`, to directory/epoch-N; latest.json names it once all ranks are done."""
    tag = f"epoch-{epoch}"
    latest = os.path.join(directory, "latest.json")
    rngs = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rngs, torch.get_rng_state())  # DeepSpeed's checkpoint does not hold them
    state = dict(client_state={"rngs": rngs}, save_latest=False, exclude_frozen_parameters=True)  # LoRA: the adapter
    engine.save_checkpoint(directory, tag=tag, **state)  # ends in a barrier
    if is_main:
        with open(latest + ".tmp", "w") as f:
            json.dump({"tag": tag, "epoch": epoch, "world_size": len(rngs)}, f)
        os.replace(latest + ".tmp", latest)
        for name in os.listdir(directory):  # keep one (a 7B one is ~100 GB), deleted only now: a killed save keeps it
            if name != tag and os.path.isdir(os.path.join(directory, name)):
                shutil.rmtree(os.path.join(directory, name))
    torch.distributed.barrier()
    return os.path.join(directory, tag)


class Stopped(BaseException):
    """SIGINT/SIGTERM as an exception, so that torch's `finally` frees a DeepSpeed op build's lock (killed: never)."""

    @staticmethod
    def handler(signum, frame):  # for signal.signal
        raise Stopped(signum)


def exit_if_stopped(error, epoch, checkpoint):
    """A signal to this rank (Stopped) or another (a collective broke: RuntimeError) ends it: one line, no teardown."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # whatever the launcher sends on
        signal.signal(signum, signal.SIG_IGN)
    signum = error.args[0] if isinstance(error, Stopped) else None
    if torch.distributed.is_initialized():  # the ranks' shared store says why; torch has no public accessor of it
        store = torch.distributed.distributed_c10d._get_default_store()
        if signum is not None:
            with contextlib.suppress(Exception):
                store.set("stopped", str(signum))
        elif store.check(["stopped"]):
            signum = int(store.get("stopped"))
    if signum is None:
        return  # not a stop: the caller raises it
    where = f"in epoch {epoch}" if epoch else "while starting"
    resume = f"resume from {checkpoint}: run the same command with --resume" if checkpoint else "nothing was saved"
    fail(f"stopped by {signal.Signals(signum).name} {where}; {resume}", 128 + signum, os._exit)


def check_args(args):
    """Everything that can be wrong with the flags, found before anything long starts or is written."""
    positive = "epochs samples_per_epoch max_new_tokens kv_cache_tokens batch_size max_skipped_steps max_prompt_tokens"
    rules = {"> 0": ["alpha", "lr", "lora_alpha"], ">= 0": ["save_every", "snapshot_every", "lora_r"]}
    rules["a positive integer"] = positive.split()
    for rule, flags in rules.items():
        for flag in flags:
            value = getattr(args, flag)
            if value is not None and not (value >= 0 if rule == ">= 0" else value > 0):  # not: NaN fails too
                fail(f"--{flag.replace('_', '-')} must be {rule} (got {value})")
    for flag, package in (("--report-to", args.report_to), ("--lora-r", "peft" if args.lora_r else "none")):
        if package != "none" and importlib.util.find_spec(package) is None:  # an extra, imported only when asked for
            fail(f"{flag}: {package} is not installed (pip install {package})")
    try:
        args.principle = read_principle(args.principle, args.principle_file)
    except ValueError as e:
        fail(e)
    try:
        with open(args.ds_config) as f:
            args.ds = json.load(f)
    except OSError:
        fail(f"--ds-config {args.ds_config}: no such file")
    except ValueError as e:
        fail(f"--ds-config {args.ds_config}: not valid JSON ({e})")
    if args.ds.get("zero_optimization", {}).get("stage") not in (3, "auto"):  # auto: 0 on one rank, else 3
        fail(f'--ds-config {args.ds_config}: iqstar.py expects ZeRO stage 3 or "auto"')
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        fail(f"--output-dir {args.output_dir}: exists and is not a directory")
    latest = os.path.join(args.output_dir, "checkpoints", "latest.json")
    if args.resume and args.overwrite:
        fail("give --resume (go on with the run) or --overwrite (replace it), not both")
    if args.resume and not os.path.isfile(latest):
        fail(f"--resume: {os.path.dirname(latest)} holds no complete checkpoint")
    if args.resume:  # ZeRO-3 shards the optimizer by rank: a checkpoint loads into as many ranks only
        with open(latest) as f:
            saved = json.load(f)["world_size"]
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        written = f"the checkpoint in {os.path.dirname(latest)} was written by {saved} rank(s)"
        if saved != world_size:
            fail(f"--resume: {written} and this run has {world_size}; resume with {saved}")
    names = ("config.json", "model.safetensors", "pytorch_model.bin", "metrics.jsonl", "checkpoints")
    held = [name for name in names if os.path.exists(os.path.join(args.output_dir, name))]
    if held and not args.overwrite and not args.resume:
        what = f"--output-dir {args.output_dir} already holds a run ({', '.join(held)})"
        fail(f"{what}; pass --resume to go on with it or --overwrite to replace it")


def eos_token_ids(tokenizer, config):
    """Every token that ends a response: the tokenizer's EOS and the model's (chat models may have several)."""
    eos = getattr(config, "eos_token_id", None)
    return sorted({tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})


def check_model(flag, name):
    """The model's config, or a one-line error; also catches a path that does not exist before a hub lookup."""
    if name.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(name)):
        fail(f"{flag} {name}: no such directory")
    try:
        return AutoConfig.from_pretrained(name)
    except Exception as e:
        fail(f"{flag} {name}: not a model directory and not loadable from the hub ({str(e).splitlines()[0]})")


def check_models(args):
    """--model's config and tokenizer, its pad token and EOS tokens; the frozen models must share its vocabulary."""
    config = check_model("--model", args.model)
    for flag, name in (("--reference-model", args.reference_model), ("--aligned-model", args.aligned_model)):
        other = None if name is None else check_model(flag, name)  # π̂ mixes the models' distributions token by token
        if other is not None and other.vocab_size != config.vocab_size:
            fail(f"{flag} has a vocabulary of {other.vocab_size} tokens, --model of {config.vocab_size}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_token_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    eos = eos_token_ids(tokenizer, config)
    if not eos:
        fail(f"--model {args.model}: the tokenizer has no EOS token to end responses")
    return config, tokenizer, pad_token_id, eos


def read_prompts(args, tokenizer, config):
    """--dataset's usable conversations as (plain, principled) token ids; one line says what was skipped, and why."""
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    max_prompt = args.max_prompt_tokens or (context - args.max_new_tokens if context else None)  # None: no limit
    if max_prompt is not None and max_prompt < 1:
        fail(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in {context} positions")
    conversations, skipped = load_conversations(args.dataset)
    # Each prompt twice: plain (π_θ, π_l; π_w too when it is an aligned model) and with the principle (π_w).
    prompts, more = build_prompts(conversations, tokenizer, None if args.aligned_model else args.principle, max_prompt)
    skipped += more
    if not prompts and skipped:
        fail(skip_report(args.dataset, skipped, len(skipped)) + "; nothing left to train on")
    if not prompts:
        fail(f"--dataset {args.dataset}: holds no prompts")
    if skipped and os.environ.get("RANK", "0") == "0":
        print(skip_report(args.dataset, skipped, len(prompts) + len(skipped)))
    return prompts


# === Algorithm 1: the loop. Each step below is a function; main() runs them in the algorithm's order ==============
# `engine`: π_θ under DeepSpeed (`.module`, the HF model); `aligned`: π_w; `reference`: π_l; `hf_ds_config`: kept alive
Run = collections.namedtuple(
    "Run", "args engine aligned reference hub_config hf_ds_config pad_token_id eos rank world_size device per_rank bar"
)


def initialize(args, n_prompts, pad_token_id, eos):
    """Algorithm 1, line 3: π_θ ← μ under DeepSpeed, beside the frozen model(s) of π_w and π_l, on every rank."""
    import deepspeed

    rank, world_size, device = init_distributed()
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # glibc; a caller's stands
        ctypes.CDLL(None).mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: each token's logits, KV cache on reused heap
        ctypes.CDLL(None).mallopt(-1, 64 * 2**20)  # M_TRIM_THRESHOLD: not fresh pages (page faults: slow on a VM)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if bf16 else torch.float32
    ds_config = fill_ds_config(args.ds, args, bf16=bf16)
    per_rank = math.ceil(args.samples_per_epoch / world_size)  # rounded up: every rank runs as many steps
    if rank == 0:
        print(f"{n_prompts} prompts, {per_rank * world_size} samples an epoch, {world_size} rank(s), {dtype}")
    torch.manual_seed(args.seed)  # the same seed on every rank for loading; offset by rank for sampling below
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # before loading: under ZeRO-3, each rank loads its shard only
    policy = load_model(args.model, dtype)
    if args.gradient_checkpointing:
        enable_checkpointing = getattr(policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable)
        enable_checkpointing()  # the newer name, else the older one
    hub_config = use_pure_sampling(policy, args.max_new_tokens, eos, pad_token_id)
    if args.lora_r:  # π_θ = μ + (α/r)·BA with B = 0 at first: μ's weights stay frozen
        import peft

        targets = "all-linear" if args.lora_target_modules == ["all-linear"] else args.lora_target_modules
        lora = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=targets)
        policy = peft.get_peft_model(policy, lora, autocast_adapter_dtype=False)  # fp32 beside bf16 breaks ZeRO-3
    trainable = [p for p in policy.parameters() if p.requires_grad]  # the optimizer holds states for these only
    engine, *_ = deepspeed.initialize(model=policy, model_parameters=trainable, config=ds_config)
    shared = args.lora_r and not (args.reference_model or args.aligned_model)  # π_w, π_l: μ, the policy's adapter off
    reference = engine if shared else load_frozen(args.reference_model or args.model, dtype, ds_config)  # π_l and π_w
    aligned = load_frozen(args.aligned_model, dtype, ds_config) if args.aligned_model else reference  # π_w
    torch.manual_seed(args.seed + 1 + rank)  # CRUCIAL: each rank must sample different responses
    # On a terminal a bar vanishes when done; in a log it ends its line, so that the epoch's line has its own.
    bar = functools.partial(tqdm, disable=rank != 0, leave=not sys.stderr.isatty(), dynamic_ncols=True)
    models = (engine, aligned, reference, hub_config, hf_ds_config)
    return Run(args, *models, pad_token_id, eos, rank, world_size, device, per_rank, bar)


def open_output_dir(run, checkpoints, metrics_path):
    """--resume: load the latest checkpoint, keep the metrics up to it; else clear an old run. Its folder, epoch."""
    args = run.args
    checkpoint, done = None, 0
    if args.resume:  # the policy, the optimizer and this rank's RNG; the lr is this command's
        with open(os.path.join(checkpoints, "latest.json")) as f:
            latest = json.load(f)
        _, client_state = run.engine.load_checkpoint(checkpoints, tag=latest["tag"], load_module_strict=not args.lora_r)
        torch.set_rng_state(client_state["rngs"][run.rank])
        for group in run.engine.optimizer.param_groups:
            group["lr"] = args.lr
        checkpoint, done = os.path.join(checkpoints, latest["tag"]), latest["epoch"]
    if run.rank != 0:
        return checkpoint, done
    if args.resume:
        print(f"resumed from {checkpoint} after epoch {done}", flush=True)
    else:  # never resume into another run's state, nor add to its curves
        for directory in (checkpoints, os.path.join(args.output_dir, "runs")):
            shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(checkpoints, exist_ok=True)
    old = []
    if args.resume and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            old = f.readlines()
    with open(metrics_path, "w") as f:
        f.writelines(line for line in old if json.loads(line)["epoch"] <= done)
    return checkpoint, done


def sample_epoch(run, prompts, drawn, epoch):
    """Algorithm 1, line 5: y ~ π_θ(·|x) on this rank; micro-batches of (plain, principled, y), the longest first."""
    import deepspeed

    mine = [prompts[i] for i in drawn[run.rank :: run.world_size]]
    new = run.args.max_new_tokens  # each rank's rows, for rollout_batches: prompt + most new tokens
    rows = [[len(prompts[i][0]) + new for i in drawn[r :: run.world_size]] for r in range(run.world_size)]
    run.engine.eval()
    # Gathered (TRL's ds3_gather_for_generation): the whole policy on each rank; else every token gathers it
    gather = run.args.gather_for_generation == "on" and run.engine.zero_optimization()
    synced_gpus = False if gather else None  # None: generate()'s own choice, which keeps sharded ranks in step
    policy = run.engine.module  # the HF model: generate() is its own
    sampled = []  # (plain prompt, principled prompt, response)
    with deepspeed.runtime.zero.unwrap_model_for_generation(run.engine) if gather else contextlib.nullcontext():
        for call in run.bar(rollout_batches(rows, run.args.kv_cache_tokens)[run.rank], desc=f"epoch {epoch} sample"):
            plain = [mine[i][0] for i in call]
            responses = sample_responses(policy, plain, policy.generation_config, run.device, synced_gpus)
            sampled += [(*mine[i], y) for i, y in zip(call, responses, strict=True)]
    # micro-batches of similar lengths pad less; the longest first, so that a lack of memory shows at once
    sampled.sort(key=lambda row: -len(row[0]) - len(row[2]))
    batches = []
    for start in range(0, len(sampled), run.args.batch_size):
        plain, principled, responses = zip(*sampled[start : start + run.args.batch_size], strict=True)
        batches.append((list(plain), list(principled), list(responses)))
    return batches


def score_epoch(run, batches, epoch):
    """Algorithm 1, line 6, its target: log π̂(y_t) of each micro-batch by the frozen model(s), §4.2."""
    alpha = run.args.alpha
    with run.engine.module.disable_adapter() if run.reference is run.engine else contextlib.nullcontext():
        return [
            superior_targets(run.aligned, run.reference, principled, plain, ys, alpha, run.pad_token_id, run.device)
            for plain, principled, ys in run.bar(batches, desc=f"epoch {epoch} score")
        ]


def train_epoch(run, batches, targets, epoch, skipped_in_a_row, checkpoint):
    """Algorithm 1, lines 6-7, a step a micro-batch. Returns the epoch's sums and the non-finite steps in a row."""
    run.engine.train()
    tally = collections.Counter()
    with run.bar(batches, desc=f"epoch {epoch} train") as bar:
        for (plain, _, ys), target_logps in zip(bar, targets, strict=True):
            # line 6: L = Σ_t (log π̂(y_t) − log π_θ(y_t))²
            policy_logps, mask = policy_logprobs(run.engine, plain, ys, run.pad_token_id, run.device)
            run.engine.backward(iqstar_loss(policy_logps, target_logps, mask))
            # line 7: θ ← θ − γ∇L. ZeRO-3 skips a non-finite step on all ranks; without ZeRO, fp32 Adam would take it
            grads = (p.grad for p in run.engine.module.parameters() if p.grad is not None)  # ZeRO-3: none here
            finite = torch.nn.utils.get_total_norm(grads).isfinite().item()  # a generator: no gradient kept after it
            if finite:
                run.engine.step()
            else:
                run.engine.zero_grad()  # a skipped step: its gradients dropped
            if finite and run.engine.was_step_applied():  # a skipped step's numbers may be NaN
                skipped_in_a_row = 0
                credit = (target_logps - policy_logps.detach()) * mask
                tally.update(squared=(credit**2).sum().item(), credit=credit.sum().item())
                tally.update(target=(target_logps * mask).sum().item(), trained=mask.sum().item())
            else:
                skipped_in_a_row += 1
                tally.update(skipped=1)
            tally.update(tokens=mask.sum().item(), responses=len(ys), ended=sum(y[-1] in run.eos for y in ys))
            if skipped_in_a_row >= run.args.max_skipped_steps:
                bar.close()  # its last line first, then ours
                resume = f"resume from {checkpoint} with --resume" if checkpoint else "nothing was saved"
                why = f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient, and none of them changed"
                fail(f"stopped: {why} the policy (epoch {epoch}). Lower --lr or check the data; {resume}", 3)
    return tally, skipped_in_a_row


def log_epoch(run, epoch, tally, seconds, metrics_path, log):
    """One line per epoch on rank 0, one in metrics.jsonl and the tracker: sums over all ranks (skipped: this one's)."""
    tallies = [None] * run.world_size
    torch.distributed.all_gather_object(tallies, tally)
    t = collections.Counter({k: sum(x[k] for x in tallies) for k in set().union(*tallies)})
    trained = max(t["trained"], 1)
    record = {"epoch": epoch, "loss": t["squared"] / trained, "credit": t["credit"] / trained}
    record.update(target_logp=t["target"] / trained, response_tokens=int(t["tokens"]))
    record.update(mean_response_length=t["tokens"] / t["responses"], eos_rate=t["ended"] / t["responses"])
    record.update(skipped_steps=tally["skipped"], **{f"{k}_seconds": round(v, 2) for k, v in seconds.items()})
    if run.rank == 0:
        numbers = "  ".join(f"{k} {v:.4g}" for k, v in list(record.items())[1:])
        print(f"epoch {epoch}/{run.args.epochs}  {numbers}", flush=True)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if log is not None:
            log(record)


def main(argv=None):
    """Algorithm 1: π_θ ← μ; then each epoch samples, scores, trains, logs and checkpoints; the aligned policy last."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # the deepspeed launcher sends Ctrl-C on as SIGTERM
        signal.signal(signum, Stopped.handler)
    args = parse_args(argv)
    check_args(args)
    config, tokenizer, pad_token_id, eos = check_models(args)
    prompts = read_prompts(args, tokenizer, config)
    tracking = importlib.import_module("tracking") if args.report_to != "none" else None  # beside this file
    epoch, checkpoint = 0, None  # the epoch under way, the checkpoint a stopped run resumes from
    try:
        run = initialize(args, len(prompts), pad_token_id, eos)  # line 3
        checkpoints = os.path.join(args.output_dir, "checkpoints")
        metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        checkpoint, done = open_output_dir(run, checkpoints, metrics_path)
        log = tracking.open_tracker(args) if tracking and run.rank == 0 else None  # TensorBoard or W&B
        skipped_in_a_row = 0
        for epoch in range(done + 1, args.epochs + 1):  # line 4
            # line 5: x ~ D, the same draw on every rank, split between them; y ~ π_θ(·|x)
            drawn = draw_prompts(len(prompts), run.per_rank * run.world_size, epoch, args.seed)
            started = time.perf_counter()
            batches = sample_epoch(run, prompts, drawn, epoch)
            sampled_at = time.perf_counter()
            targets = score_epoch(run, batches, epoch)  # line 6: log π̂(y_t)
            scored_at = time.perf_counter()
            # lines 6-7: L = Σ_t (log π̂(y_t) − log π_θ(y_t))², θ ← θ − γ∇L
            tally, skipped_in_a_row = train_epoch(run, batches, targets, epoch, skipped_in_a_row, checkpoint)
            seconds = {"sample": sampled_at - started, "score": scored_at - sampled_at}
            seconds["train"] = time.perf_counter() - scored_at
            log_epoch(run, epoch, tally, seconds, metrics_path, log)
            # a run stopped from here on resumes from the end of this epoch
            if epoch == args.epochs or (args.save_every and epoch % args.save_every == 0):
                checkpoint = save_checkpoint(run.engine, checkpoints, epoch, run.rank == 0)
            if args.snapshot_every and epoch % args.snapshot_every == 0 and epoch < args.epochs:
                save_policy(run, tokenizer, os.path.join(args.output_dir, f"epoch-{epoch}"))
        save_policy(run, tokenizer, args.output_dir)
    except (Stopped, RuntimeError) as e:  # a RuntimeError too: a collective breaks when another rank has stopped
        exit_if_stopped(e, epoch, checkpoint)
        raise
    finally:
        if torch.distributed.is_initialized():  # else a rank may crash at exit, its comm threads still running
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # End after atexit's handlers (wandb's), flushed, before the teardown, where freeing DeepSpeed's groups can abort
    atexit._run_exitfuncs()  # no public function runs them before os._exit, which skips them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
