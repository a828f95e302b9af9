"""One chat as a model sees it: rendered by the tokenizer's chat template into token ids, with labels on the
assistant's replies only (what training learns from and what evaluation scores the loss on)."""

from __future__ import annotations


def assistant_spans(tokenizer, messages: list[dict]) -> list[tuple[int, int]]:
    """(start, end) character offsets of each assistant reply in the rendered chat.

    A reply starts where the chat up to it, rendered with the generation prompt, ends, and stops where the chat
    rendered through it ends.
    """
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        # rstrip: the newline a template puts after the end-of-turn token is never generated, so no loss on it
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False).rstrip())
        spans.append((start, end))
    return spans


def tokenize_example(tokenizer, messages: list[dict], max_seq_len: int) -> dict:
    """Token ids and labels for one chat: labels are -100 everywhere except assistant replies.

    The chat template renders the whole conversation once; assistant spans (:func:`assistant_spans`) are mapped
    onto tokens by character offsets.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(s <= a < e for s, e in spans) else -100
        for tok, (a, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    ids = enc["input_ids"][:max_seq_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[:max_seq_len]}
