"""Chats as training sees them: which tokens are supervised in multi-turn chats, and rows a base's chat template
refuses."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from lora_assets.chat import tokenize_example
from lora_assets.clean import clean_dataset, read_split
from lora_assets.clean.rules import template_refuses_system
from lora_assets.spec import DatasetSpec


def _supervised_runs(example: dict) -> list[list[int]]:
    """The supervised token ids of one tokenized chat, as contiguous runs (one per supervised turn)."""
    runs, current = [], []
    for tok, label in zip(example["input_ids"], example["labels"], strict=True):
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == tok  # labels are the token itself, shifted inside the model
            current.append(tok)
    return runs + ([current] if current else [])


def test_every_assistant_turn_of_a_chat_is_supervised_and_nothing_else(random_base):
    tok = AutoTokenizer.from_pretrained(random_base)
    replies = ["the first answer", "a second, longer answer to that", "three"]
    chat = [{"role": "system", "content": "be brief"}]
    for i, reply in enumerate(replies):
        chat += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": reply}]
    example = tokenize_example(tok, chat, 512)
    runs = _supervised_runs(example)
    assert len(runs) == len(replies)  # one run per assistant turn, not only the last
    for run, reply in zip(runs, replies, strict=True):
        text = tok.decode(run)
        assert text.startswith(reply) and text[len(reply) :].strip() in (tok.eos_token, "<|im_end|>")
        per_turn = len(tok(reply, add_special_tokens=False)["input_ids"])
        assert per_turn <= len(run) <= per_turn + 1  # the reply's tokens, and the end-of-turn token
    supervised = sum(len(r) for r in runs)
    assert supervised == sum(label != -100 for label in example["labels"])
    for prompt in ("be brief", "question 0", "question 2"):  # system and user text never supervised
        assert prompt not in tok.decode([t for r in runs for t in r])


# Chat templates with rules, as their bases ship them (the Jinja of Gemma 2's and Mistral-7B-Instruct-v0.1's
# tokenizer_config.json, with their role names and markers): lorafoundry finds the rules by rendering, not by name.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("template", [GEMMA_TEMPLATE, MISTRAL_TEMPLATE], ids=["gemma", "mistral"])
def test_rows_the_base_template_refuses_are_quarantined_with_the_rule(tmp_path, random_base, template):
    tok = AutoTokenizer.from_pretrained(random_base)
    tok.chat_template = template
    assert template_refuses_system(tok)
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        },
        {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]},
        {  # the assistant speaks first: strict user/assistant alternation refuses it
            "messages": [
                {"role": "assistant", "content": "welcome"},
                {"role": "user", "content": "thanks"},
                {"role": "assistant", "content": "you are welcome"},
            ]
        },
    ]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = clean_dataset("d", DatasetSpec(path="d.jsonl", eval_fraction=0.01), src, tmp_path / "out", tok)
    assert report.rows_train + report.rows_eval == 1 and report.rows_quarantined == 2  # kept + quarantined = in
    assert report.by_reason == {"template_no_system_role": 1, "template_rejects_row": 1}
    (kept,) = read_split(report, "train") + read_split(report, "eval")
    tokenize_example(tok, kept["messages"], 128)  # what was kept renders in training too


def test_a_template_without_rules_keeps_system_messages(random_base):
    assert not template_refuses_system(AutoTokenizer.from_pretrained(random_base))
