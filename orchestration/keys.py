"""The names one pipeline's definitions get in a code location: asset keys, groups, job and sensor names.

A pipeline loaded from ``workspace.yaml`` (one spec per code location) has no prefix: ``dataset/<name>/clean``,
``adapter/<job>/train|eval|register``, ``adapter/<sweep>/leaderboard``, ``serving/deployment``. Each instance of the
``LoraFoundryPipeline`` component has one (by default its folder's name), so several pipelines share a code
location without clashing: ``<prefix>/dataset/<name>/clean``, group ``<prefix>_adapters``, job
``<prefix>_all_adapters``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import dagster as dg

#: What Dagster accepts in group, job and sensor names, so a prefix can be part of them.
PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_]{1,64}$")


@dataclass(frozen=True)
class AssetKeys:
    """The names of one pipeline's definitions. ``prefix`` (a valid Dagster name, see PREFIX_PATTERN) is put
    before every asset key and group/job/sensor name; empty for the single-spec code location."""

    prefix: str = ""

    def __post_init__(self) -> None:
        if self.prefix and not PREFIX_PATTERN.match(self.prefix):
            raise ValueError(
                f"key_prefix: {self.prefix!r} is not a valid Dagster name. Fix: use 1-64 letters, digits or "
                "underscores (e.g. 'support_bot')."
            )

    def _key(self, *parts: str) -> dg.AssetKey:
        return dg.AssetKey([self.prefix, *parts] if self.prefix else list(parts))

    def clean(self, dataset: str) -> dg.AssetKey:
        return self._key("dataset", dataset, "clean")

    def adapter(self, job_key: str, stage: str) -> dg.AssetKey:
        """``stage``: train, eval, register, or leaderboard (for a sweep's name)."""
        return self._key("adapter", job_key, stage)

    def deployment(self) -> dg.AssetKey:
        return self._key("serving", "deployment")

    def base_model(self, name: str) -> dg.AssetKey:
        return self._key("base_model", name)

    def selection(self) -> dg.AssetSelection:
        """Every asset of this pipeline (all of the code location's when there is no prefix)."""
        return dg.AssetSelection.key_prefixes(self.prefix) if self.prefix else dg.AssetSelection.all()

    def name(self, name: str) -> str:
        """A group, job or sensor name of this pipeline."""
        return f"{self.prefix}_{name}" if self.prefix else name

    group = name
