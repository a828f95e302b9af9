"""Decisions on evidence (lora_assets/evidence.py): gates with a confidence decide on the interval's bound, and
`promote: if_significantly_better` promotes a candidate only on a significant paired win over the champion.

Pure logic on generated scores, the registry's rule on a real DuckDB file, and the whole chain (train, evaluate,
register) on the session's tiny base with an adapter that is and one that is not significantly better.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_assets.evaluate import check_gate, metric_table
from lora_assets.evidence import MIN_PAIRED_ROWS, RowScores, compare_with_champion, gain_interval, value_interval
from lora_assets.spec import AdapterSpec, GateSpec
from registry.records import NewAdapter
from registry.store import AdapterRegistry
from tests.test_registry import make_adapter_dir


def scores(base: list[float], adapter: list[float], ids: list[str] | None = None) -> RowScores:
    n = len(base)
    return RowScores(
        ids=ids or [f"row{i}" for i in range(n)],
        answers={"exact_match": {"base": base, "adapter": adapter}},
        losses={"base": [2.0] * n, "adapter": [1.0 + (i % 3) * 0.5 for i in range(n)], "tokens": [2.0] * n},
    )


def test_intervals_at_95_percent_are_the_eval_tables_intervals():
    """The same paired bootstrap as metric_table's: one notion of 'the interval' across the product."""
    s = scores([0, 0, 1, 0, 1, 0, 0, 1] * 3, [1, 1, 1, 0, 1, 1, 0, 1] * 3)
    table = metric_table(
        {"exact_match": (s.answers["exact_match"]["base"], s.answers["exact_match"]["adapter"])},
        (s.losses["base"], s.losses["adapter"], s.losses["tokens"]),
    )
    for metric in ("exact_match", "eval_loss", "perplexity"):
        gain, low, high = gain_interval(s, metric, 0.95)
        want = table[metric]
        assert (round(gain, 4), round(low, 4), round(high, 4)) == (
            want["gain"],
            want["gain_ci_low"],
            want["gain_ci_high"],
        ), metric
    value, low, high = value_interval(s, "exact_match", 0.95)
    assert value == pytest.approx(0.75) and low <= value <= high
    wide, narrow = gain_interval(s, "exact_match", 0.99), gain_interval(s, "exact_match", 0.8)
    assert wide[1] <= narrow[1] and wide[2] >= narrow[2]  # more confidence, a wider interval


def test_a_gate_with_confidence_fails_a_point_estimate_that_is_only_luck():
    """+0.1 exact match on 20 rows clears min_gain 0.05 as a point estimate; its interval does not."""
    base = [0.0] * 20
    adapter = [1.0, 1.0] + [0.0] * 18
    s = scores(base, adapter)
    metrics = {"exact_match": {"base": 0.0, "adapter": 0.1}}
    point = check_gate(GateSpec(metric="exact_match", min_gain=0.05), metrics, s)
    evidence = check_gate(GateSpec(metric="exact_match", min_gain=0.05, confidence=0.95), metrics, s)
    assert point.passed and not evidence.passed
    assert "95% CI" in evidence.detail and "lower bound" in evidence.detail
    strong = scores(base, [1.0] * 16 + [0.0] * 4)
    assert check_gate(GateSpec(metric="exact_match", min_gain=0.5, confidence=0.95), metrics, strong).passed
    lower = check_gate(GateSpec(metric="eval_loss", min_value=2.0, confidence=0.95), metrics, strong)
    assert lower.passed and "upper bound" in lower.detail  # eval_loss: lower is better, the upper bound decides
    missing = check_gate(GateSpec(metric="exact_match", min_gain=0.05, confidence=0.9), metrics, None)
    assert not missing.passed and "re-evaluate" in missing.detail


def test_paired_comparison_with_the_champion():
    ids = [f"r{i}" for i in range(40)]
    champion = scores([0.0] * 40, [0.0] * 20 + [1.0] * 20, ids)
    better = scores([0.0] * 40, [1.0] * 38 + [0.0] * 2, ids[::-1])  # same rows, another order: paired by id
    win = compare_with_champion(better, champion, 3, "exact_match", 0.95)
    assert win.significant and win.paired_rows == 40 and win.ci_low > 0 and win.champion_version == 3
    assert "promoted: a significant win over champion v3" in win.detail
    same = compare_with_champion(champion, champion, 3, "exact_match", 0.95)
    assert not same.significant and same.difference == 0
    slightly = scores([0.0] * 40, [0.0] * 19 + [1.0] * 21, ids)  # one more row right: not evidence
    assert not compare_with_champion(slightly, champion, 3, "exact_match", 0.95).significant
    other_rows = scores([0.0] * 40, [1.0] * 40, [f"x{i}" for i in range(40)])
    apart = compare_with_champion(other_rows, champion, 3, "exact_match", 0.95)
    assert not apart.significant and apart.paired_rows == 0 and f"at least {MIN_PAIRED_ROWS}" in apart.detail
    loss = compare_with_champion(better, champion, 3, "eval_loss", 0.95)
    assert loss.difference == 0 and not loss.significant  # same losses: lower-is-better handled, no win


def test_confidence_is_a_gate_setting_with_bounds():
    assert GateSpec(metric="chrf", min_gain=1, confidence=0.9).confidence == 0.9
    with pytest.raises(ValueError):
        GateSpec(metric="chrf", min_gain=1, confidence=1.5)
    assert AdapterSpec(dataset="d", promote="if_significantly_better").promote == "if_significantly_better"


def test_the_registry_promotes_only_on_significant_evidence_against_the_current_champion(tmp_path):
    reg = AdapterRegistry(tmp_path / "registry.duckdb")

    def register(seed: int, evidence: dict | None):
        return reg.register(
            NewAdapter(
                name="bot",
                path=make_adapter_dir(tmp_path / f"a{seed}", seed=seed),
                base_model="tiny",
                metrics={"exact_match": {"base": 0.1, "adapter": 0.5}},
                promote="if_significantly_better",
                rank_metric="exact_match",
                evidence=evidence,
            )
        )

    assert register(1, None).status == "champion"  # the first to pass its gate
    win = {"champion_version": 1, "significant": True, "detail": "promoted: a significant win", "ci_low": 0.1}
    assert register(2, win).status == "champion"
    assert reg.get("bot", 1).status == "candidate"
    promote_event = reg.events("bot", 2)[-1]
    assert promote_event["action"] == "promote" and promote_event["detail"]["evidence"]["ci_low"] == 0.1
    no_win = {"champion_version": 2, "significant": False, "detail": "not promoted: no significant win"}
    assert register(3, no_win).status == "candidate"
    kept = reg.events("bot", 3)[-1]
    assert kept["action"] == "keep_champion" and kept["detail"]["reason"] == "not promoted: no significant win"
    stale = {"champion_version": 1, "significant": True, "detail": "a win over v1"}  # v2 is champion now
    assert register(4, stale).status == "candidate"
    assert "no paired evidence against the current champion v2" in reg.events("bot", 4)[-1]["detail"]["reason"]
    assert reg.champion("bot").version == 2


@pytest.mark.slow
def test_a_significantly_better_adapter_is_promoted_and_an_equal_one_is_not(home_copy, demo_spec):
    """On a copy of the session's home (its tiny base, its categories data): a barely trained version is the
    champion; a fully trained one wins significantly (paired on the same held-out rows) and is promoted; a copy of
    that one (same weights, other bytes in its config) is no better, and the champion stays."""
    from lora_assets.pipeline import Pipeline

    settings = {"dataset": "categories", "learning_rate": 2e-3, "max_eval_rows": 60}
    settings |= {"promote": "if_significantly_better", "gate": {"metric": "exact_match", "min_value": 0.0}}
    weak = {"evidence": {**settings, "max_steps": 2}}
    spec = demo_spec.model_copy(update={"adapters": {"evidence": AdapterSpec(**weak["evidence"])}})
    pipe = Pipeline(spec, home_copy)
    reg = pipe.registry
    pipe.train("evidence")
    pipe.evaluate("evidence")
    first = pipe.register("evidence")
    assert first.status == "champion"

    spec = demo_spec.model_copy(update={"adapters": {"evidence": AdapterSpec(**settings)}})
    pipe = Pipeline(spec, home_copy)
    pipe.train("evidence")
    ev = pipe.evaluate("evidence")
    assert ev.per_row is not None and len(ev.per_row.ids) == ev.rows
    strong = pipe.register("evidence")
    assert strong.status == "champion", reg.events("evidence", strong.version)
    evidence = reg.events("evidence", strong.version)[-1]["detail"]["evidence"]
    assert evidence["significant"] and evidence["ci_low"] > 0 and evidence["champion_version"] == first.version

    # the same weights as a new version: another sha256 (its config has one more key), same answers
    copy_dir = home_copy / "adapters" / "test-copies" / "evidence-copy"
    shutil.copytree(strong.path, copy_dir)
    cfg = json.loads((copy_dir / "adapter_config.json").read_text())
    (copy_dir / "adapter_config.json").write_text(json.dumps({**cfg, "revision": "copy"}))
    job = pipe.jobs["evidence"]
    candidate = reg.register(
        NewAdapter(
            name="evidence",
            path=copy_dir,
            base_model=spec.base_model,
            base_model_hash=pipe.base.content_hash,
            metrics=ev.metrics,
            promote="if_significantly_better",
            rank_metric="exact_match",
            evidence=pipe._evidence(job, ev, Path(copy_dir)),
        )
    )
    assert candidate.status == "candidate"
    kept = reg.events("evidence", candidate.version)[-1]
    assert kept["action"] == "keep_champion" and not kept["detail"]["evidence"]["significant"]
    assert kept["detail"]["evidence"]["difference"] == 0
    assert reg.champion("evidence").version == strong.version


@pytest.mark.slow
def test_the_register_asset_shows_the_promotion_decision(materialized):
    """The session's first registration of each adapter: its register asset says it was promoted, and why."""
    events = {e.asset_key.to_user_string(): e for e in materialized.get_asset_materialization_events()}
    meta = events["adapter/categories/register"].materialization.metadata
    assert meta["promotion"].value == "promote: first version to pass its gate"
