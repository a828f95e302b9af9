"""A Hugging Face-compatible model card (README.md with YAML front matter) for one registered adapter."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from registry.metrics import METRICS
from registry.records import AdapterRecord


def front_matter(rec: AdapterRecord) -> dict:
    """The card's metadata: what the Hub reads (base model, library, relation, datasets, model-index)."""
    metrics = [
        {
            "type": m,
            "name": f"{METRICS[m].title if m in METRICS else m} (adapter; base {v['base']:.4f})",
            "value": round(float(v["adapter"]), 4),
        }
        for m, v in rec.metrics.items()
        if "adapter" in v
    ]
    dataset = rec.dataset or "unknown"
    return {
        "base_model": rec.base_model,
        "library_name": "peft",
        "base_model_relation": "adapter",
        "datasets": [dataset],
        "tags": ["lora", "peft", "lorafoundry", rec.method],
        "model-index": [
            {
                "name": f"{rec.name}@{rec.version}",
                "results": [
                    {
                        "task": {"type": "text-generation", "name": "Text generation"},
                        "dataset": {
                            "name": dataset,
                            "type": dataset,
                            "split": "eval",
                            "revision": rec.dataset_fingerprint or "",
                        },
                        "metrics": metrics,
                    }
                ],
            }
        ],
    }


def render(rec: AdapterRecord) -> str:
    """README.md text: YAML front matter, then a human summary."""
    meta = yaml.safe_dump(front_matter(rec), sort_keys=False, allow_unicode=True)
    rows = "\n".join(
        f"| {m} | {v.get('base', float('nan')):.4f} | {v.get('adapter', float('nan')):.4f} |"
        for m, v in rec.metrics.items()
    )
    cfg = {
        k: rec.training_config.get(k)
        for k in (
            "method",
            "r",
            "lora_alpha",
            "target_modules",
            "lora_dropout",
            "learning_rate",
            "batch_size",
            "max_seq_len",
            "seed",
        )
        if k in rec.training_config
    }
    return f"""---
{meta}---

# {rec.name} (version {rec.version}, {rec.status})

A LoRA adapter for `{rec.base_model}`, trained for one epoch by lorafoundry on dataset `{rec.dataset}`
(fingerprint `{rec.dataset_fingerprint}`).

| metric | base | adapter |
|---|---|---|
{rows}

Training config: `{json.dumps(cfg)}`. Trainable parameters: {rec.trainable_params or 0:,}.
Weights sha256 (config + safetensors): `{rec.adapter_sha256}`. Registered {rec.created_at:%Y-%m-%d %H:%M} UTC
by run `{rec.run_id}`, code version {rec.code_version}.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{rec.base_model}"), "{rec.path}")
```
"""


def write_card(rec: AdapterRecord) -> Path:
    """Write README.md into the adapter dir (not part of the sha256, which covers config and weights)."""
    path = Path(rec.path) / "README.md"
    path.write_text(render(rec), encoding="utf-8")
    return path
