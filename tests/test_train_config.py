"""Training configuration problems found before any weights load, and advice that does not stop a run."""

from __future__ import annotations

import json
from pathlib import Path

from lora_assets.architectures import linear_layers, resolve_target_modules
from lora_assets.base_model import resolve_base_model
from lora_assets.home import Home
from lora_assets.pipeline import Pipeline
from lora_assets.spec import AdapterSpec, SpecError, validate_spec
from lora_assets.train import preflight, training_warnings

LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _config_only_base(tmp_path, model_type: str, **fields) -> Path:
    """A model dir holding only a tiny config.json of one family: enough for anything that reads modules."""
    from transformers import AutoConfig

    d = tmp_path / model_type
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, vocab_size=256)
    small |= dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    AutoConfig.for_model(model_type, **small, **fields).save_pretrained(d)
    return d


def test_all_linear_is_read_from_the_base_not_a_list_of_llama_names(tmp_path, random_base):
    assert linear_layers(random_base) == (LLAMA_LINEAR, ["lm_head"])  # inside the blocks, the output head
    phi3 = _config_only_base(tmp_path, "phi3", architectures=["Phi3ForCausalLM"])
    assert resolve_target_modules("all-linear", phi3) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    neox = _config_only_base(tmp_path, "gpt_neox")
    assert resolve_target_modules("all-linear", neox) == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    assert resolve_target_modules(["q_proj"], random_base) == ["q_proj"]  # an explicit list is kept as written


def test_preflight_names_the_field_the_value_and_the_fix(tmp_path, random_base):
    base = resolve_base_model(str(random_base), tmp_path)
    assert preflight("adapters.a", AdapterSpec(dataset="d"), base) == []
    (msg,) = preflight("adapters.a", AdapterSpec(dataset="d", target_modules=["q_proj", "query_key_value"]), base)
    assert msg.startswith("adapters.a.target_modules:") and "query_key_value" in msg and "all-linear" in msg
    (head,) = preflight("adapters.a", AdapterSpec(dataset="d", target_modules=["q_proj", "lm_head"]), base)
    assert "['lm_head']" in head and "outside the decoder blocks" in head and "vLLM" in head and "Fix:" in head


def test_a_phi3_base_passes_preflight_with_the_default_and_fails_with_llama_names(tmp_path):
    base = resolve_base_model(str(_config_only_base(tmp_path, "phi3", architectures=["Phi3ForCausalLM"])), tmp_path)
    assert preflight("adapters.a", AdapterSpec(dataset="d"), base) == []  # all-linear: the first bullet
    (msg,) = preflight("adapters.a", AdapterSpec(dataset="d", target_modules=["q_proj", "v_proj"]), base)
    assert "['q_proj', 'v_proj']" in msg and "qkv_proj" in msg


def test_a_family_not_tested_with_vllm_lora_gets_advice_not_a_refusal(tmp_path):
    base = resolve_base_model(
        str(_config_only_base(tmp_path, "gpt_neox", architectures=["GPTNeoXForCausalLM"])), tmp_path
    )
    assert preflight("adapters.a", AdapterSpec(dataset="d"), base) == []
    (advice,) = training_warnings(AdapterSpec(dataset="d"), 500, base)
    assert "GPTNeoXForCausalLM" in advice and "LlamaForCausalLM" in advice


def test_pipeline_preflight_collects_every_adapter(tmp_path, random_base):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    spec = validate_spec(
        {
            "base_model": str(random_base),
            "datasets": {"d": {"path": "d.jsonl"}},
            "adapters": {
                "a": {"dataset": "d", "target_modules": ["c_attn"]},
                "b": {"dataset": "d", "sweep": {"target_modules": [["q_proj"], ["wq"]]}},
            },
        },
        tmp_path,
    )
    try:
        Pipeline(spec, tmp_path / "home").preflight()
        raise AssertionError("expected a SpecError")
    except SpecError as e:
        assert len(e.problems) == 2
        assert any(p.startswith("adapters.a.target_modules") for p in e.problems)
        assert any(p.startswith("adapters.b (sweep point b.p1).target_modules") for p in e.problems)
    assert not (tmp_path / "home" / "datasets").exists()  # nothing was cleaned


def test_training_warnings():
    assert training_warnings(AdapterSpec(dataset="d"), 500) == []
    (alpha,) = training_warnings(AdapterSpec(dataset="d", r=16, lora_alpha=128), 5000)
    assert "alpha/r" in alpha and "8" in alpha
    (rank,) = training_warnings(AdapterSpec(dataset="d", r=128), 300)
    assert "r=128" in rank and "300" in rank


def test_packed_batch_gives_the_padded_loss(tmp_path, random_base):
    """Packing changes the layout only: the loss equals the padded batch's, so no example saw another."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from lora_assets.batching import PackingCollator
    from lora_assets.chat import tokenize_example

    tok = AutoTokenizer.from_pretrained(random_base)
    model = AutoModelForCausalLM.from_pretrained(random_base, dtype=torch.float32).eval()
    chats = [
        [
            {"role": "user", "content": f"question {i} " + "word " * (i % 5)},
            {"role": "assistant", "content": f"answer {i}"},
        ]
        for i in range(6)
    ]
    feats = [tokenize_example(tok, c, 128) for c in chats]
    packer = PackingCollator(tok.pad_token_id, max_len=64, attention_width=float("inf"))  # always pack
    packed = packer([dict(f) for f in feats])
    assert packed["input_ids"].shape[0] < len(feats) and "attention_mask" not in packed
    padded = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)([dict(f) for f in feats])
    with torch.no_grad():
        loss_packed = model(**packed, use_cache=False).loss  # a KV cache turns the packed-sequence mask off
        loss_padded = model(**padded, use_cache=False).loss
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-4, atol=1e-5)
    # and the mask really matters: the same packed rows without position resets give a different loss
    with torch.no_grad():
        crossed = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False).loss
    assert abs(float(crossed) - float(loss_packed)) > 1e-3
    assert 0 <= 1 - packer.real_tokens / packer.row_tokens < 0.5


def test_train_split_is_tokenized_once_and_cached(tmp_path, random_base):
    from transformers import AutoTokenizer

    from lora_assets.batching import tokenized_train_split
    from lora_assets.chat import tokenize_example
    from lora_assets.clean import clean_dataset
    from lora_assets.spec import DatasetSpec

    rows = [{"prompt": f"q{i}?", "completion": f"a{i}"} for i in range(50)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = AutoTokenizer.from_pretrained(random_base)
    clean = clean_dataset("d", DatasetSpec(path="d.jsonl"), tmp_path / "d.jsonl", tmp_path / "datasets", tok)
    base = resolve_base_model(str(random_base), tmp_path)
    first, hit1 = tokenized_train_split(tok, base, clean, 64, tmp_path / "tokenized")
    second, hit2 = tokenized_train_split(tok, base, clean, 64, tmp_path / "tokenized")
    assert (hit1, hit2) == (False, True) and first == second and len(first) == clean.rows_train
    assert first[0] == tokenize_example(
        tok, __import__("lora_assets.clean", fromlist=["read_split"]).read_split(clean, "train")[0]["messages"], 64
    )
    _, other = tokenized_train_split(tok, base, clean, 32, tmp_path / "tokenized")
    assert other is False  # another max_seq_len is another key
    assert not [p for p in (tmp_path / "tokenized").iterdir() if ".tmp" in p.name]  # no temp file left behind


def test_train_adapter_checks_its_settings_before_tokenizing(tmp_path, random_base):
    import pytest
    from transformers import AutoTokenizer

    from lora_assets.clean import clean_dataset
    from lora_assets.spec import DatasetSpec
    from lora_assets.train import train_adapter

    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "p?", "completion": "c"}) + "\n")
    tok = AutoTokenizer.from_pretrained(random_base)
    clean = clean_dataset("d", DatasetSpec(path="d.jsonl"), tmp_path / "d.jsonl", tmp_path / "datasets", tok)
    base = resolve_base_model(str(random_base), tmp_path)
    bad = AdapterSpec(dataset="d", target_modules=["query_key_value"])
    with pytest.raises(ValueError, match=r"adapters\.a\.p0\.target_modules: \['query_key_value'\]"):
        train_adapter("a.p0", bad, base, clean, Home.at(tmp_path / "home"))
    assert not (tmp_path / "home").exists()  # nothing tokenized, no run dir


def test_packing_fills_rows_first_fit_decreasing():
    """Lengths 30, 40, 30, 20 into rows of 64: arrival order needs three rows, first-fit decreasing two."""
    from lora_assets.batching import PackingCollator

    feats = [{"input_ids": [7] * n, "labels": [7] * n} for n in (30, 40, 30, 20)]
    packer = PackingCollator(pad_id=0, max_len=64)
    batch = packer(feats)
    assert batch["input_ids"].shape == (2, 60)
    assert int((batch["input_ids"] == 7).sum()) == 120  # every token kept
    assert packer.real_tokens == 120 and packer.row_tokens == 120


def test_packing_width_weighs_attention_against_padding():
    """Eight ~50-token chats: one 400-token row costs more attention than the padding it saves, so each row holds
    one example; with attention free, they go into one row. A model's attention width comes from its config."""
    from lora_assets.batching import PackingCollator, attention_width

    feats = [{"input_ids": [7] * n, "labels": [7] * n} for n in (45, 50, 47, 52, 44, 49, 51, 48)]
    smollm2 = {
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
    }
    assert attention_width(smollm2) == 1536
    assert PackingCollator(0, 512, attention_width(smollm2))(feats)["input_ids"].shape == (8, 52)
    assert PackingCollator(0, 512, float("inf"))(feats)["input_ids"].shape == (1, 386)
