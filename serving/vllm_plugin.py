"""lorafoundry's vLLM plugin (entry point group ``vllm.general_plugins``).

vLLM calls :func:`register` in every one of its processes (API server, engine core, each worker), which is
where fixes to the model runner must be applied: on CPU the workers are spawned, so patching the launching
process alone does nothing. In the API server it also registers the registry-backed LoRA resolver.
"""

from __future__ import annotations

import os


def register() -> None:
    """Apply the CPU multi-LoRA batch-invariance fix, and register the registry LoRA resolver when the server
    was started by lorafoundry (``LORAFOUNDRY_REGISTRY`` set)."""
    from serving import cpu_lora_fix

    cpu_lora_fix.apply()
    _register_resolver()


def _register_resolver() -> None:
    from serving.guard import AdapterResolver

    core = AdapterResolver.from_env()
    if core is None:
        return
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    class RegistryLoRAResolver(LoRAResolver):
        """Loads `name`, `name@VERSION` or `name:ALIAS` from the registry after the guard's checks pass."""

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            import asyncio

            from serving.guard import Refusal

            rec = await asyncio.to_thread(core.resolve, lora_name)
            if isinstance(rec, Refusal):
                return None
            # vLLM passes the base's path; /v1/models should show the served base name as the parent
            parent = os.environ.get("LORAFOUNDRY_BASE_NAME") or base_model_name
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=rec.path, base_model_name=parent)

    LoRAResolverRegistry.register_resolver("lorafoundry", RegistryLoRAResolver())
