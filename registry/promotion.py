"""The promotion policy: when a version becomes the champion of its name, what a new evaluation does to a version's
status, and which version a name serves.

Pure decisions over plain values (metrics, the champion's version and metrics, a paired comparison's evidence): the
repository (:class:`registry.store.AdapterRegistry`) reads them from the file, asks here, and writes what is
decided, with its event. Imports no DuckDB, so the rules are tested as plain logic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from registry.rules import LOWER_IS_BETTER, Status

#: When a passing version becomes the champion of its name: it beats the champion on its rank metric (`if_better`),
#: paired evidence shows a significant win over the champion (`if_significantly_better`), `always`, or only by an
#: explicit promote (`manual`).
PromoteRule = Literal["if_better", "if_significantly_better", "always", "manual"]

#: Why the first version of a name to pass its gate is its champion, whatever the rule (other than `manual`).
FIRST_CHAMPION = "first version to pass its gate"


@dataclass(frozen=True)
class Champion:
    """The champion of a name as the rules see it."""

    version: int
    metrics: dict[str, dict[str, float]]
    """Its evaluation per metric: {metric: {base, adapter, ...}}."""


@dataclass(frozen=True)
class Promote:
    """Make the version the champion (the previous one becomes a candidate)."""

    reason: str
    """Why, recorded with the promotion."""
    evidence: dict[str, Any] | None = None
    """The paired comparison that decided it, recorded with the promotion when given."""


@dataclass(frozen=True)
class KeepChampion:
    """Leave the champion in place, and record why (an `if_significantly_better` promotion refused)."""

    reason: str | None
    """Why the evidence did not suffice."""
    evidence: dict[str, Any] | None
    """The evidence that was given (None when none was)."""


def beats(metrics: dict, champion: Champion | None, metric: str) -> str | None:
    """Why a version with ``metrics`` beats ``champion`` on ``metric`` (the adapter's value, lower better for
    :data:`LOWER_IS_BETTER`); None when it does not, or has no value for it."""
    if champion is None:
        return FIRST_CHAMPION
    new, old = metrics.get(metric, {}).get("adapter"), champion.metrics.get(metric, {}).get("adapter")
    if new is None:
        return None
    if old is None:
        return f"champion v{champion.version} has no {metric}"
    better = new < old if metric in LOWER_IS_BETTER else new > old
    return f"{metric} {new:.4f} beats champion v{champion.version}'s {old:.4f}" if better else None


def _on_evidence(
    version: int, evidence: dict[str, Any] | None, champion: Champion | None
) -> Promote | KeepChampion | None:
    """`if_significantly_better`: promote only on evidence of a significant win over the champion that is the
    champion now (evidence against an earlier champion decides nothing)."""
    if champion is None:
        return Promote(FIRST_CHAMPION)
    if champion.version == version:
        return None
    given = evidence or {}
    if given.get("champion_version") != champion.version:
        return KeepChampion(f"no paired evidence against the current champion v{champion.version}", evidence)
    if not given.get("significant"):
        return KeepChampion(given.get("detail"), given)
    return Promote(str(given.get("detail")), given)


def decide_promotion(
    rule: PromoteRule,
    version: int,
    metrics: dict,
    rank_metric: str,
    evidence: dict[str, Any] | None,
    champion: Champion | None,
) -> Promote | KeepChampion | None:
    """What ``rule`` decides for the candidate ``version`` (with ``metrics``, ranked by ``rank_metric``, and the
    ``evidence`` of a paired comparison, if any) given the name's current ``champion``: promote it, keep the
    champion and record why, or nothing to record (None)."""
    if rule == "manual":
        return None
    if rule == "if_significantly_better":
        return _on_evidence(version, evidence, champion)
    why = beats(metrics, champion, rank_metric) if rule == "if_better" else "always"
    return Promote(why) if why else None


def status_after_evaluation(current: Status, passes: bool) -> Status:
    """The status a registered version takes from a new evaluation of the same files: a rejected version that now
    passes its gate becomes a candidate (and the promotion rule applies); a candidate or champion that now fails is
    rejected (a champion leaves its alias, so its name has no champion until another version earns it); archived
    stays archived."""
    if current == "archived":
        return current
    if passes and current == "rejected":
        return "candidate"
    if not passes and current != "rejected":
        return "rejected"
    return current


class _Versioned(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def status(self) -> str: ...


V = TypeVar("V", bound=_Versioned)


def served_versions(versions: Iterable[V]) -> list[V]:
    """The version each name serves, from its versions oldest first: its champion, else its latest candidate (never
    a rejected or archived one); one per name."""
    chosen: dict[str, V] = {}
    for v in versions:
        if v.status == "champion" or (v.status == "candidate" and chosen.get(v.name, v).status != "champion"):
            chosen[v.name] = v
    return list(chosen.values())
