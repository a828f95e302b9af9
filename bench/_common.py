"""Shared by the training benchmarks: a randomly initialised Llama of a chosen size, and chat data whose lengths
vary like public instruction sets do. Throughput and memory do not depend on what a model knows."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

SIZES = {  # name: (hidden, layers, intermediate, heads)
    "4m": (256, 4, 768, 4),
    "30m": (512, 8, 1408, 8),
    "150m": (1024, 12, 2816, 16),
    "1b": (2048, 16, 5632, 32),
}


def random_llama(out: Path, size: str) -> Path:
    """A random Llama with the built-in tokenizer, saved as a local HF model dir (bf16 safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_assets import builtin

    if (out / "config.json").exists():
        return out
    hidden, layers, inter, heads = SIZES[size]
    tokenizer = builtin.build_tokenizer(list(builtin.corpus_documents(2000, seed=1)), vocab_size=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def mixed_length_rows(
    n: int, seed: int = 3, median_words: int = 60, sigma: float = 0.9, max_words: int = 400
) -> list[dict]:
    """Two-turn chats with log-normal answer lengths (median ~60 words, long tail), like Alpaca-style data."""
    from lora_assets import builtin

    rng = random.Random(seed)
    words = [*builtin.NOUNS, *builtin.POSITIVE, *builtin.NEGATIVE]
    rows = []
    for i in range(n):
        k = min(max_words, max(3, int(rng.lognormvariate(math.log(median_words), sigma))))
        q = f"question {i}: describe the " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 20)))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(k))},
                ]
            }
        )
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bench_spec(base: str, data: Path, **adapter):
    """A pipeline spec for one dataset and one adapter (`bench`), cleaned and trained like any other."""
    from lora_assets.spec import validate_spec

    return validate_spec(
        {
            "base_model": base,
            "datasets": {"bench": {"path": str(data), "eval_fraction": 0.05, "min_train_rows": 1}},
            "adapters": {"bench": {"dataset": "bench", **adapter}},
        }
    )
