"""See Inverse-Q*'s token-level credit for any prompt (the paper's Figure 8), and preview π̂ before training.
iqstar.py trains; this companion only reads models. One process, GPU (bf16) or CPU (fp32), no DeepSpeed.
On the demo world (make demo), pass its principle: README, "Seeing the credit".

Each response token's credit, log π̂(y_t) − log π_ref(y_t), in the terminal and as an HTML page (--html).
π_ref is the SFT model on the plain prompt (π_l); with --policy, also log π̂ − log π_θ of a trained model:
    python credit.py view --model lmsys/vicuna-7b-v1.5 --prompt "Can I put Vick's balm on a baby?" --html credit.html
    python credit.py view --model lmsys/vicuna-7b-v1.5 --policy out/vicuna-7b-iqstar --prompts prompts.jsonl
A few samples from π̂ at several α beside π_l (α=0) and π_w (α=1), to choose α as the paper's §5.4 suggests:
    python credit.py preview --model lmsys/vicuna-7b-v1.5 --prompts prompts.jsonl --alphas 0,1,1.4,2 --samples 3
"""

import argparse
import contextlib
import html
import io
import os
import shutil
import sys
import textwrap
import unicodedata

import torch

import iqstar


def fail(message):
    """A one-line error and exit status 2, as iqstar.py's."""
    print(f"credit.py: error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage + error is two lines; keep errors to one
        fail(message)


def parse_args(argv=None):
    p = Parser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    commands = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    view = commands.add_parser(
        "view",
        help="each response token's credit, in the terminal and as an HTML page",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    preview = commands.add_parser(
        "preview",
        help="samples from π̂ at several α, beside π_l and π_w",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for q in (view, preview):
        q.add_argument(
            "--model",
            required=True,
            help="the SFT model (hub id or local path): π_ref = π_l, and π_w with the principle",
        )
        q.add_argument(
            "--aligned-model",
            help="aligned model used as π_w on the plain prompt instead of the principle (paper §5.3)",
        )
        q.add_argument("--prompt", action="append", default=[], help="a user message to answer (repeatable)")
        q.add_argument("--prompts", help="a file of prompts: .jsonl in iqstar.py's --dataset forms, else one a line")
        q.add_argument("--principle", help="principle given to π_w as a system message; default: iqstar.py's")
        q.add_argument("--principle-file", help="read the principle from this file")
        q.add_argument("--max-new-tokens", type=int, default=256, help="longest sampled response")
        q.add_argument("--seed", type=int, default=0, help="sampling seed")
    view.add_argument(
        "--policy",
        help="a trained policy π_θ (e.g. iqstar.py's --output-dir): also show "
        "log π̂ − log π_θ, and sample the response from it",
    )
    view.add_argument(
        "--response",
        help="score this response (to every prompt) instead of sampling one; "
        "an EOS is appended, since ending is a decision too",
    )
    view.add_argument("--alpha", type=float, default=1.4, help="α in π̂ = softmax(α log π_w + (1−α) log π_l)")
    view.add_argument("--html", help="write the self-contained HTML page here")
    view.add_argument(
        "--plain",
        "--no-color",
        dest="plain",
        action="store_true",
        help="one line per token with the numbers, even on a terminal",
    )
    preview.add_argument("--alphas", default="0,1,1.4,2", help="comma-separated α values; 0 is π_l, 1 is π_w")
    preview.add_argument("--samples", type=int, default=3, help="responses per prompt and α")
    return p.parse_args(argv)


def number_list(text):
    try:
        return [float(a) for a in text.split(",")]
    except ValueError:
        fail(f"--alphas must be comma-separated numbers (got {text!r})")


def check_args(args):
    """Bad input found before any model is loaded: one line, exit status 2."""
    if args.max_new_tokens < 1:
        fail(f"--max-new-tokens must be a positive integer (got {args.max_new_tokens})")
    if args.command == "preview":
        args.alphas = number_list(args.alphas)
        if any(a < 0 for a in args.alphas):
            fail(f"--alphas must be >= 0 (got {args.alphas})")
        if args.samples < 1:
            fail(f"--samples must be a positive integer (got {args.samples})")
    elif not args.alpha > 0:
        fail(f"--alpha must be > 0 (got {args.alpha})")
    try:
        args.principle = iqstar.read_principle(args.principle, args.principle_file)
    except ValueError as e:
        fail(e)
    if args.prompts is not None and args.prompt:
        fail("give --prompt or --prompts, not both")
    if args.prompts is None and not args.prompt:
        fail("give a --prompt or a --prompts file")
    if any(not p.strip() for p in args.prompt):
        fail("--prompt is empty")
    if getattr(args, "response", None) is not None and not args.response.strip():
        fail("--response is empty")
    for flag in ("model", "aligned_model", "policy"):
        name = getattr(args, flag, None)
        if name and name.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(name)):
            fail(f"--{flag.replace('_', '-')} {name}: no such directory")


def read_conversations(args):
    """The conversations to answer: --prompt, or --prompts as iqstar.py reads --dataset (or plain lines)."""
    if args.prompt:
        return [[{"role": "user", "content": p}] for p in args.prompt]
    path = args.prompts
    if not os.path.isfile(path):
        fail(f"--prompts {path}: no such file")
    if not path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            conversations = [[{"role": "user", "content": line.strip()}] for line in f if line.strip()]
        if not conversations:
            fail(f"--prompts {path}: the file holds no prompts")
        return conversations
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            conversations, skipped = iqstar.load_conversations(path)
    except SystemExit:  # iqstar's one-line error names its own program and flag; say it as ours
        fail(err.getvalue().strip().removeprefix("iqstar.py: error: ").replace("--dataset", "--prompts"))
    if skipped:  # a handful of prompts to look at: each one matters, so none is skipped quietly
        fail(f"--prompts {path}, {skipped[0][0]}: {skipped[0][1]}")
    if not conversations:
        fail(f"--prompts {path}: the file holds no prompts")
    return [messages for _, messages in conversations]


def load(flag, name, device, dtype):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except Exception as e:
        fail(f"{flag} {name}: not a model directory and not loadable from the hub ({str(e).splitlines()[0]})")
    return model.to(device).eval()  # eval: no dropout, log π is the distribution that samples


class Models:
    """π_ref = π_l (--model on the plain prompt), π_w (--model on the principled prompt, or --aligned-model
    on the plain one), and π_θ (--policy) if given; the tokenizer and sampling settings they share."""

    def __init__(self, args):
        from transformers import AutoTokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.reference = load("--model", args.model, self.device, dtype)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        except Exception as e:
            fail(f"--model {args.model}: cannot load its tokenizer ({str(e).splitlines()[0]})")
        self.aligned = load("--aligned-model", args.aligned_model, self.device, dtype) if args.aligned_model else None
        self.policy = load("--policy", args.policy, self.device, dtype) if getattr(args, "policy", None) else None
        vocab = self.reference.config.vocab_size
        for flag, model in (("--aligned-model", self.aligned), ("--policy", self.policy)):
            if model is not None and model.config.vocab_size != vocab:  # π̂ mixes distributions token by token
                fail(f"{flag} has a vocabulary of {model.config.vocab_size} tokens, --model of {vocab}")
        self.principle = args.principle
        self.pad_token_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        self.eos_token_ids = iqstar.eos_token_ids(self.tokenizer, self.reference.config)
        if not self.eos_token_ids:
            fail(f"--model {args.model}: the tokenizer has no EOS token to end responses")
        for model in (self.reference, self.aligned, self.policy):
            if model is not None:  # sample from the models themselves, not their generation_config's top-k
                iqstar.use_pure_sampling(model, args.max_new_tokens, self.eos_token_ids, self.pad_token_id)

    @property
    def model_w(self):
        return self.aligned or self.reference

    def prompts(self, messages):
        """(plain, principled) token ids; π_w sees the plain prompt when it is an aligned model."""
        plain = iqstar.format_prompt(self.tokenizer, messages)
        return plain, plain if self.aligned else iqstar.format_prompt(self.tokenizer, messages, self.principle)


# ---------------------------------------------------------------------------------------------
# view: credit = log π̂(y_t) − log π_ref(y_t), the quantity Inverse-Q* regresses π_θ onto (Figure 8)
# ---------------------------------------------------------------------------------------------
def response_logits(model, prompts, responses, pad_token_id, device):
    """(B, T, V) logits predicting each response token, and the (B, T) response ids and mask.

    The whole vocabulary at every position, as the straightforward formulas want; iqstar.py's loop scores
    chunk by chunk instead (response_hidden), which tests/test_logprobs.py checks against this.
    """
    input_ids, attention_mask, position_ids, response_ids, response_mask = iqstar.make_batch(
        prompts, responses, pad_token_id, device
    )
    # logits_to_keep: only the T positions that predict response tokens get the (T x V) unembedding.
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=response_ids.shape[1] + 1,
        use_cache=False,
    ).logits[:, :-1]
    return logits, response_ids, response_mask


def token_logprobs(logits, token_ids):
    """log softmax(logits) at token_ids: (B, T, V), (B, T) -> (B, T), in float32."""
    return logits.float().log_softmax(-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def token_credit(models, plain, principled, response, alpha):
    """Per response token: log π̂, log π_ref, their difference (the credit), and log π_θ with --policy. (T,) each."""
    device, pad = models.device, models.pad_token_id
    logits_w, ids, _ = response_logits(models.model_w, [principled], [response], pad, device)  # π_w
    logits_l, _, _ = response_logits(models.reference, [plain], [response], pad, device)  # π_l = π_ref
    superior = iqstar.superior_logprobs(logits_w, logits_l, alpha).gather(-1, ids.unsqueeze(-1)).squeeze(-1)[0]
    reference = token_logprobs(logits_l, ids)[0]
    rows = {"superior": superior, "reference": reference, "credit": superior - reference}
    if models.policy is not None:
        logits_p, _, _ = response_logits(models.policy, [plain], [response], pad, device)
        rows["policy"] = token_logprobs(logits_p, ids)[0]
        rows["policy_credit"] = superior - rows["policy"]
    return {k: v.cpu() for k, v in rows.items()}


def token_texts(tokenizer, ids):
    """The text each token adds, as a reader sees it: decode every prefix and take the difference.

    Robust where decoding one token alone is not: sentencepiece's "▁" and a first token's dropped space,
    byte-level BPE, and byte-fallback pieces of one character (shown on the byte that completes it).
    """
    texts, shown = [], ""
    for t in range(len(ids)):
        text = tokenizer.decode(ids[: t + 1], clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: the next byte token completes it
            texts.append("")
            continue
        same = 0  # a decoder may rewrite the tail (e.g. " do not" -> " don't"): credit the new part only
        while same < min(len(shown), len(text)) and shown[same] == text[same]:
            same += 1
        texts.append(text[same:])
        shown = text
    return texts


def view(args):
    conversations = read_conversations(args)
    models = Models(args)
    torch.manual_seed(args.seed)
    sampler = models.policy or models.reference  # the response π_θ would write (before training: the SFT model)
    sections = []
    for messages in conversations:
        plain, principled = models.prompts(messages)
        if args.response is not None:
            response = models.tokenizer(args.response, add_special_tokens=False)["input_ids"] + models.eos_token_ids[:1]
        else:
            response = iqstar.sample_responses(sampler, [plain], sampler.generation_config, models.device)[0]
        rows = token_credit(models, plain, principled, response, args.alpha)
        sections.append(
            {
                "prompt": messages[-1]["content"],
                "texts": token_texts(models.tokenizer, response),
                "sampled": args.response is None,
                **{k: v.tolist() for k, v in rows.items()},
            }
        )
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(html_page(sections, args))
    color = sys.stdout.isatty() and not args.plain and os.environ.get("TERM") != "dumb"
    print(terminal_text(sections, color), end="")
    if args.html:
        print(f"wrote {args.html}")


# Diverging scale, colour-blind safe (ColorBrewer PiYG ends): magenta < 0 < green; white at 0.
NEGATIVE, POSITIVE = (197, 27, 125), (77, 146, 33)


def scale_bound(sections):
    """Where the colour saturates: the 95th percentile of |credit|, so that one extreme token does not wash
    out the rest, but at least a quarter of the largest, so that a few decisive tokens (often the whole
    story: a refusal's first word) are not drowned by hundreds of near-zero ones at full colour."""
    values = sorted(abs(v) for s in sections for k in ("credit", "policy_credit") if k in s for v in s[k])
    if not values:
        return 1.0
    return max(values[int(0.95 * (len(values) - 1))], values[-1] / 4, 1e-3)


def shade(value, bound):
    """RGB of a credit on the scale: white at 0, the end colour at ±bound and beyond."""
    end, f = (POSITIVE if value > 0 else NEGATIVE), min(abs(value) / bound, 1.0)
    return tuple(round(255 + (c - 255) * f) for c in end), f


def html_page(sections, args):
    bound = scale_bound(sections)

    def span(text, values, labels):
        (r, g, b), strength = shade(values[0], bound)
        tip = " | ".join(f"{name} {value:+.3f}" for name, value in zip(labels, values, strict=True))
        shown = html.escape(text).replace("\n", "↵\n") or "&#8203;"  # a zero-width body keeps empty tokens hoverable
        ink = "#fff" if strength > 0.8 else "#111"
        return (
            f'<span class="tok" tabindex="0" data-credit="{values[0]:+.4f}" title="{tip}" data-tip="{tip}" '
            f'style="background:rgb({r},{g},{b});color:{ink}">{shown}</span>'
        )

    body = []
    for number, s in enumerate(sections, 1):
        views = [
            (
                "credit vs π_ref: log π̂ − log π_ref",
                "credit",
                ["credit", "log π̂", "log π_ref"],
                ["credit", "superior", "reference"],
            )
        ]
        if "policy" in s:
            views.append(
                (
                    "credit vs π_θ: log π̂ − log π_θ",
                    "policy_credit",
                    ["credit", "log π̂", "log π_θ"],
                    ["policy_credit", "superior", "policy"],
                )
            )
        body.append(
            f"<section><h2>{number}. {html.escape(s['prompt'])}</h2>"
            f'<p class="meta">{"sampled" if s["sampled"] else "given"} response, {len(s["texts"])} tokens</p>'
        )
        for title, key, labels, keys in views:
            total = sum(s[key])
            body.append(
                f'<h3>{html.escape(title)} <span class="meta">(sum {total:+.2f}, '
                f'mean {total / max(len(s[key]), 1):+.3f})</span></h3><div class="response">'
                + "".join(span(t, [s[k][i] for k in keys], labels) for i, t in enumerate(s["texts"]))
                + "</div>"
            )
        body.append("</section>")
    stops = ", ".join(f"rgb{shade(v * bound, bound)[0]}" for v in (-1, -0.5, 0, 0.5, 1))
    models = (
        f"π_ref = {args.model}"
        + (f", π_w = {args.aligned_model}" if args.aligned_model else "")
        + (f", π_θ = {args.policy}" if args.policy else "")
    )
    principle = "none: π_w is --aligned-model" if args.aligned_model else args.principle
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Inverse-Q* token credit</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1em auto; max-width: 50em; padding: 0 1em; color: #111; }}
h1 {{ font-size: 1.3em; }}
h2 {{ font-size: 1.1em; margin-top: 1.5em; }}
h3 {{ font-size: 0.95em; margin-bottom: 0.3em; }}
.meta {{ color: #555; font-size: 0.85em; font-weight: normal; }}
.response {{ font-family: ui-monospace, monospace; font-size: 1.05em; line-height: 1.9; white-space: pre-wrap;
  overflow-wrap: anywhere; border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; }}
.tok {{ position: relative; border-radius: 3px; padding: 0.1em 0; }}
.tok:hover, .tok:focus {{ outline: 2px solid #111; outline-offset: 0; }}
.tok:focus::after {{ content: attr(data-tip); position: absolute; left: 0; top: 1.9em; z-index: 1;
  background: #111; color: #fff; padding: 0.2em 0.5em; border-radius: 4px; white-space: nowrap; font-size: 0.8em; }}
.legend {{ display: flex; align-items: center; gap: 0.5em; font-size: 0.85em; flex-wrap: wrap; }}
.bar {{ width: 14em; max-width: 60vw; height: 1em; border: 1px solid #999;
  background: linear-gradient(to right, {stops}); }}
details {{ font-size: 0.85em; color: #333; }}
</style></head><body>
<h1>Inverse-Q* token credit (α = {args.alpha:g})</h1>
<p class="meta">credit = log π̂(y_t) − log π_ref(y_t), π̂ = softmax(α log π_w + (1−α) log π_l).
Green: π̂ wants the token more than the model does, Inverse-Q* pushes it up; magenta: it pushes it down.
Hover, or tap, a token for its numbers.</p>
<div class="legend"><span>{-bound:+.3g}</span><div class="bar"></div><span>{bound:+.3g}</span>
<span class="meta">(beyond ±{bound:.3g}: full colour)</span></div>
<p class="meta">{html.escape(models)}</p>
<details><summary>principle (π_w's system message)</summary><p>{html.escape(principle)}</p></details>
{"".join(body)}
</body></html>
"""


def terminal_text(sections, color):
    """ANSI backgrounds per token and a legend on a terminal; otherwise one line of numbers per token."""
    bound = scale_bound(sections)
    out = []
    for number, s in enumerate(sections, 1):
        out.append(
            f"# {number}. {s['prompt']}  ({'sampled' if s['sampled'] else 'given'} response, "
            f"sum of credit {sum(s['credit']):+.2f})\n"
        )
        if not color:
            extra = "  logπ_θ  credit_θ" if "policy" in s else ""
            out.append(f"{'pos':>4}  {'token':<18}  {'credit':>8}  {'logπ̂':>8}  {'logπ_ref':>8}{extra}\n")
            for i, text in enumerate(s["texts"]):
                line = f"{i:4d}  {repr(text):<18}  {s['credit'][i]:+8.3f}  "
                line += f"{s['superior'][i]:8.3f}  {s['reference'][i]:8.3f}"
                if "policy" in s:
                    line += f"  {s['policy'][i]:8.3f}  {s['policy_credit'][i]:+8.3f}"
                out.append(line + "\n")
            continue
        for key, label in (("credit", "vs π_ref"), ("policy_credit", "vs π_θ")):
            if key in s:
                out.append(
                    f"{label}: "
                    + "".join(ansi(t.replace("\n", "↵\n"), v, bound) for t, v in zip(s["texts"], s[key], strict=True))
                    + "\n"
                )
    if color:
        out.append(
            "legend: "
            + "".join(ansi(f" {v * bound:+.3g} ", v * bound, bound) for v in (-1, -0.5, 0, 0.5, 1))
            + "  (green: π̂ wants the token more; magenta: less)\n"
        )
    return "".join(out)


def ansi(text, value, bound):
    (r, g, b), strength = shade(value, bound)
    ink = "38;2;255;255;255" if strength > 0.8 else "38;2;0;0;0"
    if os.environ.get("COLORTERM") in ("truecolor", "24bit"):
        background = f"48;2;{r};{g};{b}"
    else:  # the 6×6×6 cube of 256-colour terminals
        background = "48;5;" + str(16 + sum(round(c / 255 * 5) * w for c, w in zip((r, g, b), (36, 6, 1), strict=True)))
        ink = "97" if strength > 0.8 else "30"
    return f"\x1b[{background};{ink}m{text}\x1b[0m"


# ---------------------------------------------------------------------------------------------
# preview: samples from π̂ itself, per α, before any training
# ---------------------------------------------------------------------------------------------
class SuperiorLogits:
    """A generate() logits processor for sampling from π̂: the generating model's logits (π_w, on the principled
    prompts) become log π̂ by iqstar's own superior_logprobs, with π_l run beside generate() on the plain prompts,
    left-padded, with its own cache and position ids. (transformers' classifier-free guidance scores the same
    mixture, but its second branch takes no position ids: a batch of different prompts would shift them.)"""

    def __init__(self, model_l, plain, pad_token_id, alpha, device):
        self.model, self.alpha, self.cache = model_l, alpha, None
        self.ids, self.mask, self.positions, *_ = iqstar.make_batch(plain, [[]] * len(plain), pad_token_id, device)

    def __call__(self, input_ids, scores):
        if self.cache is not None:  # the token sampled at the last step goes after the plain prompts too
            self.ids, self.positions = input_ids[:, -1:], self.positions[:, -1:] + 1
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(input_ids), 1)], 1)
        out = self.model(
            input_ids=self.ids,
            attention_mask=self.mask,
            position_ids=self.positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        return iqstar.superior_logprobs(scores, out.logits[:, -1], self.alpha)


@torch.no_grad()
def generate_superior(models, plain, principled, alpha, **generate_kwargs):
    """generate() output of one sample per prompt pair (lists of token ids, left-padded into one batch) from
    π̂ = softmax(α log π_w + (1−α) log π_l). π_w may be another model (--aligned-model); α = 1 samples π_w and
    α = 0 samples π_l directly."""
    model, prompts, processors = models.model_w, principled, []
    if alpha == 0:
        model, prompts = models.reference, plain
    elif alpha != 1:
        processors.append(SuperiorLogits(models.reference, plain, models.pad_token_id, alpha, models.device))
    input_ids, attention_mask, *_ = iqstar.make_batch(prompts, [[]] * len(prompts), models.pad_token_id, models.device)
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=model.generation_config,
        logits_processor=processors,
        **generate_kwargs,
    )


def preview_samples(models, plain, principled, alpha):
    """A response per prompt pair from π̂ at α, as token-id lists cut after the first EOS (kept)."""
    prompt_length = max(map(len, plain if alpha == 0 else principled))
    completion = generate_superior(models, plain, principled, alpha)[:, prompt_length:]
    mask = iqstar.completion_mask(completion, models.eos_token_ids)
    return [ids[m].tolist() for ids, m in zip(completion, mask, strict=True)]


def pad(text, width):
    """ljust by what the terminal shows: a combining mark (the hat of π̂) takes no column."""
    return text + " " * (width - len(text) + sum(unicodedata.combining(c) > 0 for c in text))


def alpha_label(alpha):
    return f"α={alpha:g}" + {0: " (π_l)", 1: " (π_w)"}.get(alpha, " (π̂)")


def preview(args):
    conversations = read_conversations(args)
    models = Models(args)
    torch.manual_seed(args.seed)
    width = shutil.get_terminal_size().columns
    column = (width - 3 * (len(args.alphas) - 1)) // len(args.alphas)
    for messages in conversations:
        plain, principled = models.prompts(messages)
        columns = []
        for alpha in args.alphas:
            texts = []
            for ids in preview_samples(models, [plain] * args.samples, [principled] * args.samples, alpha):
                ended = ids and ids[-1] in models.eos_token_ids
                texts.append(models.tokenizer.decode(ids, skip_special_tokens=True).strip() + ("" if ended else " …"))
            columns.append(texts)
        print(f"# {messages[-1]['content']}")
        if column >= 24:  # side by side: a column per α, samples one under another
            cells = [
                [alpha_label(a)]
                + [
                    line
                    for i, t in enumerate(texts)
                    for line in ([""] if i else []) + textwrap.wrap(f"{i + 1}. {t}", column)
                ]
                for a, texts in zip(args.alphas, columns, strict=True)
            ]
            for row in range(max(len(c) for c in cells)):
                print(" | ".join(pad(c[row] if row < len(c) else "", column) for c in cells).rstrip())
        else:  # a narrow terminal: one block per α
            for alpha, texts in zip(args.alphas, columns, strict=True):
                print(alpha_label(alpha))
                for i, t in enumerate(texts, 1):
                    print(textwrap.fill(f"{i}. {t}", max(width, 20), subsequent_indent="   "))
        print()


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    if args.command == "view":
        view(args)
    else:
        preview(args)


if __name__ == "__main__":
    main()
