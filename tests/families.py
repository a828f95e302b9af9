"""Small random-weight models of each decoder family vLLM serves with LoRA, built from their configs here (nothing
is downloaded): a 2-layer model per family with the tokenizer of the given model dir, saved as a local HF dir.

Each config keeps what makes the family itself (Qwen2's q/k/v biases, Qwen3's and OLMo 2's q/k norms, Gemma's
scaled embeddings, soft-capping and sliding windows, Phi-3's fused qkv_proj and gate_up_proj, Granite's
multipliers) and shrinks the rest: hidden 64, 2 heads of 32 (one shared KV head where the family has GQA), 2 layers.
Weights are drawn with a wider spread than the families' own init (0.1 instead of 0.02) so that the logits of a
random model have clear winners, and greedy tokens compare between implementations without near-ties.
"""

from __future__ import annotations

from pathlib import Path

#: family -> (architecture, the family's config class in transformers, fields that shape it here)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {}),
    # Gemma ties its output head to the embeddings (vLLM's Gemma has no lm_head to load)
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"query_pre_attn_scalar": 32, "sliding_window": 128, "tie": True}),
    "gemma3": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        {"query_pre_attn_scalar": 32, "sliding_window": 128, "tie": True},
    ),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {}),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {}),
    "granite": ("GraniteForCausalLM", "GraniteConfig", {}),
}


def build_family_model(family: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """A random-weight 2-layer model of ``family`` with ``tokenizer_dir``'s tokenizer, saved to ``out``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, config_cls, fields = FAMILIES[family]
    fields = dict(fields)
    tie = fields.pop("tie", False)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = getattr(transformers, config_cls)(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=[arch],
        **fields,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert type(model).__name__ == arch, (family, type(model).__name__)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
