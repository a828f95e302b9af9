"""lorafoundry's vLLM plugin (entry point group ``vllm.general_plugins``).

vLLM calls :func:`register` in every one of its processes (API server, engine core, each worker), which is
where fixes to the model runner must be applied: on CPU the workers are spawned, so patching the launching
process alone does nothing.
"""

from __future__ import annotations


def register() -> None:
    """Apply the CPU multi-LoRA batch-invariance fix (a logged no-op where it does not apply)."""
    from serving import cpu_lora_fix

    cpu_lora_fix.apply()
