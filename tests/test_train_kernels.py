"""The training step's cheaper parts give the same loss and gradients as transformers' and peft's own."""

from __future__ import annotations

import pytest
import torch

from lora_assets.batching import PackingCollator
from lora_assets.train import make_trainer
from lora_assets.train_kernels import HEAD_CHUNK, BitsDropout, supervised_lm_loss, use_bits_dropout


def _tiny_lora_model(vocab: int = 300, tied: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
        )
    )
    model.config.use_cache = False
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    )  # non-zero B: every LoRA weight gets a grad
    return model


def _features(vocab: int = 300) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    feats = []
    for n in (7, 12, 5, 20):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        labels = [-100] * (n // 2) + ids[n // 2 :]  # a prompt, then a labelled answer
        feats.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * n})
    return feats


def _batch(vocab: int = 300, packed: bool = True) -> dict:
    feats = _features(vocab)
    if packed:  # pure packing (no attention cost), so rows really hold several examples
        return PackingCollator(pad_id=0, max_len=32, attention_width=float("inf"))(feats)
    width = max(len(f["input_ids"]) for f in feats)
    pad = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731
    return {
        "input_ids": torch.tensor(pad([f["input_ids"] for f in feats], 0)),
        "labels": torch.tensor(pad([f["labels"] for f in feats], -100)),
        "attention_mask": torch.tensor(pad([f["attention_mask"] for f in feats], 0)),
    }


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_supervised_loss_equals_the_models_loss_and_gradients(packed, tied):
    model = _tiny_lora_model(tied=tied)
    batch = _batch(packed=packed)
    reference = model(**batch).loss
    reference.backward()
    want = _grads(model)
    model.zero_grad()
    total, count = supervised_lm_loss(model, batch)
    (total / count).backward()
    assert count == (batch["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(total / count, reference, rtol=1e-5, atol=1e-6)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_head_chunks_do_not_change_the_loss(monkeypatch):
    model = _tiny_lora_model()
    batch = _batch()
    whole = supervised_lm_loss(model, batch)[0]
    monkeypatch.setattr("lora_assets.train_kernels.HEAD_CHUNK", 3)
    assert HEAD_CHUNK > 3
    torch.testing.assert_close(supervised_lm_loss(model, batch)[0], whole, rtol=1e-5, atol=1e-5)


def test_trainable_head_falls_back_to_the_models_loss():
    model = _tiny_lora_model()
    model.get_base_model().lm_head.weight.requires_grad_(True)
    assert supervised_lm_loss(model, _batch()) is None


def test_trainer_step_uses_the_supervised_loss(tmp_path):
    """One real Trainer step: the loss it logs is the supervised loss of that batch."""
    from transformers import TrainingArguments

    model = _tiny_lora_model()
    feats = _features()
    collate = PackingCollator(pad_id=0, max_len=64)
    with torch.no_grad():
        want = float(model(**collate([dict(f) for f in feats])).loss)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(feats),
        max_steps=1,
        learning_rate=0.0,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
        logging_steps=1,
    )
    trainer = make_trainer(model=model, args=args, train_dataset=feats, data_collator=collate)
    out = trainer.train()
    # The Trainer's one batch holds the same four examples (shuffled), packed the same way: the same loss.
    assert out.training_loss == pytest.approx(want, rel=1e-4)


def test_bits_dropout_keeps_the_rate_and_the_expectation():
    torch.manual_seed(0)
    d = BitsDropout(0.05)
    x = torch.ones(400_000)
    y = d(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.05) < 0.002
    assert abs(float(y.mean()) - 1.0) < 0.005  # inverted dropout: the expectation is unchanged
    assert torch.unique(y).tolist() == pytest.approx([0.0, 1 / (1 - d.p)])
    d.eval()
    assert torch.equal(d(x), x)


def test_bits_dropout_replaces_every_lora_dropout():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = get_peft_model(
        LlamaForCausalLM(
            LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
        ),
        LoraConfig(r=2, lora_dropout=0.1, target_modules="all-linear"),
    )
    assert use_bits_dropout(model) == 2 * 7
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]


def test_a_wrapped_model_falls_back_to_its_own_loss():
    """A DDP-style wrapper has no head of its own; calling inside it would skip its hooks."""
    wrapper = torch.nn.Module()
    wrapper.module = _tiny_lora_model()
    assert supervised_lm_loss(wrapper, _batch()) is None
