"""Evaluation of an adapter against its base model on the held-out split.

Both are run at the dtype serving uses (bf16 by default), on the same rows, with greedy decoding:
eval loss on assistant tokens, and exact match of the generated answer against the reference.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from lora_assets.base_model import BaseModelRef
from lora_assets.clean import CleanReport, read_split
from lora_assets.spec import AdapterSpec, GateSpec
from lora_assets.train import tokenize_example

EVAL_FILE = "eval_results.json"


class GateResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str
    passed: bool
    detail: str


class EvalResult(BaseModel):
    """Base vs adapter metrics (``{"<metric>": {"base": x, "adapter": y}}``), samples and the gate outcome."""

    model_config = ConfigDict(extra="forbid")

    metrics: dict[str, dict[str, float]]
    rows: int
    generation: dict
    samples: list[dict]
    gate: GateResult | None
    wall_s: float


def normalize_answer(text: str) -> str:
    """Case-, whitespace- and edge-punctuation-insensitive form used by exact match."""
    text = unicodedata.normalize("NFC", text).casefold().strip()
    text = re.sub(r"\s+", " ", text)
    return text.strip(" .!?,;:'\"")


def _dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
            "auto": torch.bfloat16}[name]


def _eval_loss(model, examples: list[dict], pad_id: int, batch_size: int = 32) -> float:
    """Token-weighted mean cross-entropy over assistant tokens."""
    import torch

    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[j, :n] = torch.tensor(e["input_ids"])
            labels[j, :n] = torch.tensor(e["labels"])
            mask[j, :n] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
            ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((shift_labels != -100).sum())
    return total / max(count, 1)


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    import torch

    outs = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i: i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        outs.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return outs


def check_gate(gate: GateSpec | None, metrics: dict[str, dict[str, float]]) -> GateResult | None:
    """Apply a gate to base/adapter metrics. Lower is better for eval_loss, higher for exact_match."""
    if gate is None:
        return None
    base, adapter = metrics[gate.metric]["base"], metrics[gate.metric]["adapter"]
    lower_is_better = gate.metric == "eval_loss"
    if gate.min_gain is not None:
        gain = (base - adapter) if lower_is_better else (adapter - base)
        passed = gain >= gate.min_gain
        detail = f"{gate.metric} gain {gain:+.4f} vs required {gate.min_gain:+.4f}"
    else:
        passed = adapter <= gate.min_value if lower_is_better else adapter >= gate.min_value
        op = "<=" if lower_is_better else ">="
        detail = f"{gate.metric} {adapter:.4f} vs required {op} {gate.min_value:.4f}"
    return GateResult(metric=gate.metric, passed=passed, detail=("pass: " if passed else "fail: ") + detail)


def evaluate_adapter(adapter_dir: Path, spec: AdapterSpec, base: BaseModelRef, clean: CleanReport,
                     dtype: str = "bfloat16", max_new_tokens: int = 32) -> EvalResult:
    """Evaluate base and adapter on the held-out split and write ``eval_results.json`` into the adapter dir.

    Args:
        adapter_dir: the peft adapter dir written by training.
        spec: the adapter's settings (max_eval_rows, gate).
        base: the resolved base model.
        clean: the cleaning report of the adapter's dataset (gives the eval split).
        dtype: the dtype serving uses; a QLoRA adapter is evaluated on the unquantized base at this dtype.
        max_new_tokens: generation budget per answer (greedy).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    torch.manual_seed(0)
    rows = read_split(clean, "eval")[: spec.max_eval_rows]
    if not rows:
        raise ValueError(f"dataset {clean.dataset!r} has no eval rows. Fix: raise datasets.{clean.dataset}."
                         "eval_fraction or add data.")
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=_dtype(dtype))
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()

    examples = [tokenize_example(tokenizer, r["messages"], spec.max_seq_len) for r in rows]
    prompts = [tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
               for r in rows]
    refs = [r["messages"][-1]["content"] for r in rows]

    with model.disable_adapter():
        base_loss = _eval_loss(model, examples, tokenizer.pad_token_id)
        base_out = _generate(model, tokenizer, prompts, max_new_tokens)
    ad_loss = _eval_loss(model, examples, tokenizer.pad_token_id)
    ad_out = _generate(model, tokenizer, prompts, max_new_tokens)

    def em(outs: list[str]) -> float:
        return sum(normalize_answer(o) == normalize_answer(r) for o, r in zip(outs, refs, strict=True)) / len(refs)

    metrics = {
        "exact_match": {"base": round(em(base_out), 4), "adapter": round(em(ad_out), 4)},
        "eval_loss": {"base": round(base_loss, 4), "adapter": round(ad_loss, 4)},
    }
    samples = [{"prompt": r["messages"][-2]["content"], "reference": ref, "base": b, "adapter": a}
               for r, ref, b, a in list(zip(rows, refs, base_out, ad_out, strict=True))[:10]]
    result = EvalResult(
        metrics=metrics, rows=len(rows), samples=samples, gate=check_gate(spec.gate, metrics),
        generation={"decoding": "greedy", "max_new_tokens": max_new_tokens, "dtype": dtype},
        wall_s=round(time.time() - t0, 2),
    )
    (Path(adapter_dir) / EVAL_FILE).write_text(result.model_dump_json(indent=2))
    return result


def load_eval(adapter_dir: Path) -> EvalResult:
    path = Path(adapter_dir) / EVAL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the adapter has not been evaluated. Fix: materialize its "
                                "eval asset first.")
    return EvalResult.model_validate(json.loads(path.read_text()))
