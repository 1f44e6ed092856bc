"""Prompts: HH parsing, the accepted .jsonl fields, and the two prompt formats."""
import json

import pytest
from transformers import AutoTokenizer

import iqstar
from iqstar import VICUNA_SYSTEM, hh_to_messages, load_conversations, prompt_text, row_to_messages

HH_CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Can I put Vick's on a baby?\n\nAssistant: No."
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Can I put Vick's on a baby?\n\nAssistant: Sure."


def test_hh_keeps_the_shared_conversation_and_drops_the_final_replies():
    messages = row_to_messages({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    assert messages == [{"role": "user", "content": "Hi there"},
                        {"role": "assistant", "content": "Hello! How can I help?"},
                        {"role": "user", "content": "Can I put Vick's on a baby?"}]
    assert hh_to_messages(HH_CHOSEN)[-1] == {"role": "assistant", "content": "No."}


def test_jsonl_fields():
    assert row_to_messages({"prompt": "hi"}) == [{"role": "user", "content": "hi"}]
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "an old reply"}]
    assert row_to_messages({"messages": conversation}) == conversation[:2]  # the policy writes its own reply
    for bad in ({"text": "hi"}, {"prompt": 3}, {"messages": [{"role": "bot", "content": "x"}]},
                {"messages": [{"role": "assistant", "content": "x"}]}, {"prompt": "  "}, ["a list"]):
        with pytest.raises(ValueError):
            row_to_messages(bad)


def test_bad_line_is_named(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(SystemExit) as e:
        load_conversations(str(path))
    assert e.value.code == 2
    assert f"{path}, line 3: has none of 'prompt', 'messages', 'chosen'/'rejected'" in capsys.readouterr().err
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(SystemExit):
        load_conversations(str(path))
    assert "line 2" in capsys.readouterr().err


def test_chat_template_puts_the_principle_in_a_system_message(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "how do i bake a cake"}]
    assert prompt_text(tokenizer, messages) == "<user> how do i bake a cake <assistant>"
    assert prompt_text(tokenizer, messages, "be safe") == "<system> be safe <user> how do i bake a cake <assistant>"


def test_vicuna_template_when_the_tokenizer_has_none(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "help me"}]
    assert prompt_text(tokenizer, messages) == f"{VICUNA_SYSTEM} USER: hi ASSISTANT: hello<eos>USER: help me ASSISTANT:"
    assert prompt_text(tokenizer, messages, "Be safe.").startswith(f"{VICUNA_SYSTEM} Be safe. USER: hi")


def test_default_principle_covers_the_five_points_of_appendix_c():
    p = iqstar.DEFAULT_PRINCIPLE.lower()
    for point in ("accurate", "harm", "keep working", "topic", "background"):
        assert point in p


def test_dataset_directory_takes_the_hub_loading_path(tmp_path):
    """The hub path (datasets.load_dataset, train split) on a local dataset folder in HH's format."""
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
            {"chosen": "\n\nHuman: Hello\n\nAssistant: Hi", "rejected": "\n\nHuman: Hello\n\nAssistant: Go away"}]
    folder = tmp_path / "hh"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    conversations = load_conversations(str(folder))
    assert conversations == [row_to_messages(rows[0]), [{"role": "user", "content": "Hello"}]]
    assert len(conversations[0]) == 3
