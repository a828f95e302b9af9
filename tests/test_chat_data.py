"""Chats as training sees them: which tokens are supervised in multi-turn chats, and rows a base's chat template
refuses."""

from __future__ import annotations

import json
from pathlib import Path

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


# --- tool calls -------------------------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def openai_tool_row(city: str, temp: int, answered: bool = True) -> dict:
    """A chat in OpenAI's shape: the assistant calls get_weather, the tool answers, the assistant replies."""
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }
    messages = [
        {"role": "user", "content": f"What is the weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    if answered:
        messages += [
            {"role": "tool", "tool_call_id": "c1", "content": f"{temp} degrees, sunny"},
            {"role": "assistant", "content": f"It is {temp} degrees and sunny in {city}."},
        ]
    return {"messages": messages, "tools": [WEATHER_TOOL]}


def sharegpt_tool_row(city: str, temp: int, answered: bool = True) -> dict:
    """The same chat in the ShareGPT convention LLaMA-Factory uses (function_call / observation, tools as a string)."""
    turns = [
        {"from": "human", "value": f"What is the weather in {city}?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": city}})},
    ]
    if answered:
        turns += [
            {"from": "observation", "value": f"{temp} degrees, sunny"},
            {"from": "gpt", "value": f"It is {temp} degrees and sunny in {city}."},
        ]
    return {"conversations": turns, "tools": json.dumps([WEATHER_TOOL["function"]])}


def _bad_tool_rows(fmt: str) -> list[tuple[dict, str]]:
    """Rows each breaking one tool rule, with the reason they must get."""
    if fmt == "messages":
        bad_args = openai_tool_row("Oslo", 3)
        bad_args["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{not json"
        orphan = {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "tool", "content": "r"},
                {"role": "assistant", "content": "ok"},
            ]
        }
        bad_tools = openai_tool_row("Rome", 20) | {"tools": "not a list"}
        return [(bad_args, "invalid_tool_call"), (orphan, "orphan_tool_result"), (bad_tools, "invalid_tools")]
    nameless = sharegpt_tool_row("Oslo", 3)
    nameless["conversations"][1]["value"] = json.dumps({"arguments": {"city": "Oslo"}})
    orphan = {
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "observation", "value": "r"},
            {"from": "gpt", "value": "ok"},
        ]
    }
    return [(nameless, "invalid_tool_call"), (orphan, "orphan_tool_result")]


@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_tool_call_rows_in_both_formats_are_cleaned_and_every_row_accounted_for(tmp_path, random_base, fmt):
    make = openai_tool_row if fmt == "messages" else sharegpt_tool_row
    good = [make(c, t, answered=i % 2 == 0) for i, (c, t) in enumerate([("Paris", 18), ("Lima", 25), ("Oslo", 3)])]
    bad = _bad_tool_rows(fmt)
    dup = [good[0]]
    src = tmp_path / "tools.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in good + [r for r, _ in bad] + dup))
    tok = AutoTokenizer.from_pretrained(random_base)
    report = clean_dataset("t", DatasetSpec(path="tools.jsonl", eval_fraction=0.01), src, tmp_path / "out", tok)
    assert report.detected_format == fmt
    kept = read_split(report, "train") + read_split(report, "eval")
    assert len(kept) + report.rows_quarantined == report.rows_in == len(good) + len(bad) + 1
    expected = {}
    for _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    assert report.by_reason == expected | {"duplicate": 1}
    paris = next(r for r in kept if "Paris" in r["messages"][0]["content"])
    assert paris["messages"][1]["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert paris["messages"][2]["role"] == "tool" and paris["tools"][0]["function"]["name"] == "get_weather"


# A template that renders tools itself (the shape of Qwen2.5's: tools in the system turn, <tool_call> JSON in the
# assistant turn, results in <tool_response>), against the built-in ones that do not.
NATIVE_TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|end|>\n"
    "{% endif %}{% for m in messages %}{% if m.role == 'assistant' %}<|assistant|>\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}</tool_call>{% endfor %}<|end|>\n{% elif m.role == 'tool' %}<|user|>\n<tool_response>{{ m.content }}"
    "</tool_response><|end|>\n{% else %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.mark.parametrize("native", [False, True], ids=["written-out", "native"])
def test_tool_call_turns_are_supervised_and_tool_results_and_the_tool_list_are_not(random_base, native):
    from lora_assets.chat import renders_tools

    tok = AutoTokenizer.from_pretrained(random_base)
    if native:
        tok.chat_template = NATIVE_TOOLS_TEMPLATE
    assert renders_tools(tok) == native
    row = openai_tool_row("Paris", 18)
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
        {"role": "tool", "content": "18 degrees, sunny"},
        {"role": "assistant", "content": "It is 18 degrees and sunny in Paris."},
    ]
    example = tokenize_example(tok, messages, 1024, row["tools"])
    runs = [tok.decode(r) for r in _supervised_runs(example)]
    assert len(runs) == 2  # the tool-call turn and the final answer
    assert "get_weather" in runs[0] and '"city": "Paris"' in runs[0].replace('":"', '": "')
    assert runs[1].startswith("It is 18 degrees and sunny in Paris.")
    supervised = "".join(runs)
    assert "18 degrees, sunny" not in supervised and "What is the weather" not in supervised
    assert "parameters" not in supervised  # the tool list is context, never a target
    text = tok.decode(example["input_ids"])
    assert "18 degrees, sunny" in text and "parameters" in text  # yet both are in what the model reads


def test_tool_calls_are_scored_by_name_and_arguments_whatever_the_markers():
    from lora_assets.chat import parse_tool_calls, tool_call_scores

    ref = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}]
    hermes = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
    assert tool_call_scores(hermes, ref) == {"tool_name": 1.0, "tool_args_exact": 1.0, "tool_args_fields": 1.0}
    mistral = '[TOOL_CALLS][{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"unit\\": \\"F\\"}"}]'
    assert tool_call_scores(mistral, ref) == {"tool_name": 1.0, "tool_args_exact": 0.0, "tool_args_fields": 0.5}
    assert tool_call_scores("It is sunny.", ref)["tool_name"] == 0.0
    assert parse_tool_calls('{"name": "x"} then {"function": {"name": "f", "arguments": {}}}') == [
        {"name": "f", "arguments": {}}
    ]


def test_the_readme_examples_of_each_format_are_kept(tmp_path, random_base):
    """Every example line under README "Data formats" cleans to a kept row, in its own format."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Data formats", 1)[1].split("### Cleaning", 1)[0]
    lines = [ln for block in section.split("```jsonl")[1:] for ln in block.split("```")[0].strip().splitlines()]
    assert len(lines) == 7
    tok = AutoTokenizer.from_pretrained(random_base)
    for i, line in enumerate(lines):
        src = tmp_path / f"r{i}.jsonl"
        src.write_text(line + "\n")
        report = clean_dataset(f"r{i}", DatasetSpec(path=src.name, eval_fraction=0.01), src, tmp_path / "out", tok)
        assert report.rows_quarantined == 0, (line, report.by_reason)


def test_hostile_tool_data_is_quarantined_never_a_crash(tmp_path):
    deep = "[" * 200_000 + "]" * 200_000  # past Python's recursion limit when parsed
    user = {"role": "user", "content": "x"}
    rows = [
        {
            "messages": [
                user,
                {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": deep}}]},
            ]
        },
        {"messages": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "z"}], "tools": deep},
        {"messages": [{"role": "user", "content": "y2"}, {"role": "assistant", "content": None, "tool_calls": "no"}]},
        {
            "messages": [
                {"role": "user", "content": "y3"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": " "}}]},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "y4"},
                {"role": "user", "content": "u", "tool_calls": [{"name": "f", "arguments": {}}]},
                {"role": "assistant", "content": "a"},
            ]
        },
        {"messages": [{"role": "user", "content": "plain"}, {"role": "assistant", "content": "ok", "tool_calls": []}]},
    ]
    src = tmp_path / "h.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = clean_dataset("h", DatasetSpec(path="h.jsonl", eval_fraction=0.01), src, tmp_path / "out")
    assert report.by_reason == {"invalid_tool_call": 4, "invalid_tools": 1}
    (kept,) = read_split(report, "train") + read_split(report, "eval")
    assert kept["messages"][1] == {"role": "assistant", "content": "ok"}  # `tool_calls: []` is a plain turn


@pytest.mark.parametrize("mode", ["redact", "quarantine", "off"])
def test_pii_in_tool_call_arguments_is_found_like_pii_in_text(tmp_path, mode):
    args = {"to": "bob@example.com", "host": "10.0.0.1", "count": 5}
    row = openai_tool_row("Paris", 18)
    row["messages"][1]["tool_calls"][0]["function"]["arguments"] = json.dumps(args)
    clean = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps(row) + "\n" + json.dumps(clean) + "\n")
    report = clean_dataset("p", DatasetSpec(path="p.jsonl", eval_fraction=0.01, pii=mode), src, tmp_path / "out")
    kept = read_split(report, "train") + read_split(report, "eval")
    calls = [m["tool_calls"] for r in kept for m in r["messages"] if m.get("tool_calls")]
    if mode == "redact":
        assert report.pii_redactions == {"email": 1, "ipv4": 1}
        assert calls == [[{"name": "get_weather", "arguments": {"to": "<EMAIL>", "host": "<IPV4>", "count": 5}}]]
    elif mode == "quarantine":
        assert report.by_reason == {"pii": 1} and calls == []
    else:
        assert calls == [[{"name": "get_weather", "arguments": args}]] and report.pii_redactions == {}
