"""Every grid point of a sweep is validated as a whole adapter, with the spec, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_assets.spec import AdapterSpec, SpecError, validate_spec
from orchestration.cli import app

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "sentiment.jsonl"


def spec_with(adapter: dict) -> dict:
    return {
        "base_model": "builtin:tiny",
        "datasets": {"d": {"path": str(DATA)}},
        "adapters": {"x": {"dataset": "d", **adapter}},
    }


def problems(adapter: dict) -> list[str]:
    with pytest.raises(SpecError) as e:
        validate_spec(spec_with(adapter))
    return e.value.problems


def test_a_grid_point_that_combines_badly_is_named_with_its_values():
    found = problems({"sweep": {"variant": ["lora", "pissa"], "method": ["lora", "qlora"]}})
    (problem,) = found
    assert problem.startswith("adapters.x.sweep[variant=pissa, method=qlora]: variant pissa"), found
    assert "4-bit" in problem and "Fix: use method lora" in problem


def test_cli_validate_refuses_the_grid_with_exit_2(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"base_model: builtin:tiny\ndatasets: {{d: {{path: {DATA}}}}}\n"
        "adapters: {x: {dataset: d, sweep: {variant: [lora, olora], method: [lora, qlora]}}}\n"
    )
    res = CliRunner().invoke(app, ["validate", str(spec)])
    assert res.exit_code == 2, res.output
    assert "adapters.x.sweep[variant=olora, method=qlora]" in res.output
    assert "Traceback" not in res.output and "ValidationError" not in res.output


def test_bad_values_and_bad_points_are_reported_together():
    found = problems({"sweep": {"r": [0, 4], "variant": ["olora"], "method": ["qlora"]}})
    assert any(p.startswith("adapters.x.sweep.r.0:") for p in found), found
    assert any(p.startswith("adapters.x.sweep[r=4, variant=olora, method=qlora]:") for p in found), found
    assert not any("r=0" in p for p in found), found  # a point holding a bad value is not reported a second time


def test_a_problem_of_every_point_is_named_once():
    found = problems({"batch_size": 3, "processes": 2, "sweep": {"r": [4, 8]}})
    assert found == [p for p in found if p.startswith("adapters.x.sweep[every point]: batch_size 3")], found
    assert len(found) == 1


def test_swept_values_replace_the_entrys_own():
    """Only the points train: an entry whose own variant/method clash is valid when the sweep replaces the method."""
    spec = validate_spec(spec_with({"variant": "pissa", "method": "qlora", "sweep": {"method": ["lora"]}}))
    (point,) = spec.adapters["x"].sweep_points()
    assert (point.variant, point.method) == ("pissa", "lora")


def test_every_cross_field_problem_of_one_adapter_is_reported():
    found = problems({"variant": "pissa", "method": "qlora", "batch_size": 3, "processes": 2})
    assert [p.split(":")[0] for p in found] == ["adapters.x", "adapters.x"], found
    assert "variant pissa" in found[0] and "batch_size 3" in found[1]


def test_points_of_a_valid_sweep_expand():
    ad = AdapterSpec(dataset="d", sweep={"variant": ["lora", "pissa"], "method": ["lora"], "r": [4, 8]})
    assert len(ad.sweep_points()) == 4
