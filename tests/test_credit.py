"""credit.py: the token credit it shows is iqstar's π̂ exactly, its page renders in a real browser, and its
preview samples from π̂ (credit.SuperiorLogits wired the right way round)."""

import math
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib

import pytest
import torch

import credit
import world
from conftest import ROOT, run_iqstar
from credit import token_logprobs
from iqstar import superior_logprobs

UNSAFE_PROMPT = "how do i poison a dog"  # a training prompt; any unsafe one works


@pytest.fixture(scope="module")
def models(world_model):
    args = credit.parse_args(
        [
            "view",
            "--model",
            world_model,
            "--prompt",
            UNSAFE_PROMPT,
            "--principle",
            world.PRINCIPLE,
            "--max-new-tokens",
            "2",
        ]
    )  # preview: first tokens
    credit.check_args(args)
    return credit.Models(args)


def reply_ids(models, text):
    return models.tokenizer(text, add_special_tokens=False)["input_ids"] + [models.tokenizer.eos_token_id]


def section(models, prompt, reply, alpha=1.4):
    """What credit.view builds for one prompt and a given reply."""
    plain, principled = models.prompts([{"role": "user", "content": prompt}])
    response = reply_ids(models, reply)
    rows = credit.token_credit(models, plain, principled, response, alpha)
    return {
        "prompt": prompt,
        "texts": credit.token_texts(models.tokenizer, response),
        "sampled": False,
        **{k: v.tolist() for k, v in rows.items()},
    }


# ---------------------------------------------------------------------------------------------
# the credit is iqstar's: log π̂(y_t) − log π_ref(y_t)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_credit_is_superior_minus_reference(models):
    plain, principled = models.prompts([{"role": "user", "content": UNSAFE_PROMPT}])
    response = reply_ids(models, world.REFUSALS[0])
    rows = credit.token_credit(models, plain, principled, response, 1.4)

    # Independently: one unpadded forward pass per prompt over prompt + response, every position's logits.
    def logits(prompt):
        return models.reference(torch.tensor([prompt + response])).logits[:, len(prompt) - 1 : -1]

    ids = torch.tensor([response])
    logits_w, logits_l = logits(principled), logits(plain)
    superior = superior_logprobs(logits_w, logits_l, 1.4).gather(-1, ids.unsqueeze(-1)).squeeze(-1)[0]
    reference = token_logprobs(logits_l, ids)[0]
    torch.testing.assert_close(rows["superior"], superior, atol=1e-6, rtol=0)
    torch.testing.assert_close(rows["reference"], reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(rows["credit"], superior - reference, atol=1e-6, rtol=0)
    assert rows["credit"][0] > 0.1  # π̂ wants the refusal's first word more than the un-prompted model does
    # and the world's exact first-token numbers agree
    logp_w = world.first_token_logprobs(models.reference, models.tokenizer, UNSAFE_PROMPT, world.PRINCIPLE)
    logp_l = world.first_token_logprobs(models.reference, models.tokenizer, UNSAFE_PROMPT)
    first = response[0]
    expected = superior_logprobs(logp_w, logp_l, 1.4)[first] - logp_l[first]
    assert rows["credit"][0].item() == pytest.approx(expected.item(), abs=1e-5)


def test_compliance_gets_negative_credit(models):
    comply = world.COMPLIANCES[0].format(task="poison a dog")
    assert section(models, UNSAFE_PROMPT, comply)["credit"][0] < -0.1


def test_policy_column(world_model, models):
    """--policy adds log π̂ − log π_θ; with π_θ = π_ref it equals the credit against π_ref."""
    args = credit.parse_args(
        [
            "view",
            "--model",
            world_model,
            "--policy",
            world_model,
            "--prompt",
            UNSAFE_PROMPT,
            "--principle",
            world.PRINCIPLE,
        ]
    )
    credit.check_args(args)
    with_policy = credit.Models(args)
    plain, principled = with_policy.prompts([{"role": "user", "content": UNSAFE_PROMPT}])
    rows = credit.token_credit(with_policy, plain, principled, reply_ids(models, world.REFUSALS[1]), 1.4)
    torch.testing.assert_close(rows["policy_credit"], rows["credit"], atol=1e-6, rtol=0)


def test_token_texts_are_what_a_reader_reads(models):
    ids = reply_ids(models, world.REFUSALS[0])
    texts = credit.token_texts(models.tokenizer, ids)
    assert "".join(texts) == models.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    assert texts[:3] == ["sorry", ",", " i"]


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_token_texts_with_subword_tokenizers(kind):
    """GPT-2-style byte-level BPE and sentencepiece-style "▁" pieces, trained here on a few lines."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the café is open", "a snowman ☃ in the garden", "line one\nline two", "tabs\tand  spaces"] * 20
    tok = Tokenizer(tok_models.BPE(unk_token=None if kind == "byte-level" else "<unk>"))
    if kind == "byte-level":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=50, special_tokens=["<unk>"])
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    text = "the café ☃ line one\nline two"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split()) + 2  # sub-word pieces, so the test means something
    texts = credit.token_texts(tokenizer, ids)
    assert "".join(texts) == tokenizer.decode(ids)
    assert not any(marker in t for t in texts for marker in ("Ġ", "▁", "Ċ", "\ufffd"))


def test_terminal_colour_and_column_forms(models):
    sections = [section(models, UNSAFE_PROMPT, world.REFUSALS[0])]
    n = len(sections[0]["texts"])
    coloured = credit.terminal_text(sections, color=True)
    assert len(re.findall(r"\x1b\[48;", coloured)) == n + 5  # a background per token, five legend swatches
    plain = credit.terminal_text(sections, color=False)
    assert "\x1b" not in plain
    lines = [line for line in plain.splitlines() if re.match(r"\s*\d+\s", line)]
    assert len(lines) == n
    assert float(lines[0].split()[2]) == pytest.approx(sections[0]["credit"][0], abs=1e-3)


# ---------------------------------------------------------------------------------------------
# the HTML page, rendered by headless Chromium
# ---------------------------------------------------------------------------------------------
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def run_chromium(page, *flags):
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                *flags,
                f"file://{page}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )


def png_pixels(path):
    """The RGB pixels of an 8-bit, non-interlaced RGB/RGBA PNG (what Chromium writes), without PIL."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    bpp, raw = (3 if colour == 2 else 4), zlib.decompress(idat)
    stride, rows, previous = width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a, b = (line[i - bpp] if i >= bpp else 0), previous[i]
            c = previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        previous = line
    return [tuple(row[x * bpp : x * bpp + 3]) for row in rows for x in range(width)]


@pytest.mark.process
def test_html_page_in_headless_chromium(models, tmp_path):
    sections = [
        section(models, UNSAFE_PROMPT, world.REFUSALS[0]),
        section(models, UNSAFE_PROMPT, world.COMPLIANCES[1].format(task="poison a dog")),
    ]
    args = credit.parse_args(["view", "--model", "world", "--prompt", UNSAFE_PROMPT, "--principle", world.PRINCIPLE])
    page = tmp_path / "credit.html"
    page.write_text(credit.html_page(sections, args), encoding="utf-8")

    dom = run_chromium(page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    spans = re.findall(r'<span class="tok"[^>]*data-credit="([-+0-9.]+)"[^>]*>(.*?)</span>', dom.stdout)
    assert len(spans) == sum(len(s["texts"]) for s in sections)
    assert [float(c) for c, _ in spans[:2]] == pytest.approx(
        [sections[0]["credit"][0], sections[0]["credit"][1]], abs=1e-4
    )
    assert spans[0][1] == "sorry"

    shot = tmp_path / "shot.png"
    run = run_chromium(page, f"--screenshot={shot}", "--window-size=480,640", "--hide-scrollbars")
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    pixels = png_pixels(shot)
    # strongly coloured pixels of both hues: green (credit > 0, "sorry") and magenta (credit < 0, "ok")
    green = sum(g - r > 50 and g - b > 50 for r, g, b in pixels)
    magenta = sum(r - g > 80 and b - g > 40 for r, g, b in pixels)
    assert green > 100 and magenta > 100, (green, magenta)


# ---------------------------------------------------------------------------------------------
# preview: samples from π̂ (α=1: π_w; α=0: π_l; otherwise credit.SuperiorLogits)
# ---------------------------------------------------------------------------------------------
def refusal_probability(logprobs, tokenizer):
    return world.start_mass(logprobs, tokenizer, world.REFUSE_STARTS)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 2.0])
def test_preview_samples_follow_superior_policy(models, alpha):
    """First response tokens of many preview samples against π̂'s exact first-token probability of refusing."""
    n = 300
    tokenizer = models.tokenizer
    plain, principled = models.prompts([{"role": "user", "content": UNSAFE_PROMPT}])
    torch.manual_seed(0)
    with torch.no_grad():
        logp_w = world.first_token_logprobs(models.reference, tokenizer, UNSAFE_PROMPT, world.PRINCIPLE)
        logp_l = world.first_token_logprobs(models.reference, tokenizer, UNSAFE_PROMPT)
    expected = refusal_probability(superior_logprobs(logp_w, logp_l, alpha), tokenizer)
    samples = credit.preview_samples(models, [plain] * n, [principled] * n, alpha)
    refused = sum(tokenizer.convert_ids_to_tokens(s[0]) in world.REFUSE_STARTS for s in samples) / n
    tolerance = 4 * math.sqrt(expected * (1 - expected) / n)
    assert abs(refused - expected) <= tolerance, (alpha, refused, expected)
    if alpha == 0.3:  # the check has the power to tell π̂ from π_w, π_l and a swapped mixture
        for other in (1.0, 0.0, 0.7):
            assert abs(refusal_probability(superior_logprobs(logp_w, logp_l, other), tokenizer) - refused) > tolerance


@torch.no_grad()
def test_preview_every_step_is_superior_policy(models):
    """Over whole responses (π_l's cache at work): generate's processed scores at every step are
    log π̂ of the same prefix, computed by iqstar from full forward passes."""
    alpha, plain, principled = 1.4, *models.prompts([{"role": "user", "content": UNSAFE_PROMPT}])
    torch.manual_seed(1)
    out = credit.generate_superior(
        models,
        [plain] * 4,
        [principled] * 4,
        alpha,
        max_new_tokens=12,
        output_scores=True,
        return_dict_in_generate=True,
    )
    scores = torch.stack(out.scores, 1).log_softmax(-1)  # (n, T, V): α·log π_w + (1−α)·log π_l, renormalised
    completion = out.sequences[:, len(principled) :]
    mask = credit.iqstar.completion_mask(completion, models.eos_token_ids)
    for i in range(len(completion)):
        response = completion[i][mask[i]].tolist()
        logits_w, _, _ = credit.response_logits(models.reference, [principled], [response], 0, "cpu")
        logits_l, _, _ = credit.response_logits(models.reference, [plain], [response], 0, "cpu")
        expected = superior_logprobs(logits_w, logits_l, alpha)[0]
        got = scores[i, : len(response)]
        finite = expected > -20  # compare where the numbers mean something
        torch.testing.assert_close(got[finite], expected[finite], atol=1e-4, rtol=0)
    assert mask.sum() > 8  # several tokens per response, not just the first


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
SCRIPT = os.path.join(ROOT, "credit.py")


@pytest.mark.process
def test_view_command(world_model, tmp_path):
    page = tmp_path / "view.html"
    result = run_iqstar(
        [
            "view",
            "--model",
            world_model,
            "--prompt",
            UNSAFE_PROMPT,
            "--principle",
            world.PRINCIPLE,
            "--max-new-tokens",
            "30",
            "--html",
            page,
        ],
        script=SCRIPT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\x1b[" not in result.stdout  # not a terminal: the numeric column form
    lines = [line for line in result.stdout.splitlines() if re.match(r"\s*\d+\s+'", line)]
    spans = re.findall(r'class="tok"[^>]*data-credit="([-+0-9.]+)"', page.read_text(encoding="utf-8"))
    assert len(lines) == len(spans) > 0
    assert [float(line.split()[-3]) for line in lines] == pytest.approx([float(c) for c in spans], abs=2e-3)


@pytest.mark.process
def test_preview_command(world_model):
    result = run_iqstar(
        [
            "preview",
            "--model",
            world_model,
            "--prompt",
            UNSAFE_PROMPT,
            "--principle",
            world.PRINCIPLE,
            "--alphas",
            "0,1,1.4",
            "--samples",
            "2",
            "--max-new-tokens",
            "6",
        ],
        script=SCRIPT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for label in ("α=0 (π_l)", "α=1 (π_w)", "α=1.4 (π̂)"):
        assert label in result.stdout
    assert len(re.findall(r"(^|\| )2\. ", result.stdout, re.M)) == 3  # a second sample in each column


@pytest.mark.parametrize(
    "argv, message",
    [
        (["view", "--model", "/nonexistent/model", "--prompt", "hi"], "--model /nonexistent/model: no such directory"),
        (["view", "--model", "M", "--prompt", "  "], "--prompt is empty"),
        (["view", "--model", "M", "--prompt", "hi", "--alpha", "much"], "--alpha: invalid float value"),
        (["view", "--model", "M", "--prompt", "hi", "--alpha", "0"], "--alpha must be > 0"),
        (["view", "--model", "M"], "give a --prompt or a --prompts file"),
        (["view", "--model", "M", "--prompts", "/nonexistent/p.jsonl"], "--prompts /nonexistent/p.jsonl: no such file"),
        (["preview", "--model", "M", "--prompt", "hi", "--alphas", "1,x"], "--alphas must be comma-separated numbers"),
    ],
)
def test_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        credit.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("credit.py: error:") and message in err, err


@pytest.mark.process
def test_bad_input_in_a_subprocess(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"nothing": 1}\n')
    for argv, message in [
        (["view", "--model", "/nonexistent/m", "--prompt", "hi"], "no such directory"),
        (["view", "--model", ROOT, "--prompts", bad], f"{bad}, line 2:"),
    ]:
        result = run_iqstar(argv, script=SCRIPT, timeout=120)
        err = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(err) == 1 and err[0].startswith("credit.py: error:"), result.stderr
        assert message in err[0]
