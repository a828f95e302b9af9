"""End to end on the embedded default: real Dagster materialization, real peft training, real registry rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry.records import adapter_sha256
from registry.store import AdapterRegistry

pytestmark = pytest.mark.slow


def test_materialize_whole_graph(materialized, demo_spec):
    keys = {"/".join(e.asset_key.path) for e in materialized.get_asset_materialization_events()}
    expected = {f"dataset/{d}/clean" for d in demo_spec.datasets}
    expected |= {f"adapter/{a}/{stage}" for a in demo_spec.adapters for stage in ("train", "eval", "register")}
    expected |= {"serving/deployment", "base_model/builtin_tiny"}  # the base is an asset too, upstream of all
    assert keys == expected


def test_cleaning_counts(materialized, session_home, demo_spec):
    for name in demo_spec.datasets:
        report = json.loads(
            (
                Path(json.loads((session_home / "datasets" / name / "current.json").read_text())["dir"]) / "report.json"
            ).read_text()
        )
        assert report["rows_in"] == report["rows_train"] + report["rows_eval"] + report["rows_quarantined"]
        # the generator mixes in exact duplicates and one empty answer on purpose
        reasons = report["by_reason"]
        assert reasons["duplicate"] > 0 and reasons.get("empty_prompt", 0) + reasons.get("empty_response", 0) == 1


LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_adapters_follow_lora_defaults(materialized, session_home, demo_spec):
    for name in demo_spec.adapters:
        adir = Path(json.loads((session_home / "adapters" / name / "current.json").read_text())["dir"])
        cfg = json.loads((adir / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 16 and cfg["lora_alpha"] == 32
        assert sorted(cfg["target_modules"]) == LLAMA_LINEAR  # all-linear, written out by name
        assert cfg["lora_dropout"] == 0.05
        assert (adir / "adapter_model.safetensors").exists()
        assert not list(adir.glob("*.bin")) and not list(adir.glob("*.pt"))
        manifest = json.loads((adir / "training_manifest.json").read_text())
        assert manifest["epochs"] == 1 and manifest["max_steps"] is None
        assert manifest["result"]["examples"] > 1000


def test_registry_rows_and_adapters_beat_base(materialized, session_home, demo_spec):
    # The pipeline registered version 1 of each adapter before any other test could register in the shared home
    # (the serving tests add copies under these names later, other tests register names of their own; the suite
    # runs in random order).
    records = [
        r
        for r in AdapterRegistry(session_home / "registry.duckdb").list()
        if r.version == 1 and r.name in demo_spec.adapters
    ]
    assert sorted(r.name for r in records) == sorted(demo_spec.adapters)
    for rec in records:
        assert rec.adapter_sha256 == adapter_sha256(Path(rec.path))[0]
        assert rec.dataset_fingerprint and rec.base_model == "builtin:tiny"
        em, loss = rec.metrics["exact_match"], rec.metrics["eval_loss"]
        assert em["adapter"] > em["base"] + 0.1, (rec.name, em)
        assert loss["adapter"] < loss["base"], (rec.name, loss)
        assert rec.status == "champion"  # the demo gates (min_gain 0.1) pass; the first passing version is champion


def test_rematerializing_reuses_identical_work(materialized, session_home, demo_spec):
    import dagster as dg

    from orchestration.assets import build_assets
    from orchestration.resources import resources_from_env

    result = dg.materialize(
        build_assets(demo_spec),
        resources=resources_from_env(session_home),
        selection=[f"adapter/{next(iter(demo_spec.adapters))}/train"],
    )
    (event,) = result.get_asset_materialization_events()
    assert event.materialization.metadata["reused_existing_run"].value is True


def test_cli_run_prints_base_to_adapter_table(materialized, session_home, monkeypatch):
    """`lorafoundry run` on an already-materialized home: reuses the work and prints the summary table."""
    from typer.testing import CliRunner

    from orchestration.cli import app
    from tests.conftest import DEMO_SPEC

    monkeypatch.setenv("DAGSTER_HOME", str(session_home / "dagster_home"))  # restored after the test
    res = CliRunner().invoke(app, ["run", str(DEMO_SPEC), "--home", str(session_home), "--no-deploy"])
    assert res.exit_code == 0, res.output
    assert "exact_match" in res.stdout and "→" in res.stdout
    for name in ("categories", "sentiment"):
        assert name in res.stdout


def test_train_asset_shows_loss_plot_and_resources(materialized, demo_spec):
    """The train asset carries what the UI shows: the loss curve as an inline PNG, trainable %, tokens/s, peak
    memory and the method with its reason."""
    import base64
    import io

    from PIL import Image

    for name in demo_spec.adapters:
        (event,) = [
            e for e in materialized.get_asset_materialization_events() if e.asset_key.path == ["adapter", name, "train"]
        ]
        meta = {k: v.value for k, v in event.materialization.metadata.items()}
        md = meta["loss_curve"]
        assert md.startswith("![training loss](data:image/png;base64,")
        png = base64.b64decode(md.split("base64,", 1)[1].split(")", 1)[0])
        assert Image.open(io.BytesIO(png)).size == (640, 320)
        assert "| step | loss |" in md
        assert meta["peak_memory_mb"] > 50 and meta["tokens_per_s"] > 0
        assert 0 < meta["trainable_percent"] < 100
        assert meta["method"] in ("lora", "qlora") and meta["method_reason"]
