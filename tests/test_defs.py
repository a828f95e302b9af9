"""The Dagster Definitions load from workspace.yaml and every job resolves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_definitions_module_loads_and_resolves_jobs(tmp_path, monkeypatch):
    import importlib

    monkeypatch.setenv("LORAFOUNDRY_HOME", str(tmp_path))
    import orchestration.definitions as definitions

    defs = importlib.reload(definitions).defs
    job = defs.resolve_job_def("all_adapters")
    keys = {"/".join(k.path) for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert "dataset/categories/clean" in keys and "adapter/sentiment/register" in keys
    assert job.name == "all_adapters"
    for j in defs.resolve_all_job_defs():
        assert j.graph is not None


def test_workspace_yaml_validates_with_dagster_cli(tmp_path):
    env = {**os.environ, "LORAFOUNDRY_HOME": str(tmp_path), "DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    res = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate",
                          "-w", "workspace.yaml"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
