"""Where a registry lives: a DuckDB file on this machine, or a Postgres database several machines share
(:mod:`registry.shared`), named by its URL. Imports nothing heavy: the CLI asks this before it opens anything."""

from __future__ import annotations

import re
from pathlib import Path

#: The URL schemes of a shared registry.
SCHEMES = ("postgresql://", "postgres://")


def is_shared(location: Path | str) -> bool:
    """Whether ``location`` names a shared registry (a Postgres URL) rather than a registry file."""
    return isinstance(location, str) and location.startswith(SCHEMES)


def is_object_url(path: str) -> bool:
    """Whether a stored adapter ``path`` is an object in the adapter store (:mod:`registry.objects`)."""
    return path.startswith("s3://")


def mask_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: the only form any message, log or help text shows."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://[^:/@]*):[^@/]*@", r"\1:***@", url)
