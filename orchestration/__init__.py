"""Dagster wiring, the CLI, and the ``LoraFoundryPipeline`` component type (``dg`` finds it here)."""

from orchestration.component import LoraFoundryPipeline

__all__ = ["LoraFoundryPipeline"]
