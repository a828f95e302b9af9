"""What the registry allows, defined once and imported everywhere else: the name rule (adapter and dataset names,
aliases, versions, ``name@VERSION`` / ``name:ALIAS`` refs), the statuses and which of them are served, and which
metrics are lower-is-better.

This module is the lowest layer (it imports nothing but the registry's errors and its metric table), so the spec
(``lora_assets/spec.py``), the CLI and the server's guard all check names by the same rule.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from registry.errors import RegistryInputError
from registry.metrics import METRICS

#: The name rule, for adapter names, dataset names and aliases: 1-64 ASCII letters, digits, '.', '_', '-', starting
#: with a letter or digit (so a name is always one safe path component: never '.', '..' or hidden).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
NAME_RE = re.compile(NAME_PATTERN)
#: The rule in words, for error messages.
NAME_RULE = "1-64 characters from ASCII letters, digits, '.', '_', '-', starting with a letter or digit"
#: Versions are 1-9 ASCII digits (``str.isdigit`` would take '²' or '٣').
VERSION_RE = re.compile(r"[0-9]{1,9}")

Status = Literal["candidate", "champion", "rejected", "archived"]
STATUSES: tuple[str, ...] = get_args(Status)
#: The statuses a server may load: a rejected or archived version is never served.
SERVABLE_STATUSES: tuple[str, ...] = ("candidate", "champion")
#: Metrics where a lower value is better (the champion rule, leaderboards), from the metric table
#: (``registry.metrics``); every other name, known or not, is higher-better. The `leaderboard` view is rendered from
#: this set when its migration runs: changing a direction needs a new migration that recreates the view (see
#: ``registry.schema.leaderboard_view_sql``).
LOWER_IS_BETTER: frozenset[str] = frozenset(m.name for m in METRICS.values() if m.lower_is_better)


def is_valid_name(name: str) -> bool:
    """Whether ``name`` follows the name rule (:data:`NAME_RULE`)."""
    return NAME_RE.fullmatch(name) is not None


def shown(value: str) -> str:
    """``value`` for an error message: quoted, and cut when long (names are client-chosen)."""
    return repr(value) if len(value) <= 80 else f"{value[:40]!r}… ({len(value)} characters)"


def check_name(name: str) -> str:
    """``name`` if it is a valid adapter name, else raise with the rule."""
    if not is_valid_name(name):
        raise RegistryInputError(f"name {shown(name)} is not valid. Fix: use {NAME_RULE} (e.g. sentiment, qa-v2).")
    return name


def check_alias(alias: str) -> str:
    """``alias`` if it is a valid alias (the name rule, and not only digits, which would read as a version)."""
    if not is_valid_name(alias) or alias.isdigit():
        raise RegistryInputError(
            f"alias {shown(alias)} is not valid. Fix: use {NAME_RULE} and not only digits (e.g. prod, staging)."
        )
    return alias


def check_status(status: str) -> str:
    """``status`` if it is one of the registry's statuses."""
    if status not in STATUSES:
        raise RegistryInputError(f"status {shown(status)} is not a status. Fix: use one of {', '.join(STATUSES)}.")
    return status


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """Split ``name``, ``name@VERSION`` or ``name:ALIAS`` into (name, version, alias)."""
    if "@" in ref:
        name, _, v = ref.partition("@")
        if not VERSION_RE.fullmatch(v):
            raise RegistryInputError(
                f"{shown(ref)}: the version after '@' must be a number of 1-9 ASCII digits (0-9), e.g. {name[:64]}@2."
            )
        return check_name(name), int(v), None
    if ":" in ref:
        name, _, alias = ref.partition(":")
        return check_name(name), None, check_alias(alias)
    return check_name(ref), None, None


def parse_versioned_ref(ref: str) -> tuple[str, int]:
    """Split ``name@VERSION`` into (name, version); a ref without a version is refused."""
    name, version, _ = parse_ref(ref)
    if version is None:
        raise RegistryInputError(f"{ref!r}: name the version, e.g. {name}@2.")
    return name, version
