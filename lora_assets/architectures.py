"""Which layers of a base get LoRA, found from the base itself, and which architectures vLLM serves with LoRA.

`target_modules: all-linear` means what peft means by it: every linear layer of the model except its output head
(here: the decoder blocks' attention and MLP projections, whatever the family calls them: Llama's `q_proj` ...
`down_proj`, Phi-3's fused `qkv_proj` and `gate_up_proj`). The names are read from the base's own modules, built on
the meta device from its config (no weights read), and written out by name in `adapter_config.json`.

vLLM applies LoRA to the linear layers of the decoder blocks of the architectures whose vLLM implementation
supports it (`SupportsLoRA`); `tests/test_families.py` checks this table against the installed vLLM and serves an
adapter on a random-weight model of each family.
"""

from __future__ import annotations

import functools
from pathlib import Path

#: The architectures (``config.json``'s ``architectures[0]``) tested end to end here: trained with peft, served by
#: vLLM with LoRA, greedy tokens compared (tests/test_families.py). The value says which vLLM implementation serves
#: it: its own (`native`) or its Transformers backend (`transformers`, which swaps in vLLM's linear layers).
VLLM_LORA_ARCHITECTURES = {
    "LlamaForCausalLM": "native",
    "MistralForCausalLM": "native",
    "Qwen2ForCausalLM": "native",
    "Qwen3ForCausalLM": "native",
    "Gemma2ForCausalLM": "native",
    "Gemma3ForCausalLM": "native",
    "Phi3ForCausalLM": "native",
    "GraniteForCausalLM": "native",
    "Olmo2ForCausalLM": "transformers",
}


def architecture(config: dict) -> str:
    """The base's architecture class name from its ``config.json`` (``?`` when it names none)."""
    return (config.get("architectures") or ["?"])[0]


@functools.lru_cache(maxsize=16)
def _linear_layers(path: str, config_mtime: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    inside, outside = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            in_blocks = module is not head and ".layers." in f".{name}."
            (inside if in_blocks else outside).add(name.rsplit(".", 1)[-1])
    return tuple(sorted(inside)), tuple(sorted(outside - inside))


def linear_layers(model_dir: Path | str) -> tuple[list[str], list[str]]:
    """(names of the linear layers inside the decoder blocks, names of the other linear layers such as the output
    head), each a sorted list of last name components, from the model dir's config alone (meta device)."""
    config = Path(model_dir) / "config.json"
    inside, outside = _linear_layers(str(model_dir), config.stat().st_mtime)
    return list(inside), list(outside)


def resolve_target_modules(target_modules: str | list[str], model_dir: Path | str) -> list[str]:
    """The module names peft gets: `all-linear` becomes the decoder blocks' linear layers of this base, by name;
    an explicit list is kept as written (checked by :func:`target_module_problems`)."""
    if target_modules == "all-linear":
        return linear_layers(model_dir)[0]
    return list(target_modules)


def target_module_problems(
    field: str, target_modules: str | list[str], base_id: str, model_dir: Path | str
) -> list[str]:
    """What in ``target_modules`` cannot train or cannot be served on this base, each with the field and the fix."""
    inside, outside = linear_layers(model_dir)
    if not inside:
        return [
            f"{field}: {base_id} has no linear layers inside decoder blocks (`*.layers.N.*`), so `all-linear` "
            "finds nothing to adapt. Fix: use a decoder-only causal LM (see README, supported families)."
        ]
    if target_modules == "all-linear":
        return []
    problems = []
    served_nowhere = [m for m in target_modules if m in outside]
    if served_nowhere:
        problems.append(
            f"{field}: {served_nowhere} of {base_id} are outside the decoder blocks (the output head or other "
            "non-block layers), and vLLM applies LoRA only to the decoder blocks' linear layers, so the adapter "
            f"could not be served. Fix: use `all-linear` or some of {inside}."
        )
    unknown = [m for m in target_modules if m not in inside and m not in outside]
    if unknown:
        problems.append(
            f"{field}: {unknown} are not linear layers of {base_id}. Fix: use `all-linear` or some of {inside}."
        )
    return problems


def architecture_warning(config: dict, base_id: str) -> str | None:
    """Advice for a base whose architecture is not in :data:`VLLM_LORA_ARCHITECTURES` (it trains; serving it with
    LoRA is up to the installed vLLM), else None."""
    arch = architecture(config)
    if arch in VLLM_LORA_ARCHITECTURES:
        return None
    return (
        f"{base_id} is a {arch}, not one of the families tested with vLLM LoRA serving here "
        f"({', '.join(sorted(VLLM_LORA_ARCHITECTURES))}): training works, serving depends on whether the "
        "installed vLLM supports LoRA for it (its Transformers backend serves many)."
    )
