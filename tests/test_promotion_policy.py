"""The promotion policy as plain logic (registry/promotion.py): no registry file, no DuckDB."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from registry.promotion import (
    FIRST_CHAMPION,
    Champion,
    KeepChampion,
    Promote,
    beats,
    decide_promotion,
    served_versions,
    status_after_evaluation,
)


def _metrics(**values: float) -> dict[str, dict[str, float]]:
    return {metric: {"base": 0.0, "adapter": value} for metric, value in values.items()}


def _decide(rule, champion, version=5, evidence=None, **values):
    return decide_promotion(rule, version, _metrics(**values), next(iter(values), "eval_loss"), evidence, champion)


def test_the_module_imports_no_duckdb():
    code = "import sys, registry.promotion; print('duckdb' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize(
    ("metric", "new", "old", "wins"),
    [
        ("eval_loss", 0.9, 1.0, True),  # lower is better
        ("eval_loss", 1.1, 1.0, False),
        ("exact_match", 0.6, 0.5, True),  # higher is better
        ("exact_match", 0.4, 0.5, False),
        ("exact_match", 0.5, 0.5, False),  # a tie keeps the champion
    ],
)
def test_beats_compares_in_the_metric_direction(metric, new, old, wins):
    why = beats(_metrics(**{metric: new}), Champion(2, _metrics(**{metric: old})), metric)
    assert (why is not None) == wins
    if wins:
        assert f"beats champion v2's {old:.4f}" in why


def test_beats_without_a_champion_is_the_first_champion():
    assert beats({}, None, "eval_loss") == FIRST_CHAMPION


def test_beats_needs_the_new_value_and_takes_a_champion_without_one():
    champion = Champion(3, _metrics(exact_match=0.5))
    assert beats(_metrics(exact_match=0.9), champion, "eval_loss") is None
    assert beats(_metrics(eval_loss=0.1), champion, "eval_loss") == "champion v3 has no eval_loss"


def test_manual_decides_nothing_even_for_a_first_version():
    assert _decide("manual", None, eval_loss=0.1) is None


def test_always_promotes_whatever_the_metrics():
    assert _decide("always", Champion(1, _metrics(eval_loss=0.1)), eval_loss=9.0) == Promote("always")


def test_if_better_promotes_only_a_better_version():
    champion = Champion(1, _metrics(eval_loss=1.0))
    assert _decide("if_better", champion, eval_loss=2.0) is None
    assert _decide("if_better", champion, eval_loss=0.5) == Promote("eval_loss 0.5000 beats champion v1's 1.0000")


def test_evidence_without_a_champion_promotes_the_first_version():
    assert _decide("if_significantly_better", None) == Promote(FIRST_CHAMPION)


def test_evidence_for_the_champion_itself_decides_nothing():
    assert _decide("if_significantly_better", Champion(5, {}), version=5, evidence={"champion_version": 5}) is None


@pytest.mark.parametrize("evidence", [None, {"champion_version": 2, "significant": True, "detail": "won"}])
def test_evidence_against_another_champion_keeps_the_champion(evidence):
    decision = _decide("if_significantly_better", Champion(3, {}), evidence=evidence)
    assert decision == KeepChampion("no paired evidence against the current champion v3", evidence)


def test_a_win_that_is_not_significant_keeps_the_champion_with_its_detail():
    evidence = {"champion_version": 3, "significant": False, "detail": "interval crosses 0"}
    decision = _decide("if_significantly_better", Champion(3, {}), evidence=evidence)
    assert decision == KeepChampion("interval crosses 0", evidence)


def test_a_significant_win_promotes_with_its_evidence():
    evidence = {"champion_version": 3, "significant": True, "detail": "+0.12 [0.05, 0.19]"}
    decision = _decide("if_significantly_better", Champion(3, {}), evidence=evidence)
    assert decision == Promote("+0.12 [0.05, 0.19]", evidence)


@pytest.mark.parametrize(
    ("current", "passes", "after"),
    [
        ("rejected", True, "candidate"),
        ("rejected", False, "rejected"),
        ("candidate", True, "candidate"),
        ("candidate", False, "rejected"),
        ("champion", True, "champion"),
        ("champion", False, "rejected"),
        ("archived", True, "archived"),
        ("archived", False, "archived"),
    ],
)
def test_status_after_a_new_evaluation(current, passes, after):
    assert status_after_evaluation(current, passes) == after


@dataclass(frozen=True)
class _Version:
    name: str
    version: int
    status: str


def test_a_name_serves_its_champion_else_its_latest_candidate_never_a_rejected_or_archived_one():
    versions = [
        _Version("a", 1, "champion"),
        _Version("a", 2, "candidate"),  # newer, but a champion is served
        _Version("b", 1, "candidate"),
        _Version("b", 2, "candidate"),
        _Version("b", 3, "rejected"),
        _Version("c", 1, "archived"),
        _Version("c", 2, "rejected"),
    ]
    assert [(v.name, v.version) for v in served_versions(versions)] == [("a", 1), ("b", 2)]
