"""How an adapter is trained: the method (`lora` on a full-precision base, or `qlora` on a 4-bit NF4 one, and which
one `method: auto` picks) and the LoRA variant as peft's settings, including the variants whose weights start from
the base's.

Imports no spec at run time: :mod:`lora_assets.spec` reads :data:`INIT_VARIANTS` from here to check its settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from lora_assets.architectures import resolve_target_modules
from lora_assets.hardware import resolve_dtype, torch_dtype

if TYPE_CHECKING:  # annotations only: the spec imports this module, and torch loads where a model does
    from peft import LoraConfig
    from transformers import PreTrainedModel

    from lora_assets.base_model import BaseModelRef
    from lora_assets.spec import AdapterSpec

#: Variants that initialise the adapter from the base's weights (peft ``init_lora_weights``): they change the
#: base's residual weights, so they are saved converted to a plain LoRA (see lora_assets.train._save_adapter), and
#: need the base in full precision (never qlora).
INIT_VARIANTS = {"pissa": "pissa_niter_4", "olora": "olora"}


class MethodChoice(BaseModel):
    """Which method trains an adapter, and why (recorded in the manifest and shown in the UI)."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="`lora` or `qlora`: the spec's method, or what `auto` resolved to.")
    reason: str = Field(description="Why: set in the spec, or the memory estimate against the budget.")
    estimate_bytes: int = Field(description="Estimated training memory at bf16 (see choose_method).")
    budget_bytes: int = Field(description="Free accelerator memory, or available RAM on a CPU machine.")


def memory_budget_bytes() -> int:
    """Free accelerator memory, or available RAM on a CPU machine."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def choose_method(spec: AdapterSpec, base: BaseModelRef, budget_bytes: int | None = None) -> MethodChoice:
    """Resolve `method: auto`: QLoRA only when bf16 weights plus training state do not fit the budget.

    The estimate is deliberately simple: bf16 weights (2 bytes/param), LoRA params with fp32 weight, grad and
    two Adam moments (16 bytes/param), and activations of roughly 34 bytes per hidden unit per token per layer
    at the configured batch and length (the usual transformer activation rule of thumb, without recompute).
    """
    cfg = base.config
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    n_modules = len(resolve_target_modules(spec.target_modules, base.path))
    lora_params = layers * n_modules * spec.r * 2 * max(hidden, cfg.get("intermediate_size", hidden))
    tokens = spec.batch_size * spec.max_seq_len
    estimate = base.parameters * 2 + lora_params * 16 + tokens * hidden * layers * 34
    budget = memory_budget_bytes() if budget_bytes is None else budget_bytes
    if spec.method != "auto":
        return MethodChoice(
            method=spec.method,
            reason=f"set in the spec (method: {spec.method})",
            estimate_bytes=estimate,
            budget_bytes=budget,
        )
    gib = 1 << 30
    if estimate <= 0.9 * budget:
        reason = f"bf16 fits: estimated {estimate / gib:.2f} GiB <= 90% of {budget / gib:.1f} GiB budget"
        return MethodChoice(method="lora", reason=reason, estimate_bytes=estimate, budget_bytes=budget)
    reason = f"bf16 does not fit: estimated {estimate / gib:.2f} GiB > 90% of {budget / gib:.1f} GiB budget"
    return MethodChoice(method="qlora", reason=reason, estimate_bytes=estimate, budget_bytes=budget)


def load_nf4_base(path: Path | str) -> PreTrainedModel:
    """The base at ``path`` as QLoRA trains on it: weights in 4-bit NF4 with double quantization, computing in the
    format this hardware is fast in (bf16, else fp32; see :mod:`lora_assets.hardware`). Needs bitsandbytes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch_dtype("auto")
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=compute)


def nf4_precision() -> str:
    """How :func:`load_nf4_base` stores and computes, in words (for records)."""
    return f"nf4 (4-bit, double quant) + {resolve_dtype('auto')} compute"


def lora_config(spec: AdapterSpec, base: BaseModelRef) -> LoraConfig:
    """peft's ``LoraConfig`` for the adapter's rank, alpha, target modules (resolved against ``base``), dropout
    and variant."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        target_modules=resolve_target_modules(spec.target_modules, base.path),
        lora_dropout=spec.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=spec.variant == "rslora",
        use_dora=spec.variant == "dora",
        init_lora_weights=INIT_VARIANTS.get(spec.variant, True),
    )
