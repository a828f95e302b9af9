"""Merged export: a registered adapter folded into its base, as a complete Hugging Face model dir.

``lorafoundry registry export-merged NAME@VERSION OUT_DIR`` calls :func:`export_merged`. The adapter's files are
checked against the sha256 registered for them, and the base against the base hash recorded at training, before
anything is loaded; the merge is peft's ``merge_and_unload`` in float32, then cast to the asked dtype. The dir
(config, generation config, tokenizer with its chat template, safetensors, a model card with the lineage) is
written next to OUT_DIR and renamed into place, so OUT_DIR is either complete or absent. It loads as a spec's
``base_model`` and as vLLM's ``--model``; a variant vLLM's multi-LoRA path cannot serve (DoRA) is served this way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from lora_assets.base_model import BaseModelRef, resolve_base_model
from lora_assets.files import sha256_files
from registry.records import AdapterRecord, adapter_sha256

#: The lineage record written into the merged dir (what the model card shows, machine-readable).
LINEAGE_FILE = "lorafoundry_lineage.json"
DTYPES = ("bfloat16", "float16", "float32")


class ExportError(ValueError):
    """The export cannot be made as asked; the message says why and what to do."""


class MergedExport(BaseModel):
    """What :func:`export_merged` wrote."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(description="The merged model dir.")
    ref: str = Field(description="The adapter version merged, NAME@VERSION.")
    dtype: str = Field(description="The weights' dtype.")
    weights_sha256: str = Field(description="sha256 over config.json and the safetensors files of the merged dir.")
    lineage: dict = Field(description="Base, adapter and dataset identities and the adapter's metrics.")


def _lineage(rec: AdapterRecord, base: BaseModelRef, dtype: str) -> dict:
    return {
        "merged_from": f"{rec.name}@{rec.version}",
        "base_model": rec.base_model,
        "base_model_hash": base.content_hash,
        "adapter_sha256": rec.adapter_sha256,
        "adapter_method": rec.method,
        "variant": rec.training_config.get("variant", "lora"),
        "r": rec.r,
        "lora_alpha": rec.lora_alpha,
        "dataset": rec.dataset,
        "dataset_fingerprint": rec.dataset_fingerprint,
        "metrics": rec.metrics,
        "dtype": dtype,
        "code_version": rec.code_version,
    }


def _card(rec: AdapterRecord, lineage: dict) -> str:
    meta = {
        "base_model": rec.base_model,
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["lorafoundry", "merged-lora", lineage["variant"]],
        "datasets": [rec.dataset or "unknown"],
    }
    rows = "\n".join(
        f"| {m} | {v.get('base', float('nan')):.4f} | {v.get('adapter', float('nan')):.4f} |"
        for m, v in rec.metrics.items()
    )
    return f"""---
{yaml.safe_dump(meta, sort_keys=False)}---

# {rec.name}@{rec.version}, merged into `{rec.base_model}`

The LoRA adapter `{rec.name}` version {rec.version} ({lineage["variant"]}, r={rec.r}, alpha={rec.lora_alpha}) merged
into its base with peft's `merge_and_unload`, weights in {lineage["dtype"]}. A plain Hugging Face model: load it
with `AutoModelForCausalLM.from_pretrained`, serve it with `vllm serve <this dir>`, or use it as a lorafoundry
`base_model`.

Lineage: base hash `{lineage["base_model_hash"]}`, adapter sha256 `{rec.adapter_sha256}`, dataset `{rec.dataset}`
(fingerprint `{rec.dataset_fingerprint}`), code version {rec.code_version}. Machine-readable: `{LINEAGE_FILE}`.

| metric (held-out split) | base | adapter |
|---|---|---|
{rows}
"""


def export_merged(
    rec: AdapterRecord, home: Path, out_dir: Path, dtype: str = "bfloat16", progress=None
) -> MergedExport:
    """Merge ``rec`` into its base and write the model dir ``out_dir`` (which must not exist yet).

    Args:
        rec: the registered version (its files are checked against its sha256 first).
        home: the lorafoundry home (where `builtin:` bases are cached).
        out_dir: the new model dir.
        dtype: the merged weights' dtype: bfloat16 (default), float16 or float32.
        progress: optional callable(str) for progress lines.

    Raises :class:`ExportError` (bad dtype, existing out_dir, changed adapter files, another base now).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir).resolve()
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not supported. Fix: use one of {', '.join(DTYPES)}.")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} already exists and is not empty. Fix: choose a new OUT_DIR, or remove it.")
    ref = f"{rec.name}@{rec.version}"
    try:
        sha = adapter_sha256(Path(rec.path))[0]
    except OSError as e:
        raise ExportError(f"{ref}: adapter files unreadable at {rec.path} ({e}).") from None
    if sha != rec.adapter_sha256:
        raise ExportError(
            f"{ref}: files changed after registration (sha256 {sha[:12]} != registered "
            f"{rec.adapter_sha256[:12]}); refused. Fix: `lorafoundry registry verify`."
        )
    try:
        base = resolve_base_model(rec.base_model, Path(home))
    except (FileNotFoundError, KeyError) as e:
        raise ExportError(f"{ref}: its base {rec.base_model!r} is not available here ({e}).") from None
    if rec.base_model_hash and base.content_hash != rec.base_model_hash:
        raise ExportError(
            f"{ref} was trained on base {rec.base_model!r} with hash {rec.base_model_hash[:12]}, but that base is "
            f"now {base.content_hash[:12]}; merging into another base gives another model. Fix: restore the "
            "base it was trained on."
        )

    say(f"merging {ref} into {base.path} ({dtype})")
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, rec.path).merge_and_unload()
    merged = merged.to(getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    lineage = _lineage(rec, base, dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would make the model dir private to this user
    try:
        merged.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        (work / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2))
        (work / "README.md").write_text(_card(rec, lineage), encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    weights = sha256_files([out_dir / "config.json"] + sorted(out_dir.glob("*.safetensors")))
    say(f"wrote {out_dir}")
    return MergedExport(path=out_dir, ref=ref, dtype=dtype, weights_sha256=weights, lineage=lineage)
