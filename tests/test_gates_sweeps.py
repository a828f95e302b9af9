"""Gates, the champion rule and sweeps end to end: a real Dagster materialization of a two-point sweep and an
adapter whose gate cannot pass, on the tiny base (built once by the session fixture)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def test_sweep_expansion_names_and_count():
    from lora_assets.pipeline import adapter_jobs
    from lora_assets.spec import load_spec

    jobs = adapter_jobs(load_spec(ROOT / "examples" / "seed-ablation.yaml"))
    assert len(jobs) == 3 * 2 * 2 * 3 and sorted(jobs) == sorted(f"ablation.p{i}" for i in range(36))
    assert {j.name for j in jobs.values()} == {"ablation"}
    points = [j.point for j in jobs.values()]
    assert len({json.dumps(p, sort_keys=True) for p in points}) == 36
    p = jobs["ablation.p0"]
    assert p.point == {"lora_alpha": "r", "r": 4, "seed": 0, "target_modules": ["q_proj", "v_proj"]}
    assert p.spec.alpha == 4 and p.spec.seed == 0
    assert {j.spec.alpha / j.spec.r for j in jobs.values()} == {1.0, 2.0}


@pytest.fixture(scope="module")
def sweep_run(materialized, session_home, tmp_path_factory):
    """A second home that shares the session's built base model: a sweep `sweepy` (r in {2, 8}, short smoke runs)
    and `hopeless`, whose gate (exact match >= 0.99 after two steps at a tiny rate) cannot pass."""
    import dagster as dg

    from lora_assets.spec import validate_spec
    from orchestration.assets import build_assets
    from orchestration.resources import resources_from_env
    from serving import deployment

    home = tmp_path_factory.mktemp("sweep-home")
    os.symlink(session_home / "models", home / "models")
    ds = {"path": str(ROOT / "examples" / "data" / "categories.jsonl"), "eval_fraction": 0.1, "max_tokens": 256}
    spec = validate_spec(
        {
            "base_model": "builtin:tiny",
            "datasets": {"categories": ds},
            "adapters": {
                "sweepy": {
                    "dataset": "categories",
                    "learning_rate": 2e-3,
                    "max_steps": 30,
                    "max_eval_rows": 24,
                    "gate": {"metric": "eval_loss", "min_gain": 0.5},
                    "sweep": {"r": [2, 8]},
                },
                "hopeless": {
                    "dataset": "categories",
                    "learning_rate": 1e-6,
                    "max_steps": 2,
                    "max_eval_rows": 24,
                    "gate": {"metric": "exact_match", "min_value": 0.99},
                },
            },
            "serving": {"port": free_port()},
        }
    )
    try:
        result = dg.materialize(build_assets(spec), resources=resources_from_env(home), raise_on_error=False)
        yield spec, home, result
    finally:
        deployment.stop(home)


def test_failing_gate_rejects_and_blocks_deployment(sweep_run):
    from registry.store import AdapterRegistry
    from serving.launch import plan_server

    spec, home, result = sweep_run
    checks = {(tuple(e.asset_key.path), e.check_name): e for e in result.get_asset_check_evaluations()}
    hopeless = checks[(("adapter", "hopeless", "register"), "quality_gate")]
    assert not hopeless.passed and hopeless.severity.value == "ERROR"
    (rec,) = AdapterRegistry(home / "registry.duckdb").list(name="hopeless")
    assert rec.status == "rejected"  # registered, kept for inspection
    materialized = {tuple(e.asset_key.path) for e in result.get_asset_materialization_events()}
    assert ("adapter", "hopeless", "register") in materialized
    assert ("serving", "deployment") not in materialized  # the blocking check stopped the deployment
    served = plan_server(spec, home).names
    assert "hopeless" not in served and "sweepy" in served  # never served, even by a later deployment


def test_sweep_points_register_under_one_name_with_a_champion(sweep_run):
    from registry.store import AdapterRegistry

    spec, home, result = sweep_run
    reg = AdapterRegistry(home / "registry.duckdb")
    records = reg.list(name="sweepy")
    assert len(records) == 2
    assert sorted(r.training_config["sweep_point"]["r"] for r in records) == [2, 8]
    assert sorted(r.r for r in records) == [2, 8]
    best = min(records, key=lambda r: r.metrics["eval_loss"]["adapter"])
    assert reg.champion("sweepy").version == best.version  # whichever registered first, the best is champion
    board = reg.leaderboard("sweepy")
    assert board[0]["version"] == best.version and board[0]["rank"] == 1
    assert all(r["train_wall_s"] > 0 and r["trainable_params"] > 0 for r in board)
    (event,) = [
        e for e in result.get_asset_materialization_events() if e.asset_key.path == ["adapter", "sweepy", "leaderboard"]
    ]
    meta = event.materialization.metadata
    assert meta["winner_version"].value == best.version and "**winner**" in meta["leaderboard"].value


def test_eval_metrics_have_cis_and_reproduce(sweep_run):
    from lora_assets.evaluate import EVAL_FILE
    from lora_assets.pipeline import Pipeline

    spec, home, _ = sweep_run
    pipe = Pipeline(spec, home)
    adir = pipe.adapter_dir("sweepy.p1")
    first = json.loads((Path(adir) / EVAL_FILE).read_text())
    for metric in ("exact_match", "chrf", "eval_loss", "perplexity"):
        m = first["metrics"][metric]
        assert m["gain_ci_low"] <= m["gain"] <= m["gain_ci_high"], (metric, m)
    assert first["generation"]["decoding"] == "greedy" and first["generation"]["seed"] == 0
    cached = pipe.evaluate("sweepy.p1")  # same adapter, data and settings: read back, not recomputed
    assert cached.key == first["key"] and cached.wall_s == first["wall_s"]
    (Path(adir) / EVAL_FILE).unlink()
    again = pipe.evaluate("sweepy.p1")  # computed again from scratch: the same numbers and answers
    assert again.metrics == first["metrics"] and [s["adapter"] for s in again.samples] == [
        s["adapter"] for s in first["samples"]
    ]


def test_cli_leaderboard_marks_the_winner(sweep_run):
    from typer.testing import CliRunner

    from orchestration.cli import app
    from registry.store import AdapterRegistry

    _, home, _ = sweep_run
    res = CliRunner().invoke(app, ["registry", "leaderboard", "sweepy", "--json", "--home", str(home)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2]
    assert rows[0]["version"] == AdapterRegistry(home / "registry.duckdb").champion("sweepy").version
    human = CliRunner().invoke(app, ["registry", "leaderboard", "sweepy", "--home", str(home)])
    assert human.exit_code == 0 and "1 winner" in human.stdout
