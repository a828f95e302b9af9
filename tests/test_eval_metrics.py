"""Evaluation metrics as pure logic: the metric table's scorers (chrF against sacreBLEU's values, contains), paired
bootstrap CIs, gates."""

from __future__ import annotations

import pytest

from lora_assets.evaluate import check_gate, metric_table
from lora_assets.evidence import RowScores, gain_interval, value_interval
from lora_assets.spec import GateSpec
from registry.metrics import ANSWER_METRICS, METRICS, chrf, contains_answer


@pytest.mark.parametrize(
    ("hyp", "ref", "expected"),
    [
        # values from sacrebleu 2.x: CHRF().sentence_score(hyp, [ref]).score
        ("positive", "negative", 24.365079365079364),
        ("the cat sat", "the cat sat on", 79.34458487087205),
        ("vehicle", "a vehicle", 83.07482317905449),
        ("", "x", 0.0),
        ("same words", "same  words", 100.0),
    ],
)
def test_chrf_matches_sacrebleu(hyp, ref, expected):
    assert chrf(hyp, ref) == pytest.approx(expected, abs=1e-9)


def test_metric_table_gains_and_bootstrap_are_deterministic():
    per_row = {"exact_match": ([0, 0, 1, 0, 1, 0, 0, 1], [1, 1, 1, 0, 1, 1, 0, 1])}
    losses = ([4.0, 5, 6, 7, 4, 5, 6, 7], [1.0, 2, 3, 4, 1, 2, 3, 9], [2, 2, 2, 2, 2, 2, 2, 2])
    first, second = metric_table(per_row, losses, seed=0), metric_table(per_row, losses, seed=0)
    assert first == second  # same seed, same numbers
    em = first["exact_match"]
    assert (em["base"], em["adapter"], em["gain"]) == (0.375, 0.75, 0.375)
    assert em["gain_ci_low"] <= em["gain"] <= em["gain_ci_high"] and em["gain_ci_low"] >= 0
    loss = first["eval_loss"]
    assert loss["base"] == 2.75 and loss["adapter"] == 1.5625 and loss["gain"] == 1.1875  # base - adapter
    ppl = first["perplexity"]
    assert ppl["gain"] > 0 and ppl["gain_ci_low"] <= ppl["gain"] <= ppl["gain_ci_high"]
    assert metric_table(per_row, losses, seed=1) != first  # the seed is what fixes the intervals


def test_the_one_bootstrap_gives_the_intervals_it_gave_before_it_was_one():
    """Evaluation's reported intervals and the evidence module's come from one seeded bootstrap; these numbers were
    computed by the two separate implementations it replaced. A change here changes stored results: bump
    EVAL_VERSION."""
    per_row = {
        "exact_match": ([0, 0, 1, 0, 1, 0, 0, 1], [1, 1, 1, 0, 1, 1, 0, 1]),
        "chrf": ([10.0, 20, 30, 40, 50, 60, 70, 80], [15.0, 20, 45, 35, 50, 90, 70, 81]),
    }
    losses = ([4.0, 5, 6, 7, 4, 5, 6, 7], [1.0, 2, 3, 4, 1, 2, 3, 9], [2, 2, 2, 2, 2, 2, 2, 2])
    assert metric_table(per_row, losses, seed=0) == {
        "exact_match": {"base": 0.375, "adapter": 0.75, "gain": 0.375, "gain_ci_low": 0.125, "gain_ci_high": 0.75},
        "chrf": {"base": 45.0, "adapter": 50.75, "gain": 5.75, "gain_ci_low": -0.625, "gain_ci_high": 13.75},
        "eval_loss": {"base": 2.75, "adapter": 1.5625, "gain": 1.1875, "gain_ci_low": 0.5625, "gain_ci_high": 1.5},
        "perplexity": {
            "base": 15.6426,
            "adapter": 4.7707,
            "gain": 10.8719,
            "gain_ci_low": 7.1638,
            "gain_ci_high": 14.8646,
        },
    }
    em_base, em_adapter = per_row["exact_match"]
    s = RowScores(
        ids=[f"r{i}" for i in range(8)],
        answers={"exact_match": {"base": em_base, "adapter": em_adapter}},
        losses={"base": losses[0], "adapter": losses[1], "tokens": [2.0] * 8},
    )
    assert gain_interval(s, "exact_match", 0.9, seed=3) == (0.375, 0.125, 0.625)
    assert gain_interval(s, "perplexity", 0.95, seed=0) == (10.87189870222057, 7.163759127251618, 14.864603716101312)
    assert value_interval(s, "eval_loss", 0.8, seed=1) == (1.5625, 1.0625, 2.125)


def test_every_metric_of_the_table_is_evaluated_and_gateable():
    """A metric added to the table (registry/metrics.py) is computed by evaluation and accepted by a gate."""
    per_row = {m.name: ([0.0, 1.0, 0.0], [1.0, 1.0, 0.0]) for m in ANSWER_METRICS}
    table = metric_table(per_row, ([3.0, 3.0, 3.0], [2.0, 2.0, 2.0], [1, 1, 1]))
    assert list(table) == list(METRICS)
    for name, values in table.items():
        assert values["gain"] > 0, name  # the adapter is better on every metric here, whatever its direction
        assert check_gate(GateSpec(metric=name, min_gain=0.0), table).passed


def test_gates_read_the_right_direction():
    metrics = {"perplexity": {"base": 20.0, "adapter": 5.0}, "chrf": {"base": 10.0, "adapter": 30.0}}
    assert check_gate(GateSpec(metric="perplexity", min_gain=10), metrics).passed
    assert not check_gate(GateSpec(metric="perplexity", min_value=4), metrics).passed
    assert check_gate(GateSpec(metric="chrf", min_gain=20), metrics).passed
    assert not check_gate(GateSpec(metric="chrf", min_value=31), metrics).passed
    assert check_gate(None, metrics) is None


@pytest.mark.parametrize(
    ("output", "reference", "expected"),
    [
        ("These are all fruits.", "fruit", True),  # a chatty answer that exact match scores 0
        ("fruit", "Fruit.", True),
        ("I love grapefruit", "fruit", False),  # only from a word start
        ("The review is Positive!", "positive", True),
        ("negative", "positive", False),
        ("anything", "   ", False),  # an empty reference never matches
    ],
)
def test_contains_answer(output, reference, expected):
    assert contains_answer(output, reference) is expected


def test_a_reused_evaluation_stores_the_verdict_of_the_current_gate(tmp_path):
    """Changing only the gate reuses the scores, and the file the quality_gate check reads gets the new verdict."""
    import json

    from lora_assets.evaluate import EVAL_FILE, EvalResult, _previous_result, load_eval

    metrics = {"exact_match": {"base": 0.1, "adapter": 0.3, "gain": 0.2}}
    stored = EvalResult(
        metrics=metrics,
        rows=10,
        generation={},
        samples=[],
        gate=check_gate(GateSpec(metric="exact_match", min_gain=0.5), metrics),
        wall_s=1.0,
        key="k",
    )
    (tmp_path / EVAL_FILE).write_text(json.dumps(stored.model_dump(mode="json")))
    assert not load_eval(tmp_path).gate.passed
    reused = _previous_result(tmp_path, "k", GateSpec(metric="exact_match", min_gain=0.1))
    assert reused.gate.passed and load_eval(tmp_path).gate.passed
    assert _previous_result(tmp_path, "k", None).gate is None and load_eval(tmp_path).gate is None
    assert _previous_result(tmp_path, "other key", None) is None
