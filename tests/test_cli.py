"""Bad input: a one-line error, exit status 2, before any long work, with nothing written (`good`: conftest.py)."""

import json
import os
import sys

import pytest

import iqstar


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as e:
        iqstar.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def replace(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--alpha", "0"], "--alpha must be > 0"),
        (["--alpha", "-1.4"], "--alpha must be > 0"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--samples-per-epoch", "-5"], "--samples-per-epoch must be a positive integer"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
        (["--kv-cache-tokens", "0"], "--kv-cache-tokens must be a positive integer"),
        (["--dtype", "fp16"], "argument --dtype: invalid choice"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--max-new-tokens", "500"], "leaves no room for a prompt"),
        (["--principle", "a", "--principle-file", "p.txt"], "not both"),
        (
            ["--principle-file", "/nonexistent/principle.txt"],
            "--principle-file /nonexistent/principle.txt: no such file",
        ),
        (["--ds-config", "/nonexistent/ds.json"], "--ds-config /nonexistent/ds.json: no such file"),
        (["--reference-model", "/nonexistent/ref"], "--reference-model /nonexistent/ref: no such directory"),
        (["--aligned-model", "/nonexistent/aligned"], "--aligned-model /nonexistent/aligned: no such directory"),
        (["--max-skipped-steps", "0"], "--max-skipped-steps must be a positive integer"),
        (["--max-prompt-tokens", "0"], "--max-prompt-tokens must be a positive integer"),
        (["--save-every", "-1"], "--save-every must be >= 0"),
        (["--snapshot-every", "-2"], "--snapshot-every must be >= 0"),
        (["--lora-r", "-8"], "--lora-r must be >= 0"),
        (["--lora-r", "8", "--lora-alpha", "0"], "--lora-alpha must be > 0"),
    ],
)
def test_bad_flags(good, extra, message, capsys):
    err = error_of(good + extra, capsys)
    assert message in err and err.startswith("iqstar.py: error:")
    assert not os.path.exists(good[-1])


def test_model_path_that_does_not_exist(good, capsys):
    err = error_of(replace(good, "--model", "/nonexistent/vicuna"), capsys)
    assert "--model /nonexistent/vicuna: no such directory" in err


def test_model_dir_that_is_not_a_model(good, tmp_path, capsys):
    err = error_of(replace(good, "--model", str(tmp_path)), capsys)
    assert f"--model {tmp_path}: not a model directory" in err


def test_dataset_missing_empty_or_bad(good, tmp_path, capsys):
    assert "no such file" in error_of(replace(good, "--dataset", str(tmp_path / "none.jsonl")), capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "holds no prompts" in error_of(replace(good, "--dataset", str(empty)), capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"\n')
    assert f"--dataset {bad}: skipped 1 of 1: 1 not valid JSON (line 1); nothing left to train on" in error_of(
        replace(good, "--dataset", str(bad)), capsys
    )
    assert not os.path.exists(good[-1])


def test_principle_file_that_is_empty(good, tmp_path, capsys):
    empty = tmp_path / "principle.txt"
    empty.write_text("  \n")
    assert "the file is empty" in error_of(good + ["--principle-file", str(empty)], capsys)


def test_every_prompt_too_long(good, capsys):
    err = error_of(good + ["--max-prompt-tokens", "2"], capsys)
    assert "skipped 1 of 1: 1 over 2 prompt tokens (line 1); nothing left to train on" in err


def test_output_dir_that_holds_a_model_is_refused_without_overwrite(good, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    err = error_of(good, capsys)
    assert "already holds a run (config.json); pass --resume to go on with it or --overwrite" in err
    assert os.listdir(out) == ["config.json"]


def test_vocabulary_mismatch(good, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    other = tmp_path / "other"
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_layer=1, n_embd=8, n_head=2)).save_pretrained(other)
    capsys.readouterr()
    err = error_of(good + ["--aligned-model", str(other)], capsys)
    assert "--aligned-model has a vocabulary of 50 tokens" in err


def test_resume_needs_a_complete_checkpoint_of_as_many_ranks(good, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert f"--resume: {out}/checkpoints holds no complete checkpoint" in error_of(good + ["--resume"], capsys)
    assert "give --resume (go on with the run) or --overwrite (replace it), not both" in error_of(
        good + ["--resume", "--overwrite"], capsys
    )
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"tag": "epoch-1", "epoch": 1, "world_size": 2}))
    assert (
        f"--resume: the checkpoint in {out}/checkpoints was written by 2 rank(s) and this run has 1; resume "
        "with 2" in error_of(good + ["--resume"], capsys)
    )
    monkeypatch.setenv("WORLD_SIZE", "2")  # as the deepspeed launcher sets it: the same check lets it through
    monkeypatch.setattr(iqstar, "read_prompts", lambda *a: sys.exit("checks passed"))
    with pytest.raises(SystemExit, match="checks passed"):
        iqstar.main(good + ["--resume"])


@pytest.mark.parametrize(
    "config, message",
    [
        ("{", "not valid JSON"),
        ('{"zero_optimization": {"stage": 2}}', 'iqstar.py expects ZeRO stage 3 or "auto"'),
    ],
)
def test_a_deepspeed_config_that_cannot_serve(good, tmp_path, capsys, config, message):
    path = tmp_path / "ds.json"
    path.write_text(config)
    assert f"--ds-config {path}: {message}" in error_of(good + ["--ds-config", str(path)], capsys)


def test_an_auto_value_iqstar_cannot_fill(capsys):
    args = iqstar.parse_args(["--model", "m"])
    config = iqstar.fill_ds_config({"bf16": {"enabled": "auto"}, "optimizer": {"params": {"lr": "auto"}}}, args, True)
    assert config == {"bf16": {"enabled": True}, "optimizer": {"params": {"lr": 1e-6}}}
    with pytest.raises(SystemExit):
        iqstar.fill_ds_config({"scheduler": {"params": {"warmup_max_lr": "auto"}}}, args, False)
    assert '--ds-config: iqstar.py fills "auto" only in' in capsys.readouterr().err


@pytest.mark.parametrize("world_size, zero3", [("1", False), ("2", True), ("64", True)])
def test_one_rank_runs_without_zero(monkeypatch, world_size, zero3):
    """ds_config.json as shipped: ZeRO-3 (and its own linear layer, which re-gathers weights for backward) on several
    ranks; one rank has nothing to shard, and runs at stage 0. A config that names stage 3 keeps it on one rank."""
    monkeypatch.setenv("WORLD_SIZE", world_size)
    args = iqstar.parse_args(["--model", "m"])
    config = iqstar.fill_ds_config(json.load(open(args.ds_config)), args, False)
    assert config["zero_optimization"]["stage"] == (3 if zero3 else 0)
    assert config["zero_optimization"]["memory_efficient_linear"] is zero3
    assert iqstar.fill_ds_config({"zero_optimization": {"stage": 3}}, args, False)["zero_optimization"]["stage"] == 3


def test_output_dir_that_is_a_file(good, tmp_path, capsys):
    (tmp_path / "out").write_text("")
    assert f"--output-dir {tmp_path / 'out'}: exists and is not a directory" in error_of(good, capsys)


def test_a_hub_dataset_that_cannot_be_loaded(good, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without the hub: fails at once
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read when it was imported, before this
    err = error_of(replace(good, "--dataset", "no-such-user/no-such-dataset"), capsys)
    assert err.startswith("iqstar.py: error: --dataset no-such-user/no-such-dataset: cannot load it from the hub (")


def test_a_tokenizer_with_no_eos(good, tiny_model, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = tmp_path / "no-eos"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(model)
    config = AutoConfig.from_pretrained(tiny_model)
    config.eos_token_id = None
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    capsys.readouterr()
    assert f"--model {model}: the tokenizer has no EOS token" in error_of(replace(good, "--model", str(model)), capsys)
