"""The Dagster Definitions load from workspace.yaml and every job resolves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from lora_assets import envs

ROOT = Path(__file__).resolve().parents[1]


def test_definitions_module_loads_and_resolves_jobs(tmp_path, monkeypatch):
    import importlib

    monkeypatch.setenv(envs.HOME.name, str(tmp_path))
    import orchestration.definitions as definitions

    defs = importlib.reload(definitions).defs
    graph = defs.resolve_asset_graph()
    keys = {"/".join(k.path) for k in graph.get_all_asset_keys()}
    assert "dataset/categories/clean" in keys and "adapter/sentiment/register" in keys
    assert "all_adapters" in {j.name for j in defs.resolve_all_job_defs()}  # every job resolves
    job = defs.resolve_job_def("all_adapters")
    assert {"/".join(k.path) for k in job.asset_layer.selected_asset_keys} == keys  # the whole graph, deployment too
    assert int(job.tags["dagster/max_runtime"]) > 0
    sensors = {s.name for s in defs.sensors}
    assert sensors >= {"dataset_files_changed", "promotions_to_server", "follow_upstream"}
    for name in sensors:  # loading the location starts no run by itself: each sensor is turned on in the UI
        assert defs.resolve_sensor_def(name).default_status == dg.DefaultSensorStatus.STOPPED, name
    train = graph.get(dg.AssetKey(["adapter", "categories", "train"]))
    assert train.pools == {"training"} and train.code_version
    assert all(graph.get(k).code_version for k in graph.get_all_asset_keys())


def test_code_version_follows_the_spec():
    """Changing an adapter's rank changes its train asset's code version (the UI shows it stale), not others'."""
    from lora_assets.spec import load_spec
    from orchestration.definitions import DEMO_SPEC, build_definitions

    spec = load_spec(DEMO_SPEC)
    changed = spec.model_copy(
        update={"adapters": {**spec.adapters, "categories": spec.adapters["categories"].model_copy(update={"r": 8})}}
    )

    def versions(s):
        g = build_definitions(s, "/tmp/unused").resolve_asset_graph()
        return {"/".join(k.path): g.get(k).code_version for k in g.get_all_asset_keys()}

    before, after = versions(spec), versions(changed)
    assert {k for k in before if before[k] != after[k]} == {"adapter/categories/train"}


def test_dataset_sensor_requests_the_chain_of_a_changed_file(tmp_path):
    import json

    from lora_assets.spec import validate_spec
    from orchestration.sensors import build_dataset_sensor

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    other = tmp_path / "o.jsonl"
    other.write_text(data.read_text())
    spec = validate_spec(
        {
            "base_model": "builtin:tiny",
            "datasets": {"d": {"path": str(data)}, "o": {"path": str(other)}},
            "adapters": {"a": {"dataset": "d"}, "s": {"dataset": "d", "sweep": {"r": [4, 8]}}, "b": {"dataset": "o"}},
        }
    )
    sensor = build_dataset_sensor(spec)
    first = sensor(dg.build_sensor_context(cursor=None))
    assert not first.run_requests and first.cursor
    same = sensor(dg.build_sensor_context(cursor=first.cursor))
    assert not same.run_requests
    data.write_text(data.read_text() + json.dumps({"prompt": "q2", "completion": "a2"}) + "\n")
    changed = sensor(dg.build_sensor_context(cursor=first.cursor))
    (req,) = changed.run_requests
    keys = {"/".join(k.path) for k in req.asset_selection}
    assert keys == {
        "dataset/d/clean",
        "serving/deployment",
        "adapter/s/leaderboard",
        *(f"adapter/{j}/{st}" for j in ("a", "s.p0", "s.p1") for st in ("train", "eval", "register")),
    }
    for f in (data, other):  # both change in one tick: one run, one deployment
        f.write_text(f.read_text() + json.dumps({"prompt": "q3", "completion": "a3"}) + "\n")
    (both,) = sensor(dg.build_sensor_context(cursor=changed.cursor)).run_requests
    keys = ["/".join(k.path) for k in both.asset_selection]
    assert len(keys) == len(set(keys)) and keys.count("serving/deployment") == 1
    assert {"dataset/d/clean", "dataset/o/clean", "adapter/b/train"} <= set(keys)


def test_workspace_yaml_validates_with_dagster_cli(tmp_path):
    env = {**os.environ, envs.HOME.name: str(tmp_path), "DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    res = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
