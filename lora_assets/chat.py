"""One chat as a model sees it: rendered by the tokenizer's chat template into token ids, with labels on the
assistant's turns only (what training learns from and what evaluation scores the loss on).

A cleaned row is ``{"messages": [...], "tools": [...] | None}``. A message has a ``role`` (system, user, assistant,
tool) and a ``content``; an assistant turn that calls tools also has ``tool_calls`` (``[{"name", "arguments"}]``,
arguments a JSON object), and a tool result may carry the ``tool_call_id`` it answers. Every assistant turn is
supervised, tool-call turns included; system, user and tool turns and the tool list never are.

Templates that render tools (Qwen2.5's, Llama 3.1's, Mistral's, ...) get them as transformers passes them: ``tools``
and OpenAI-shaped ``tool_calls``. A template that does not (SmolLM2's, ``builtin:tiny``'s: found by rendering a
probe, :func:`renders_tools`) gets them written out in the Hermes convention that Qwen2.5's own template uses, so
nothing is lost: the tool list as JSON inside ``<tools></tools>`` in the system message, each call as
``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` in the assistant turn, each result inside
``<tool_response></tool_response>`` in a ``tool`` turn.
"""

from __future__ import annotations

import json
import weakref

_PROBE_FN, _PROBE_TOOL = "lorafoundry_probe_call", "lorafoundry_probe_tool"
_native_tools: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a tool list and an assistant's tool call (both names appear
    in a probe chat's text); cached per tokenizer."""
    if tokenizer in _native_tools:
        return _native_tools[tokenizer]
    chat = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [_openai_call({"name": _PROBE_FN, "arguments": {}}, 0)]},
        {"role": "tool", "content": "ok", "tool_call_id": "call0"},
        {"role": "assistant", "content": "done"},
    ]
    tools = [{"type": "function", "function": {"name": _PROBE_TOOL, "parameters": {"type": "object"}}}]
    try:
        text = tokenizer.apply_chat_template(chat, tools=tools, tokenize=False)
        native = _PROBE_FN in text and _PROBE_TOOL in text
    except Exception:  # noqa: BLE001 - a template that raises on tools does not render them
        native = False
    _native_tools[tokenizer] = native
    return native


def _openai_call(call: dict, i: int) -> dict:
    return {"id": f"call{i}", "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


def tool_call_text(calls: list[dict]) -> str:
    """Tool calls in the Hermes convention: one ``<tool_call>`` JSON object per call."""
    return "\n".join(
        "<tool_call>\n"
        + json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)
        + "\n</tool_call>"
        for c in calls
    )


def reference_text(message: dict) -> str:
    """What an assistant turn says, as text for the text metrics: its content, and its tool calls written out as
    :func:`tool_call_text` does."""
    if not message.get("tool_calls"):
        return message["content"]
    text = tool_call_text(message["tool_calls"])
    return f"{message['content']}\n{text}" if message["content"] else text


def template_messages(tokenizer, messages: list[dict], tools: list | None) -> tuple[list[dict], list | None]:
    """The messages (and tools) as the chat template is given them: tool calls passed on natively where the template
    renders tools, else written out as text (module docstring). Plain chats pass through unchanged."""
    has_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not has_tools:
        return [{"role": m["role"], "content": m["content"]} for m in messages], None
    if renders_tools(tokenizer):
        out = []
        for i, m in enumerate(messages):
            msg = {"role": m["role"], "content": m["content"]}
            if m.get("tool_calls"):
                msg["tool_calls"] = [_openai_call(c, f"{i}_{j}") for j, c in enumerate(m["tool_calls"])]
            if m["role"] == "tool" and m.get("tool_call_id"):
                msg["tool_call_id"] = m["tool_call_id"]
            out.append(msg)
        return out, tools
    out = [_as_text(m) for m in messages]
    if tools:
        listing = "You can call these tools:\n<tools>\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        listing += "\n</tools>"
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + listing}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out, None


def _as_text(m: dict) -> dict:
    if m.get("tool_calls"):
        return {"role": m["role"], "content": reference_text(m)}
    if m["role"] == "tool":
        return {"role": "tool", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
    return {"role": m["role"], "content": m["content"]}


def render(tokenizer, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
    """The chat as text, through the base's chat template (tools as :func:`template_messages` gives them)."""
    msgs, tls = template_messages(tokenizer, messages, tools)
    kwargs = {"tools": tls} if tls else {}
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def assistant_spans(tokenizer, messages: list[dict], tools: list | None = None) -> list[tuple[int, int]]:
    """(start, end) character offsets of each assistant turn in the rendered chat.

    A turn starts where the chat up to it, rendered with the generation prompt, ends, and stops where the chat
    rendered through it ends.
    """
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], tools, add_generation_prompt=True))
        # rstrip: the newline a template puts after the end-of-turn token is never generated, so no loss on it
        end = len(render(tokenizer, messages[: i + 1], tools).rstrip())
        spans.append((start, end))
    return spans


def tokenize_example(tokenizer, messages: list[dict], max_seq_len: int, tools: list | None = None) -> dict:
    """Token ids and labels for one chat: labels are -100 everywhere except assistant turns.

    The chat template renders the whole conversation once; assistant spans (:func:`assistant_spans`) are mapped
    onto tokens by character offsets.
    """
    text = render(tokenizer, messages, tools)
    spans = assistant_spans(tokenizer, messages, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(s <= a < e for s, e in spans) else -100
        for tok, (a, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    ids = enc["input_ids"][:max_seq_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[:max_seq_len]}


def parse_tool_calls(text: str) -> list[dict]:
    """The tool calls a model wrote, whatever its template's markers (``<tool_call>``, ``[TOOL_CALLS]``, bare
    JSON): every JSON object in the text with a string ``name`` and object ``arguments`` (or ``parameters``, or an
    OpenAI ``function`` holding them), in order."""
    decoder, calls, i = json.JSONDecoder(), [], text.find("{")
    while i != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        for obj in value if isinstance(value, list) else [value]:
            fn = obj.get("function", obj) if isinstance(obj, dict) else None
            args = fn.get("arguments", fn.get("parameters")) if isinstance(fn, dict) else None
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    args = None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(args, dict):
                calls.append({"name": fn["name"], "arguments": args})
        i = text.find("{", end)
    return calls


def tool_call_scores(output: str, reference: list[dict]) -> dict[str, float]:
    """How well ``output`` makes the reference's first tool call: the function name matches (0/1), the arguments
    match exactly (0/1), and the share of the reference's argument fields given with the same value."""
    want = reference[0]
    got = next(iter(parse_tool_calls(output)), None)
    if got is None:
        return {"tool_name": 0.0, "tool_args_exact": 0.0, "tool_args_fields": 0.0}
    fields = want["arguments"]
    same = sum(got["arguments"].get(k) == v for k, v in fields.items())
    return {
        "tool_name": float(got["name"] == want["name"]),
        "tool_args_exact": float(got["name"] == want["name"] and got["arguments"] == fields),
        "tool_args_fields": same / len(fields) if fields else float(got["arguments"] == fields),
    }
