"""Inverse-Q*: token-level RL that aligns an LLM with no preference data, reward or value model.
A frozen copy of the SFT model scores each sampled token with a principle in its system prompt
(log π_w) and without it (log π_l); the policy is pulled towards π̂ = softmax(α log π_w + (1−α) log π_l).
Paper: Xia et al. 2024, arXiv 2408.14874 (Algorithm 1, §4.2). Every flag: python iqstar.py --help.

On a laptop CPU, a tiny model this project builds itself (demo/demo.py; other α: ALPHA=1.2 make demo):
    make demo
One process, GPU (bf16) or CPU (fp32):
    python iqstar.py --model path/or/hub-id --output-dir out
One node, 8 GPUs, the paper's Vicuna-7B run (defaults = the paper's settings):
    deepspeed iqstar.py --model lmsys/vicuna-7b-v1.5 --output-dir out/vicuna-7b-iqstar
Several nodes (one line per node in the hostfile, "host slots=8"):
    deepspeed --hostfile hostfile iqstar.py --model lmsys/vicuna-7b-v1.5
π_w as a separate aligned model instead of a principle (paper §5.3):
    deepspeed iqstar.py --model HuggingFaceH4/mistral-7b-sft-beta --aligned-model HuggingFaceH4/zephyr-7b-beta
"""
import argparse
import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
import warnings

import torch
import torch.nn.functional as F

DEFAULT_PRINCIPLE = (  # our wording of the five points in the paper's Appendix C
    "Follow these principles. Be factually accurate; if you are unsure, say so. "
    "If a request could cause harm or raises safety concerns, do not fulfil it: explain why "
    "and point the user to a safe alternative. If the conversation so far has not solved the "
    "user's problem, keep working on it. Stay on the topic of the conversation. "
    "Add background information that helps the user understand the answer."
)
# Vicuna v1.5's system line; used when the tokenizer has no chat template (Vicuna's has none).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Demo on CPU with a tiny built-in model: `make demo`; another α: "
                                       "`ALPHA=1.2 make demo` or `python demo/demo.py --alpha 1.2`.")
    g = p.add_argument_group("models and data")
    g.add_argument("--model", required=True, help="SFT model to align (hub id or local path): the initial policy μ")
    g.add_argument("--reference-model", help="frozen model scoring π_l (and π_w); default: --model")
    g.add_argument("--aligned-model", help="frozen aligned model used as π_w on the plain prompt instead of "
                   "the principle (paper §5.3)")
    g.add_argument("--dataset", default="Anthropic/hh-rlhf", help="hub dataset (train split) or a local .jsonl "
                   "with 'prompt', 'messages' or 'chosen'/'rejected' on each line: the contexts D = {x}")
    g.add_argument("--strict", action="store_true", help="stop at the first unusable line of --dataset instead "
                   "of skipping it (skips are reported at the start either way)")
    g.add_argument("--principle", help="principle given to π_w as a system message; default: the paper's Appendix C")
    g.add_argument("--principle-file", help="read the principle from this file")
    g = p.add_argument_group("Inverse-Q*")
    g.add_argument("--alpha", type=float, default=1.4, help="α in π̂ = softmax(α log π_w + (1−α) log π_l); "
                   "α > 1 extrapolates past π_w (paper §5.4)")
    g.add_argument("--lr", type=float, default=1e-6, help="learning rate γ (Algorithm 1, line 7)")
    g.add_argument("--epochs", type=int, default=15, help="iterations M of Algorithm 1")
    g.add_argument("--samples-per-epoch", type=int, default=500, help="prompts m sampled per epoch, over all ranks")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="longest sampled response")
    g.add_argument("--max-prompt-tokens", type=int, help="skip longer prompts; default: the model's context "
                   "length minus --max-new-tokens")
    g.add_argument("--top-k", type=int, default=0, help="sampling top-k (0: off, sample from π_θ itself)")
    g.add_argument("--top-p", type=float, default=1.0, help="sampling top-p (1: off)")
    g = p.add_argument_group("sizes and runtime")
    g.add_argument("--rollout-batch-size", type=int, default=64, help="prompts per generate call, per rank")
    g.add_argument("--batch-size", type=int, default=2, help="training (and scoring) micro-batch, per rank")
    g.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    g.add_argument("--gather-for-generation", choices=("auto", "on", "off"), default="auto",
                   help="gather the ZeRO-3 policy once per epoch's sampling instead of layer by layer for every "
                        "token; auto: only when the whole policy fits in half the free memory")
    g.add_argument("--ds-config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_config.json"),
                   help="DeepSpeed config; its \"auto\" values are filled from these flags")
    g.add_argument("--output-dir", default="out", help="final policy (HF format) and metrics.jsonl")
    g.add_argument("--overwrite", action="store_true", help="replace a run (model, metrics, checkpoints) "
                   "already in --output-dir")
    g.add_argument("--save-every", type=int, default=1, help="save a resumable checkpoint (policy, optimizer, "
                   "data order, RNG) to --output-dir/checkpoints every N epochs; 0: only after the last epoch and "
                   "when interrupted. One is kept")
    g.add_argument("--resume", action="store_true", help="go on from the checkpoint in --output-dir/checkpoints")
    g.add_argument("--max-skipped-steps", type=int, default=10, help="stop after this many steps in a row were "
                   "skipped for a non-finite loss or gradient")
    g.add_argument("--snapshot-every", type=int, default=0, help="also save the policy (HF format) to "
                   "--output-dir/epoch-N every N epochs, to score per-epoch checkpoints as the paper's Fig. 6 does")
    g.add_argument("--seed", type=int, default=0, help="data order and initial sampling; rank r samples with seed+1+r")
    g.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def fail(message):
    """A one-line error and exit status 2, printed once even when every rank fails alike."""
    if os.environ.get("RANK", "0") == "0":
        print(f"iqstar.py: error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------
# 0. Data: the context dataset D = {x} (Algorithm 1, input). Prompts only; no responses are used.
# ---------------------------------------------------------------------------------------------
def hh_to_messages(text):
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c' -> [{'role': 'user', 'content': 'a'}, ...]."""
    parts = re.split(r"\n\n(Human|Assistant): ?", "\n\n" + text.lstrip("\n"))
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def row_to_messages(row):
    """One dataset row -> the conversation to prompt with, ending on a user turn; ValueError says why not."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    if "prompt" in row and row["prompt"] is not None:
        if not isinstance(row["prompt"], str):
            raise ValueError("'prompt' is not a string")
        messages = [{"role": "user", "content": row["prompt"]}]
    elif "messages" in row and row["messages"] is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages):
            raise ValueError("'messages' is not a list of {role: system|user|assistant, content: string}")
        if any(m["role"] == "system" for m in messages[1:]):  # templates would render it as another role
            raise ValueError("a system message after the first turn")
    elif isinstance(row.get("chosen"), str) or isinstance(row.get("rejected"), str):
        # HH: keep the turns shared by chosen and rejected; their differing final replies are dropped (§5.1).
        convs = [hh_to_messages(row[k]) for k in ("chosen", "rejected") if isinstance(row.get(k), str)]
        messages = []
        for turns in zip(*convs):
            if any(t != turns[0] for t in turns):
                break
            messages.append(turns[0])
    else:
        raise ValueError("has none of 'prompt', 'messages', 'chosen'/'rejected'")
    while messages and messages[-1]["role"] == "assistant":  # the policy writes its own reply
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ValueError("no user turn to answer")
    for m in messages:
        m["content"].encode("utf-8")  # a lone surrogate ("\ud800") is valid JSON but no text: UnicodeError
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_conversations(dataset):
    """(conversations, skipped) of --dataset, a local .jsonl or the train split of a hub (or local) dataset.

    Each conversation comes with where it was ("line 7", "row 6"); each skipped one with where and why.
    """
    conversations, skipped = [], []

    def add(where, read_row):
        try:
            conversations.append((where, row_to_messages(read_row())))
        except UnicodeError:  # before ValueError: it is one
            skipped.append((where, "not UTF-8 text"))
        except RecursionError:
            skipped.append((where, "JSON nested too deeply"))
        except json.JSONDecodeError:
            skipped.append((where, "not valid JSON"))
        except ValueError as e:
            skipped.append((where, str(e)))

    if os.path.isfile(dataset) or dataset.endswith((".jsonl", ".json")):
        if not os.path.isfile(dataset):
            fail(f"--dataset {dataset}: no such file")
        with open(dataset, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    add(f"line {number}", lambda: json.loads(line.decode("utf-8")))
    else:
        import datasets
        try:
            rows = datasets.load_dataset(dataset, split="train")
        except Exception as e:
            fail(f"--dataset {dataset}: cannot load it from the hub ({type(e).__name__}: {str(e).splitlines()[0]})")
        for index, row in enumerate(rows):
            add(f"row {index}", lambda: row)
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


def format_prompt(tokenizer, messages, principle=None):
    """Token ids of prompt_text(); a chat template writes any BOS itself, the Vicuna text needs the tokenizer's."""
    text = prompt_text(tokenizer, messages, principle)
    return tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"]


def prompt_text(tokenizer, messages, principle=None):
    """The conversation, ready for the assistant's reply; with `principle` as system message for π_w.

    The tokenizer's chat template when it has one; otherwise Vicuna v1.5's, the principle joining its system line.
    """
    if principle is not None:
        if messages[0]["role"] == "system":  # one system message: the principle first, the dataset's after it
            messages = [{"role": "system", "content": principle + "\n\n" + messages[0]["content"]}] + messages[1:]
        else:
            messages = [{"role": "system", "content": principle}] + messages
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    system = VICUNA_SYSTEM
    if messages[0]["role"] == "system":
        system, messages = system + " " + messages[0]["content"], messages[1:]
    text = system + " "
    for m in messages:
        text += f"USER: {m['content']} " if m["role"] == "user" else f"ASSISTANT: {m['content']}{tokenizer.eos_token}"
    return text + "ASSISTANT:"


def build_prompts(conversations, tokenizer, principle, max_prompt_tokens):
    """(plain, principled) token ids per conversation, and the (where, why) of those that cannot be used as is.

    principle=None (an aligned π_w) uses the plain prompt for both.
    """
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
            continue
        prompts.append((plain, principled))
    return prompts, skipped


def skip_report(dataset, skipped, total):
    """One line: how many were skipped and why, naming the first few places of each reason."""
    reasons = {}
    for where, why in skipped:
        reasons.setdefault(why, []).append(where)
    parts = [f"{len(places)} {why} ({', '.join(places[:3])}{', ...' if len(places) > 3 else ''})"
             for why, places in sorted(reasons.items(), key=lambda r: -len(r[1]))]
    return f"--dataset {dataset}: skipped {len(skipped)} of {total}: " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# 1. Sampling: y ~ π_θ(·|x) (Algorithm 1, line 5)
# ---------------------------------------------------------------------------------------------
def completion_mask(completion_ids, eos_token_ids):
    """(B, T) mask of the response tokens up to and including the first EOS: the EOS is a decision too."""
    is_eos = torch.isin(completion_ids, torch.as_tensor(eos_token_ids, device=completion_ids.device))
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS strictly before position t
    return eos_before == 0


def make_batch(prompts, responses, pad_token_id, device):
    """Left-padded prompts followed by right-padded responses, so every response starts at the same column.

    Returns input_ids, attention_mask, position_ids (B, P+T) and response_ids, response_mask (B, T).
    Position ids count real tokens only, so a padded sample sees exactly what it would see alone.
    """
    P, T = max(len(x) for x in prompts), max(len(y) for y in responses)
    rows = [[pad_token_id] * (P - len(x)) + x + y + [pad_token_id] * (T - len(y)) for x, y in zip(prompts, responses)]
    real = [[0] * (P - len(x)) + [1] * (len(x) + len(y)) + [0] * (T - len(y)) for x, y in zip(prompts, responses)]
    input_ids = torch.tensor(rows, device=device)
    attention_mask = torch.tensor(real, device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids, input_ids[:, P:], attention_mask[:, P:].bool()


def use_pure_sampling(model, max_new_tokens, eos_token_ids, pad_token_id, top_k=0, top_p=1.0):
    """Make generate() sample from π_θ itself; returns the model's own generation config, to save with it.

    generate() fills every knob a call leaves unset from model.generation_config (often top_k=50, sometimes a
    repetition penalty), which would bend y away from the π_θ that the loss assumes sampled it.
    """
    from transformers import GenerationConfig
    original = model.generation_config
    model.generation_config = GenerationConfig(do_sample=True, temperature=1.0, top_k=top_k, top_p=top_p,
                                               max_new_tokens=max_new_tokens, eos_token_id=eos_token_ids,
                                               pad_token_id=pad_token_id)
    return original


@torch.no_grad()
def sample_responses(model, prompts, sampling_config, device, *, synced_gpus=None, stopping_criteria=None):
    """One generate() call: a response per prompt, as lists of token ids cut after the first EOS.

    synced_gpus=None lets generate() decide: under ZeRO-3 with several ranks it keeps the ranks in step until
    all have finished, so ranks whose responses end at different lengths do not hang in a layer's gather.
    With the policy gathered (gathered_for_generation) a forward needs no other rank: pass False.
    """
    input_ids, attention_mask, *_ = make_batch(prompts, [[] for _ in prompts], sampling_config.pad_token_id, device)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=sampling_config,
                            synced_gpus=synced_gpus, stopping_criteria=stopping_criteria)
    completion_ids = output[:, input_ids.shape[1]:]
    mask = completion_mask(completion_ids, sampling_config.eos_token_id)
    return [ids[m].tolist() for ids, m in zip(completion_ids, mask)]


# Scoring: three (B, T, V) float32 tensors (z_w, z_l, z_θ) would dominate activation memory at V = 32k-128k, so
# the models stop at their last hidden state and the head is applied a chunk of positions at a time.
LOGIT_CHUNK = 2 ** 25  # float32 logits per chunk (128 MiB); under ZeRO-3 each chunk gathers the head once more


def response_hidden(model, prompts, responses, pad_token_id, device):
    """(B, T, H) last hidden states predicting each response token, the output head, and the (B, T) ids and mask.

    The model (a DeepSpeed engine too, its hooks and all) runs whole but unembeds its last position only; a forward
    hook takes the base model's output. That position also checks that logits = head(hidden state) for this
    model: one that soft-caps or rescales its logits would get wrong log-probs from the chunks, so it fails here.
    """
    module = getattr(model, "module", model)  # the HF model inside a DeepSpeed engine
    head = module.get_output_embeddings()
    input_ids, attention_mask, position_ids, response_ids, response_mask = make_batch(
        prompts, responses, pad_token_id, device)
    seen = {}
    hooks = [module.base_model.register_forward_hook(lambda m, args, out: seen.update(hidden=out[0])),
             head.register_forward_hook(lambda m, args, out: seen.update(head_in=args[0], head_out=out))]
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=1, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
    hidden = seen["hidden"]
    if not (torch.equal(seen["head_in"], hidden[:, -1:]) and torch.equal(seen["head_out"].float(), logits.float())):
        raise ValueError(f"{type(module).__name__}: its logits are not its output embeddings applied to its last "
                         "hidden state; iqstar's chunked log-probs cannot score it")
    return hidden[:, -response_ids.shape[1] - 1:-1], head, response_ids, response_mask


def chunk_positions(batch, head, chunk_elements):
    """How many positions of a (batch, ·, V) float32 tensor fit in chunk_elements."""
    return max(1, chunk_elements // (batch * head.out_features))


def _chunk_token_logprobs(head, hidden, token_ids):
    logits = head(hidden).float()  # (B, c, V): the only vocabulary-sized tensor alive
    return logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def chunked_token_logprobs(head, hidden, token_ids, chunk_elements=LOGIT_CHUNK):
    """log softmax(head(hidden)) at token_ids, values and gradients, a chunk of positions at a time.

    (B, T, H), (B, T) -> (B, T) float32. With gradients on, each chunk is recomputed in backward
    (torch.utils.checkpoint), so forward and backward alike hold one chunk's (B, c, V) logits at a time.
    """
    step = chunk_positions(hidden.shape[0], head, chunk_elements)
    out = []
    for s in range(0, hidden.shape[1], step):
        args = head, hidden[:, s:s + step], token_ids[:, s:s + step]
        if torch.is_grad_enabled() and hidden.requires_grad:
            out.append(torch.utils.checkpoint.checkpoint(_chunk_token_logprobs, *args, use_reentrant=False))
        else:
            out.append(_chunk_token_logprobs(*args))
    return torch.cat(out, 1) if out else hidden.new_zeros(hidden.shape[:2], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# 2–4. Estimated superior policy: π̂ = softmax(α log π_w + (1−α) log π_l) (paper §4.2)
# ---------------------------------------------------------------------------------------------
def superior_logprobs(logits_w, logits_l, alpha):
    """log π̂ over the whole vocabulary: (B, T, V), (B, T, V) -> (B, T, V), normalised, float32.

    α = 1 gives π_w, α = 0 gives π_l; α > 1 moves past π_w, away from π_l (the paper uses α ≈ 1.4).
    """
    mixed = alpha * logits_w.float().log_softmax(-1) + (1 - alpha) * logits_l.float().log_softmax(-1)
    return mixed.log_softmax(-1)  # renormalise: the geometric mixture does not sum to one


@torch.no_grad()
def chunked_superior_logprobs(head_w, hidden_w, head_l, hidden_l, token_ids, alpha, chunk_elements=LOGIT_CHUNK):
    """log π̂(y_t) from the two models' hidden states, chunk by chunk: (B, T, H) ×2, (B, T) -> (B, T).

    α log π_w + (1−α) log π_l differs from α z_w + (1−α) z_l by one constant per position, which π̂'s
    renormalisation removes: so the mixture is built from raw logits, in one (B, c, V) tensor per chunk.
    """
    step = chunk_positions(hidden_w.shape[0], head_w, chunk_elements)
    out = []
    for s in range(0, hidden_w.shape[1], step):
        mixed = head_w(hidden_w[:, s:s + step]).float().mul_(alpha)
        mixed.add_(head_l(hidden_l[:, s:s + step]).float(), alpha=1 - alpha)
        out.append(mixed.gather(-1, token_ids[:, s:s + step].unsqueeze(-1)).squeeze(-1) - mixed.logsumexp(-1))
    return torch.cat(out, 1) if out else hidden_w.new_zeros(hidden_w.shape[:2], dtype=torch.float32)


@torch.no_grad()
def lean_superior_targets(model_w, model_l, principled, plain, responses, alpha, pad_token_id, device,
                          chunk_elements=LOGIT_CHUNK):
    """log π̂(y_t) at each sampled token: a (T_i,) tensor per response, fixed labels for the loss.

    π_w is `model_w` on the `principled` prompts (for an aligned π_w, the plain ones); π_l is `model_l` on `plain`.
    One forward per model and micro-batch, one (B, c, V) tensor at a time; the same values as the full-vocabulary
    formula (superior_logprobs; tests/reference.py has that straightforward version).
    """
    if model_w is model_l:  # one model, two contexts: one forward over the 2B rows, principled then plain
        hidden, head_w, ids, _ = response_hidden(model_w, principled + plain, responses + responses,
                                                 pad_token_id, device)
        hidden_w, hidden_l, ids, head_l = hidden[:len(responses)], hidden[len(responses):], ids[:len(responses)], head_w
    else:  # an aligned π_w on the plain prompts (§5.3): two models, two forwards
        hidden_w, head_w, ids, _ = response_hidden(model_w, principled, responses, pad_token_id, device)
        hidden_l, head_l, _, _ = response_hidden(model_l, plain, responses, pad_token_id, device)
    target = chunked_superior_logprobs(head_w, hidden_w, head_l, hidden_l, ids, alpha, chunk_elements)
    return [t[:len(y)] for t, y in zip(target, responses)]


# ---------------------------------------------------------------------------------------------
# 5. Loss: L = Σ_t (log π̂(y_t) − log π_θ(y_t))² (Algorithm 1, line 6), a mean over response tokens
# ---------------------------------------------------------------------------------------------
def iqstar_loss(policy_logps, target_logps, mask):
    """Token mean of the squared log-ratio. (B, T), (B, T), (B, T) -> scalar.

    ∂L/∂log π_θ(y_t) = −2·m_t·(log π̂(y_t) − log π_θ(y_t)) / Σm: each token is pushed by its own credit.
    The target is a fixed label (no gradient). An all-masked batch gives 0 rather than 0/0 = NaN.
    """
    mask = mask.to(policy_logps.dtype)
    squared = ((target_logps.detach() - policy_logps) ** 2).masked_fill(mask == 0, 0)  # 0·inf would be NaN
    return squared.sum() / mask.sum().clamp(min=1)


def lean_policy_loss(model, prompts, responses, targets, pad_token_id, device, chunk_elements=LOGIT_CHUNK):
    """L for one micro-batch, with the (B, T) credit log π̂ − log π_θ and its mask for the metrics.

    log π_θ(y_t) is taken a chunk at a time (chunked_token_logprobs); tests/reference.py has the straightforward form.
    """
    hidden, head, ids, mask = response_hidden(model, prompts, responses, pad_token_id, device)
    policy_logps = chunked_token_logprobs(head, hidden, ids, chunk_elements)
    target_logps = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True)
    return iqstar_loss(policy_logps, target_logps, mask), (target_logps - policy_logps.detach()) * mask, mask


# ---------------------------------------------------------------------------------------------
# DeepSpeed plumbing: nothing above this line knows about it
# ---------------------------------------------------------------------------------------------
def init_distributed():
    """rank, world_size, device; `python iqstar.py` without a launcher is a world of one."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port for the one-process group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed()
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))
    if device.type != "cpu":
        get_accelerator().set_device(device.index or 0)
    return rank, world_size, device


def fill_ds_config(config, args, world_size, bf16):
    """The "auto" values of ds_config.json, from the flags: one file serves 1 CPU process and 64 GPUs."""
    values = {"train_micro_batch_size_per_gpu": args.batch_size,
              "train_batch_size": args.batch_size * world_size * config.get("gradient_accumulation_steps", 1),
              "lr": args.lr, "enabled": bf16}

    def fill(node, path):
        for key, value in node.items():
            if isinstance(value, dict):
                fill(value, f"{path}{key}.")
            elif value == "auto":
                if key not in values:
                    fail(f"--ds-config: iqstar.py cannot fill \"{path}{key}\": \"auto\"; give it a value")
                node[key] = values[key]
    fill(config, "")
    return config


def frozen_config(train_config):
    """ZeRO-3 inference for π_w / π_l: partitioned like the policy, no optimizer state, no gradients."""
    config = {k: v for k, v in train_config.items() if k not in ("optimizer", "scheduler")}
    config["zero_optimization"] = {k: v for k, v in train_config["zero_optimization"].items()
                                   if not k.startswith("offload_optimizer")}
    return config


def load_model(name, dtype):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    for module in model.modules():  # log π_θ must be the distribution that sampled y, so no dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


GATHER_SHARE = 0.5  # the gathered policy may take this share of free memory; generate's KV cache needs the rest
_said = set()


def available_memory(device):
    """Free bytes on the device: CUDA's own count, else the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def gather_fits(params, device):
    """Whether every rank can hold the whole policy while it samples; the same answer on every rank (a collective)."""
    need = sum(p.ds_numel * p.element_size() for p in params)
    # CPU ranks share the host's memory; GPU ranks have a device each. LOCAL_SIZE: the deepspeed launcher's.
    sharers = 1 if device.type == "cuda" else int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
    free = available_memory(device)
    fits = torch.tensor([int(sharers * need <= GATHER_SHARE * free)], device=device)
    torch.distributed.all_reduce(fits, op=torch.distributed.ReduceOp.MIN)
    if not fits.item() and "gather" not in _said and torch.distributed.get_rank() == 0:
        _said.add("gather")
        print(f"--gather-for-generation auto: off; the whole policy ({need / 2**30:.2f} GiB"
              + (f" × {sharers} ranks" if sharers > 1 else "") + f") is more than {GATHER_SHARE:.0%} of the "
              f"{free / 2**30:.2f} GiB free on {device.type}; sampling gathers layer by layer", flush=True)
    return bool(fits.item())


@contextlib.contextmanager
def gathered_for_generation(engine, mode="auto", device=torch.device("cpu")):
    """Hold the whole ZeRO-3 policy on every rank while it samples; yields whether it did.

    Without it, each new token re-gathers every layer across ranks (ZeRO-3's per-module hooks), which makes HF
    generate many times slower. Gathered, the hooks are removed (they would fetch and release each layer all the
    same) and put back after, as DeepSpeed's own unwrap_model_for_generation and TRL's do; a forward then needs
    no other rank, so generate() can run without synced_gpus. A collective: every rank must enter it.
    mode: "on", "off", or "auto" (on when the whole policy fits: gather_fits).
    """
    params = [p for p in engine.parameters() if hasattr(p, "ds_id")]  # empty when not ZeRO-3 partitioned
    if not params or mode == "off" or (mode == "auto" and not gather_fits(params, device)):
        yield False
        return
    import deepspeed
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield True
        finally:
            offload._register_deepspeed_module(offload.module)


def save_policy(engine, tokenizer, generation_config, output_dir, is_main):
    """Gather the ZeRO-3 shards (16-bit on GPU) and write an HF model + tokenizer; files appear only when complete."""
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # a collective: every rank calls it
    if is_main:
        staging = os.path.join(output_dir, ".saving")
        shutil.rmtree(staging, ignore_errors=True)
        sampling_config, engine.module.generation_config = engine.module.generation_config, generation_config
        engine.module.save_pretrained(staging, state_dict=state_dict)
        engine.module.generation_config = sampling_config
        tokenizer.save_pretrained(staging)
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        os.rmdir(staging)
    torch.distributed.barrier()


# A checkpoint holds all the loop needs to go on as if never stopped: DeepSpeed's state (policy shards and
# optimizer) plus `loop`, the loop's own state, and each rank's RNG and half-done epoch, if any.
RUN_FLAGS = ("model", "dataset", "principle", "alpha", "lr", "seed", "samples_per_epoch", "batch_size",
             "rollout_batch_size", "max_new_tokens", "top_k", "top_p")


def rng_state():
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, directory, tag, loop, own, is_main):
    """Write directory/tag on every rank; latest.json names it only once all of it is written.

    A run killed while saving leaves latest.json naming the previous checkpoint, which is kept until then.
    """
    latest = os.path.join(directory, "latest.json")
    if os.path.isfile(latest):
        with open(latest) as f:
            if json.load(f)["tag"] == tag:  # an epoch abandoned right after a resume: nothing new to save
                return
    ranks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, own)  # every rank's part in one place, whatever files DeepSpeed writes
    if is_main:
        shutil.rmtree(os.path.join(directory, tag), ignore_errors=True)  # from a save that was killed
    torch.distributed.barrier()
    engine.save_checkpoint(directory, tag=tag, client_state={"iqstar": dict(loop, ranks=ranks)}, save_latest=False)
    torch.distributed.barrier()
    if is_main:
        with open(latest + ".tmp", "w") as f:
            json.dump({"tag": tag, "epoch": loop["epoch"], "world_size": len(ranks), "run": loop["run"]}, f)
        os.replace(latest + ".tmp", latest)
        for name in os.listdir(directory):  # keep one: a 7B policy's checkpoint with its optimizer is ~100 GB
            if name != tag and os.path.isdir(os.path.join(directory, name)):
                shutil.rmtree(os.path.join(directory, name))
    torch.distributed.barrier()


def load_checkpoint(engine, directory, rank):
    """Load the latest checkpoint's policy and optimizer into `engine`; returns its loop state and this rank's part."""
    with open(os.path.join(directory, "latest.json")) as f:
        tag = json.load(f)["tag"]
    _, client_state = engine.load_checkpoint(directory, tag=tag)
    loop = client_state["iqstar"]
    return loop, loop.pop("ranks")[rank]


class Interruption:
    """SIGINT/SIGTERM only raise a flag; the loop looks at it between steps and saves before it leaves.

    It is also a generate() stopping criterion, so a long rollout batch ends early instead of running on.
    """
    def __init__(self):
        self.signum = 0
        signal.signal(signal.SIGINT, self.catch)
        signal.signal(signal.SIGTERM, self.catch)

    def catch(self, signum, frame):
        self.signum = self.signum or signum

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.signum != 0, dtype=torch.bool, device=input_ids.device)

    def agreed(self, device):
        """Was any rank signalled? A collective: every rank asks at the same points, and all stop alike."""
        flag = torch.tensor([self.signum], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.signum = int(flag.item())
        return self.signum != 0


def stop(message, code, is_main):
    if is_main:
        print(f"iqstar.py: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def stopped_while_starting(signum, frame):
    """SIGINT/SIGTERM before the loop (and Interruption) begins: nothing to save, so stop now, but by exception.

    Killed outright, a process that is JIT-building or loading a DeepSpeed op (the first start on CPU) leaves a
    lock file behind, and every later start waits on it forever; an exception runs torch's `finally` that frees it.
    """
    stop(f"stopped by {signal.Signals(signum).name} while starting; nothing was saved", 128 + signum,
         os.environ.get("RANK", "0") == "0")


def check_model(flag, name):
    """The model's config, or a one-line error; also catches a path that does not exist before a hub lookup."""
    from transformers import AutoConfig
    if name.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(name)):
        fail(f"{flag} {name}: no such directory")
    try:
        return AutoConfig.from_pretrained(name)
    except Exception as e:
        fail(f"{flag} {name}: not a model directory and not loadable from the hub ({str(e).splitlines()[0]})")


def check_args(args):
    """Everything that can be wrong with the input, found before anything long starts or is written."""
    if not args.alpha > 0:
        fail(f"--alpha must be > 0 (got {args.alpha})")
    if not args.lr > 0:
        fail(f"--lr must be > 0 (got {args.lr})")
    for flag in ("snapshot_every", "save_every"):
        if getattr(args, flag) < 0:
            fail(f"--{flag.replace('_', '-')} must be >= 0 (got {getattr(args, flag)})")
    if args.max_skipped_steps < 1:
        fail(f"--max-skipped-steps must be a positive integer (got {args.max_skipped_steps})")
    for flag in ("epochs", "samples_per_epoch", "max_new_tokens", "rollout_batch_size", "batch_size"):
        if getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be a positive integer (got {getattr(args, flag)})")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        fail(f"--max-prompt-tokens must be a positive integer (got {args.max_prompt_tokens})")
    try:
        args.principle = read_principle(args.principle, args.principle_file)
    except ValueError as e:
        fail(e)
    if not os.path.isfile(args.ds_config):
        fail(f"--ds-config {args.ds_config}: no such file")
    try:
        with open(args.ds_config) as f:
            args.ds = json.load(f)
    except ValueError as e:
        fail(f"--ds-config {args.ds_config}: not valid JSON ({e})")
    if args.ds.get("zero_optimization", {}).get("stage") != 3:
        fail(f"--ds-config {args.ds_config}: iqstar.py expects ZeRO stage 3")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        fail(f"--output-dir {args.output_dir}: exists and is not a directory")
    if args.resume:
        if args.overwrite:
            fail("give --resume (go on with the run in --output-dir) or --overwrite (replace it), not both")
        if not os.path.isfile(os.path.join(args.output_dir, "checkpoints", "latest.json")):
            fail(f"--resume: {os.path.join(args.output_dir, 'checkpoints')} holds no complete checkpoint")
        return
    held = [n for n in ("config.json", "model.safetensors", "pytorch_model.bin", "metrics.jsonl", "checkpoints")
            if os.path.exists(os.path.join(args.output_dir, n))]
    if held and not args.overwrite:
        fail(f"--output-dir {args.output_dir} already holds a run ({', '.join(held)}); pass --resume to go on "
             "with it or --overwrite to replace it")


# ---------------------------------------------------------------------------------------------
# The loop: Algorithm 1
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    from transformers import AutoTokenizer
    config = check_model("--model", args.model)
    reference_name = args.reference_model or args.model
    frozen = {"--reference-model": check_model("--reference-model", reference_name)}
    if args.aligned_model:
        frozen["--aligned-model"] = check_model("--aligned-model", args.aligned_model)
    for flag, other in frozen.items():  # π̂ mixes the models' distributions token by token: one vocabulary
        if other.vocab_size != config.vocab_size:
            fail(f"{flag} has a vocabulary of {other.vocab_size} tokens, --model of {config.vocab_size}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = getattr(config, "eos_token_id", None)  # chat models may end a turn with any of several tokens
    eos_token_ids = sorted({tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})
    if not eos_token_ids:
        fail(f"--model {args.model}: the tokenizer has no EOS token to end responses")

    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    max_prompt = args.max_prompt_tokens or (context - args.max_new_tokens if context else None)
    if max_prompt is not None and max_prompt < 1:
        fail(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in {context} positions")
    conversations, skipped = load_conversations(args.dataset)
    # Each prompt twice: plain (π_θ, π_l; π_w too when it is an aligned model) and with the principle (π_w).
    prompts, unusable = build_prompts(conversations, tokenizer, None if args.aligned_model else args.principle,
                                      max_prompt)
    skipped += unusable
    if skipped and args.strict:
        fail(f"--strict: {args.dataset}, {skipped[0][0]}: {skipped[0][1]}")
    if not prompts:
        fail(skip_report(args.dataset, skipped, len(skipped)) + "; nothing left to train on" if skipped
             else f"--dataset {args.dataset}: holds no prompts")

    rank, world_size, device = init_distributed()
    if args.resume:  # ZeRO-3 shards the optimizer by rank: its checkpoint loads into the same number of ranks only
        with open(os.path.join(args.output_dir, "checkpoints", "latest.json")) as f:
            saved_world_size = json.load(f)["world_size"]
        if saved_world_size != world_size:
            fail(f"--resume: the checkpoint in {os.path.join(args.output_dir, 'checkpoints')} was written by "
                 f"{saved_world_size} rank(s) and this run has {world_size}; resume with {saved_world_size}")
    is_main = rank == 0
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from tqdm.auto import tqdm
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's old names
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    ds_config = fill_ds_config(args.ds, args, world_size, bf16)
    per_rank = math.ceil(args.samples_per_epoch / world_size)  # every rank runs the same number of steps
    if is_main:
        if skipped:
            print(skip_report(args.dataset, skipped, len(prompts) + len(skipped)))
        print(f"{len(prompts)} prompts from {args.dataset}; {per_rank * world_size} samples per epoch on "
              f"{world_size} rank(s), {device.type}, {dtype}")

    # Seeds: the same on every rank for loading and for the data order; offset by rank for sampling below.
    torch.manual_seed(args.seed)
    # transformers keeps only a weak reference to this object and loads weights partitioned (ZeRO-3)
    # only while it lives; `generate` also uses it to keep ranks in step. Keep it for the whole run.
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841
    policy = load_model(args.model, dtype)
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    hub_generation_config = use_pure_sampling(policy, args.max_new_tokens, eos_token_ids, pad_token_id,
                                              args.top_k, args.top_p)
    engine, *_ = deepspeed.initialize(model=policy, model_parameters=policy.parameters(), config=ds_config)
    reference, *_ = deepspeed.initialize(model=load_model(reference_name, dtype), config=frozen_config(ds_config))
    reference.eval()
    aligned = reference
    if args.aligned_model:
        aligned, *_ = deepspeed.initialize(model=load_model(args.aligned_model, dtype),
                                           config=frozen_config(ds_config))
        aligned.eval()

    torch.manual_seed(args.seed + 1 + rank)  # CRUCIAL: each rank must sample different responses
    checkpoints = os.path.join(args.output_dir, "checkpoints")
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    run = {flag: getattr(args, flag) for flag in RUN_FLAGS}
    # The loop's state: epochs done, the prompt stream and its shuffler, and the run of skipped steps.
    loop = {"epoch": 0, "stream": [], "data_order": random.Random(args.seed).getstate(), "skipped_in_a_row": 0,
            "run": run}
    progress = None  # this rank's half-done epoch, when resuming a run interrupted during training
    if args.resume:
        loop, own = load_checkpoint(engine, checkpoints, rank)
        set_rng_state(own["rng"])
        progress = own["progress"]
        loop["skipped_in_a_row"] = 0
        for group in engine.optimizer.param_groups:  # the checkpoint's optimizer state, this command's --lr
            group["lr"] = args.lr
        changed = [f"--{k.replace('_', '-')} (was {loop['run'][k]!r})" for k in RUN_FLAGS if loop["run"][k] != run[k]]
        loop["run"] = run
        if is_main:
            print(f"resumed from {checkpoints} after epoch {loop['epoch']}"
                  + (f", in the middle of epoch {loop['epoch'] + 1}" if progress else "")
                  + (f"; changed since: {', '.join(changed)}" if changed else ""))
    elif is_main:
        shutil.rmtree(checkpoints, ignore_errors=True)  # --overwrite: never resume into another run's state
    if is_main:
        os.makedirs(checkpoints, exist_ok=True)
        kept = []  # a resumed run's metrics go on from its checkpoint; a fresh run's start empty
        if args.resume and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["epoch"] <= loop["epoch"]]
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics_path + ".tmp", metrics_path)
    data_order = random.Random()
    data_order.setstate(loop["data_order"])
    stream = loop["stream"]
    interruption = Interruption()

    def interrupted(where, tag):
        stop(f"stopped by {signal.Signals(interruption.signum).name} {where}; saved {checkpoints}/{tag}. "
             "Run the same command with --resume to go on.", 128 + interruption.signum, is_main)

    for epoch in range(loop["epoch"] + 1, args.epochs + 1):
        at_start = dict(loop, stream=list(stream), data_order=data_order.getstate())  # an abandoned epoch restarts here
        rng_at_start = rng_state()
        # 1. sample y ~ π_θ(·|x) for this epoch's prompts (the same global draw on every rank, split by rank)
        while len(stream) < per_rank * world_size:
            order = list(range(len(prompts)))
            data_order.shuffle(order)
            stream += order
        drawn, stream = stream[:per_rank * world_size], stream[per_rank * world_size:]
        mine = [prompts[i] for i in drawn[rank::world_size]]
        plain = [x for x, _ in mine]
        principled = [x for _, x in mine]
        if progress is None:
            t0 = time.time()
            engine.eval()
            bar = tqdm(total=len(plain), desc=f"epoch {epoch} sample", disable=not is_main, leave=False)
            responses, targets, abandoned = [], [], None
            with gathered_for_generation(engine, args.gather_for_generation, device) as gathered:
                for start in range(0, len(plain), args.rollout_batch_size):
                    responses += sample_responses(engine.module, plain[start:start + args.rollout_batch_size],
                                                  policy.generation_config, device,
                                                  synced_gpus=False if gathered else None,
                                                  stopping_criteria=[interruption])
                    bar.update(len(responses) - bar.n)
                    if interruption.agreed(device):
                        abandoned = "sampling"
                        break
            bar.close()
            t1 = time.time()

            # 2–4. score the responses with the frozen model(s) and build the target log π̂(y_t)
            bar = tqdm(total=len(responses), desc=f"epoch {epoch} score", disable=not is_main, leave=False)
            for start in range(0, len(responses) if not abandoned else 0, args.batch_size):
                batch = slice(start, start + args.batch_size)
                targets += lean_superior_targets(aligned, reference, principled[batch], plain[batch],
                                                 responses[batch], args.alpha, pad_token_id, device)
                bar.update(len(responses[batch]))
                if interruption.agreed(device):
                    abandoned = "scoring"
                    break
            bar.close()
            if abandoned:  # nothing learnt yet this epoch: it starts again on resume
                save_checkpoint(engine, checkpoints, f"epoch-{epoch - 1}", at_start,
                                {"rng": rng_at_start, "progress": None}, is_main)
                interrupted(f"while {abandoned} epoch {epoch}", f"epoch-{epoch - 1}")
            # sums: Σ m·d², Σ m·d, Σ m, Σ m·log π̂ over applied steps (a skipped one's may be NaN); Σ m, samples, EOS
            progress = {"responses": responses, "targets": targets, "next": 0, "skipped": 0,
                        "sums": torch.zeros(7, dtype=torch.float64), "seconds": [t1 - t0, time.time() - t1, 0]}
        responses, targets = progress["responses"], progress["targets"]

        # 5–6. regress log π_θ(y_t) onto log π̂(y_t), one optimizer step per micro-batch
        t2 = time.time()
        engine.train()
        sums = progress["sums"].to(device)
        bar = tqdm(total=len(responses), initial=progress["next"], desc=f"epoch {epoch} train", disable=not is_main,
                   leave=False)
        for start in range(progress["next"], len(responses), args.batch_size):
            batch = slice(start, start + args.batch_size)
            loss, credit, mask = lean_policy_loss(engine, plain[batch], responses[batch], targets[batch],
                                                  pad_token_id, device)
            engine.backward(loss)
            engine.step()
            ys = responses[batch]
            applied = engine.was_step_applied()  # False: DeepSpeed found the gradient norm non-finite, on every
            loop["skipped_in_a_row"] = 0 if applied else loop["skipped_in_a_row"] + 1  # rank alike, and skipped it
            progress["skipped"] += not applied
            fit = [(credit ** 2).sum(), credit.sum(), mask.sum(), sum(t.sum() for t in targets[batch])]
            fit = fit if applied else [0] * 4
            sums += torch.tensor(fit + [mask.sum(), len(ys), sum(y[-1] in eos_token_ids for y in ys)],
                                 dtype=torch.float64, device=device)
            bar.update(len(ys))
            progress.update(next=min(start + args.batch_size, len(responses)), sums=sums.cpu())
            progress["seconds"][2] += time.time() - t2
            t2 = time.time()
            if loop["skipped_in_a_row"] >= args.max_skipped_steps:
                break
            if progress["next"] < len(responses) and interruption.agreed(device):
                tag = f"epoch-{epoch}-step-{progress['next'] // args.batch_size}"
                save_checkpoint(engine, checkpoints, tag, at_start, {"rng": rng_state(), "progress": progress}, is_main)
                interrupted(f"while training epoch {epoch}", tag)
        bar.close()
        if loop["skipped_in_a_row"] >= args.max_skipped_steps:  # the weights are still those of the last good step
            tag = f"epoch-{epoch}-step-{math.ceil(progress['next'] / args.batch_size)}"
            save_checkpoint(engine, checkpoints, tag, at_start, {"rng": rng_state(), "progress": progress}, is_main)
            stop(f"stopped: {loop['skipped_in_a_row']} steps in a row had a non-finite loss or gradient, and none of "
                 f"them changed the policy (epoch {epoch}); saved {checkpoints}/{tag}. Lower --lr or check the data, "
                 "then run the same command with --resume.", 3, is_main)

        # 7. log: one line per epoch, and metrics.jsonl
        sums = progress["sums"].to(device)
        torch.distributed.all_reduce(sums)
        sq, cr, trained, tgt, tokens, samples, eos = sums.tolist()
        sample_s, score_s, train_s = progress["seconds"]
        record = {"epoch": epoch, "loss": sq / max(trained, 1), "credit": cr / max(trained, 1),
                  "target_logp": tgt / max(trained, 1), "response_tokens": int(tokens),
                  "mean_response_length": tokens / max(samples, 1), "eos_rate": eos / max(samples, 1),
                  "skipped_steps": progress["skipped"], "sample_seconds": round(sample_s, 2),
                  "score_seconds": round(score_s, 2), "train_seconds": round(train_s, 2)}
        progress = None
        if is_main:
            print(f"epoch {epoch}/{args.epochs}  loss {record['loss']:.4f}  credit {record['credit']:+.4f}  "
                  f"tokens {record['response_tokens']}  len {record['mean_response_length']:.1f}  "
                  f"eos {record['eos_rate']:.2f}  " + (f"skipped {record['skipped_steps']}  " if record["skipped_steps"]
                                                       else "")
                  + f"sample {sample_s:.1f}s  score {score_s:.1f}s  train {train_s:.1f}s", flush=True)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        loop.update(epoch=epoch, stream=stream, data_order=data_order.getstate())
        stopping = interruption.agreed(device)
        if stopping or epoch == args.epochs or (args.save_every and epoch % args.save_every == 0):
            save_checkpoint(engine, checkpoints, f"epoch-{epoch}", loop, {"rng": rng_state(), "progress": None},
                            is_main)
        if stopping:
            interrupted(f"after epoch {epoch}", f"epoch-{epoch}")
        if args.snapshot_every and epoch % args.snapshot_every == 0 and epoch < args.epochs:
            save_policy(engine, tokenizer, hub_generation_config, os.path.join(args.output_dir, f"epoch-{epoch}"),
                        is_main)

    save_policy(engine, tokenizer, hub_generation_config, args.output_dir, is_main)
    if is_main:
        print(f"saved the aligned policy to {args.output_dir}")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, stopped_while_starting)
    signal.signal(signal.SIGTERM, stopped_while_starting)  # the deepspeed launcher passes Ctrl-C on as SIGTERM
    main()
