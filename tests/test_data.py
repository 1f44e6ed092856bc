"""Prompts: HH parsing, the accepted .jsonl fields, and the two prompt formats."""

import json
import random

import pytest
from transformers import AutoTokenizer

import iqstar
from iqstar import VICUNA_SYSTEM, build_prompts, format_prompt, load_conversations, row_to_messages, skip_report


def prompt_text(tokenizer, messages, principle=None):
    return format_prompt(tokenizer, messages, principle, tokenize=False)


HH_CHOSEN = (
    "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Can I put Vick's on a baby?\n\nAssistant: No."
)
HH_REJECTED = (
    "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Can I put Vick's on a baby?\n\nAssistant: Sure."
)


def test_hh_keeps_the_shared_conversation_and_drops_the_final_replies():
    messages = row_to_messages({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    assert messages == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Can I put Vick's on a baby?"},
    ]
    assert row_to_messages({"chosen": HH_CHOSEN + "\n\nHuman: Thanks"})[-2:] == [
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "Thanks"},
    ]


def test_jsonl_fields():
    assert row_to_messages({"prompt": "hi"}) == [{"role": "user", "content": "hi"}]
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "an old reply"},
    ]
    assert row_to_messages({"messages": conversation}) == conversation[:2]  # the policy writes its own reply
    for bad in (
        {"text": "hi"},
        {"prompt": 3},
        {"messages": [{"role": "bot", "content": "x"}]},
        {"messages": [{"role": "assistant", "content": "x"}]},
        {"prompt": "  "},
        ["a list"],
    ):
        with pytest.raises(ValueError):
            row_to_messages(bad)


def test_bad_lines_are_skipped_and_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        json.dumps({"prompt": "ok"}).encode()
        + b"\n\n"
        + json.dumps({"question": "x"}).encode()
        + b'\n{"prompt": "\xff\xfe"}\n{"prompt": "also ok"}\n'
    )
    conversations, skipped = load_conversations(str(path))
    assert conversations == [
        ("line 1", [{"role": "user", "content": "ok"}]),
        ("line 5", [{"role": "user", "content": "also ok"}]),
    ]
    assert skipped == [
        ("line 3", "has none of 'prompt', 'messages', 'chosen'/'rejected'"),
        ("line 4", "not UTF-8 text"),
    ]
    assert skip_report(str(path), skipped, 4) == (
        f"--dataset {path}: skipped 2 of 4: 1 has none of 'prompt', "
        "'messages', 'chosen'/'rejected' (line 3); 1 not UTF-8 text (line 4)"
    )


def user(text):
    return {"role": "user", "content": text}


# Hostile lines: what each must become. A list of messages: used, as that conversation; a string: skipped, that reason.
HOSTILE = [
    (b'{"prompt": "fine"', "not valid JSON"),
    (b'{"prompt": "fine"} trailing', "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'"just a string"', "not a JSON object"),
    (b"null", "not a JSON object"),
    (b"1e999", "not a JSON object"),
    (b'{"prompt": 3}', "'prompt' is not a string"),
    (b'{"prompt": ["a"]}', "'prompt' is not a string"),
    (b'{"prompt": ""}', "no user turn to answer"),
    (b'{"prompt": " \\n\\t "}', "no user turn to answer"),
    (b'{"messages": "hi"}', "'messages' is not a list"),
    (b'{"messages": [{"role": "tool", "content": "x"}]}', "'messages' is not a list"),
    (b'{"messages": [{"role": "user", "content": null}]}', "'messages' is not a list"),
    (b'{"messages": [{"role": "user"}]}', "'messages' is not a list"),
    (b'{"messages": [["user", "hi"]]}', "'messages' is not a list"),
    (b'{"messages": []}', "no user turn to answer"),
    (b'{"messages": [{"role": "system", "content": "be kind"}]}', "no user turn to answer"),
    (
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
        b'{"role": "user", "content": "c"}]}',
        "a system message after the first turn",
    ),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', [user("a")]),
    (b'{"messages": [{"role": "user", "content": "a", "name": "x"}]}', [user("a")]),
    (b'{"prompt": "caf\xe9"}', "not UTF-8 text"),
    (b'\xff\xfe{"prompt": "x"}', "not UTF-8 text"),
    (b'{"prompt": "\\ud800"}', "not UTF-8 text"),
    (b'{"prompt": "tab\\there \\u00e9\\u0000"}', [user("tab\there \u00e9\u0000")]),
    (b"[" * 100000 + b"]" * 100000, "JSON nested too deeply"),
    (b'{"question": "x"}', "has none of 'prompt', 'messages', 'chosen'/'rejected'"),
    (b'{"chosen": "no speaker markers at all"}', "no user turn to answer"),
    (b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo"}', [user("hi")]),
    (b'{"prompt": "hi", "messages": 5}', [user("hi")]),
    (b'{"prompt": null, "messages": [{"role": "user", "content": "m"}]}', [user("m")]),
    (b'{"prompt": "' + b"word " * 3000 + b'"}', "over 200 prompt tokens"),
]


def test_hostile_lines_are_used_correctly_or_reported_with_their_line(tiny_model, tmp_path):
    """Fuzz: known hostile lines plus random byte damage to good ones; every line is used as written or skipped,
    with its line number and reason, and nothing raises."""
    rng = random.Random(0)
    good = [json.dumps({"prompt": f"question {i}"}).encode() for i in range(20)]
    lines, expected = [], {}
    for i in range(300):
        if i % 3 == 0:
            line, outcome = rng.choice(HOSTILE)
        else:
            line = bytearray(rng.choice(good))
            for _ in range(rng.randint(0, 3)):  # delete, insert or overwrite a random byte
                at = rng.randrange(len(line))
                kind = rng.randrange(3)
                if kind == 0:
                    del line[at]
                elif kind == 1:
                    line.insert(at, rng.randrange(256))
                else:
                    line[at] = rng.randrange(256)
            line, outcome = bytes(line).replace(b"\n", b" "), None  # None: decided below, from the line itself
        lines.append(line)
        expected[f"line {len(lines)}"] = outcome
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    conversations, skipped = load_conversations(str(path))
    prompts, unusable = build_prompts(conversations, tokenizer, "be safe", 200)
    skipped += unusable
    used = [where for where, _ in conversations if where not in dict(unusable)]
    assert sorted(used + [w for w, _ in skipped]) == sorted(
        w for w, line in zip(expected, lines, strict=True) if line.strip()
    )
    assert len(prompts) == len(used)
    reasons = dict(skipped)
    for (where, messages), prompt in zip([c for c in conversations if c[0] in used], prompts, strict=True):
        outcome = expected[where]
        if isinstance(outcome, list):
            assert messages == outcome, where
        elif outcome is None:  # a damaged good line that still parses must say what it says
            assert messages == row_to_messages(json.loads(lines[int(where.split()[1]) - 1].decode())), where
        else:
            raise AssertionError(f"{where} should be skipped ({outcome}), was used")
        assert prompt[0] == iqstar.format_prompt(tokenizer, messages)
        assert prompt[1] == iqstar.format_prompt(tokenizer, messages, "be safe")
    for where, outcome in expected.items():
        if isinstance(outcome, str):
            assert reasons.get(where, "").startswith(outcome), (where, reasons.get(where))
    assert {w for w, o in expected.items() if o is None} & set(reasons)  # some damage was caught, not all


def test_a_template_that_rejects_a_conversation_skips_it(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m.content }} {% endfor %}"
    )
    prompts, skipped = build_prompts([("line 1", [user("hi")])], tokenizer, "be safe", None)
    assert prompts == [] and skipped == [("line 1", "the chat template rejects it (System role not supported)")]
    prompts, skipped = build_prompts([("line 1", [user("hi")])], tokenizer, None, None)  # an aligned π_w: no system
    assert len(prompts) == 1 and prompts[0][0] == prompts[0][1] and skipped == []


def test_chat_template_puts_the_principle_in_a_system_message(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "how do i bake a cake"}]
    assert prompt_text(tokenizer, messages) == "<user> how do i bake a cake <assistant>"
    assert prompt_text(tokenizer, messages, "be safe") == "<system> be safe <user> how do i bake a cake <assistant>"


def test_vicuna_template_when_the_tokenizer_has_none(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = None
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "help me"},
    ]
    assert prompt_text(tokenizer, messages) == f"{VICUNA_SYSTEM} USER: hi ASSISTANT: hello<eos>USER: help me ASSISTANT:"
    assert prompt_text(tokenizer, messages, "Be safe.").startswith(f"{VICUNA_SYSTEM} Be safe. USER: hi")


def test_default_principle_covers_the_five_points_of_appendix_c():
    p = iqstar.DEFAULT_PRINCIPLE.lower()
    for point in ("accurate", "harm", "keep working", "topic", "background"):
        assert point in p


def test_dataset_directory_takes_the_hub_loading_path(tmp_path):
    """The hub path (datasets.load_dataset, train split) on a local dataset folder in HH's format."""
    rows = [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"chosen": "\n\nHuman: Hello\n\nAssistant: Hi", "rejected": "\n\nHuman: Hello\n\nAssistant: Go away"},
    ]
    folder = tmp_path / "hh"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    conversations, skipped = load_conversations(str(folder))
    assert conversations == [("row 0", row_to_messages(rows[0])), ("row 1", [{"role": "user", "content": "Hello"}])]
    assert len(conversations[0][1]) == 3 and skipped == []


# SmolLM2's and Qwen2.5's templates write a system message of their own into a conversation that has none
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0].role != 'system' %}<system> you are a bot {% endif %}"
    "{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_the_principle_is_added_to_the_system_message_pi_l_sees(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    messages = [{"role": "user", "content": "hi"}]
    assert prompt_text(tokenizer, messages) == "<system> you are a bot <user> hi <assistant>"
    # π_w's prompt is π_l's plus the principle: the template's default system message is kept, not replaced
    assert prompt_text(tokenizer, messages, "be safe") == "<system> you are a bot\n\nbe safe <user> hi <assistant>"
    with_system = [{"role": "system", "content": "be brief"}] + messages  # the dataset's own system message
    assert prompt_text(tokenizer, with_system) == "<system> be brief <user> hi <assistant>"
    assert prompt_text(tokenizer, with_system, "be safe") == "<system> be brief\n\nbe safe <user> hi <assistant>"
    tokenizer.chat_template = None  # Vicuna's: its system line, the dataset's system message, then the principle
    assert prompt_text(tokenizer, with_system, "Be safe.").startswith(f"{VICUNA_SYSTEM} be brief\n\nBe safe. USER: hi")
