"""Dagster wiring, the CLI, and the ``LoraFoundryPipeline`` component type (``dg`` finds it here).

The component type is imported on first use (PEP 562), not with the package: it brings in Dagster, the pipeline
and torch, which the CLI's light commands (``--help``, ``registry``, ``validate``, ``stop``) never need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestration.component import LoraFoundryPipeline

__all__ = ["LoraFoundryPipeline"]


def __getattr__(name: str) -> Any:
    """``orchestration.LoraFoundryPipeline``, imported when first asked for."""
    if name == "LoraFoundryPipeline":
        from orchestration.component import LoraFoundryPipeline

        return LoraFoundryPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names and the lazy ones: ``dg`` finds component types by ``dir()`` of this module."""
    return sorted({*globals(), *__all__})
