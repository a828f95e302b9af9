"""Dagster's own state for a team (docs/scale-out.md): the instance on Postgres (dagster-postgres), so a run launched
on one machine shows on another. Two DAGSTER_HOME dirs stand for two machines; they share nothing but the
`dagster.yaml` that docs/scale-out.md gives, with the database of the session's real Postgres."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _docs_dagster_yaml() -> str:
    """The `dagster.yaml` block of docs/scale-out.md, as a user copies it."""
    text = (ROOT / "docs" / "scale-out.md").read_text()
    (block,) = re.findall(r"```yaml\n# dagster\.yaml.*?\n(.*?)```", text, flags=re.S)
    return block


def test_a_run_on_one_machine_shows_on_another(postgres, random_base, tmp_path, monkeypatch):
    import psycopg

    with psycopg.connect(postgres.admin_url, autocommit=True) as con:
        con.execute("CREATE DATABASE dagster OWNER lorafoundry")
    spec = tmp_path / "spec.yaml"  # one dataset on a random base: the run is a cleaning, in seconds
    data = ROOT / "examples" / "data" / "categories.jsonl"
    spec.write_text(
        f"base_model: {random_base}\ndatasets:\n  categories: {{path: {data}}}\n"
        "adapters:\n  categories: {dataset: categories}\n"
    )
    host, port = "127.0.0.1", str(postgres.port)
    machines = {}
    for name in ("a", "b"):
        machines[name] = tmp_path / name / "dagster_home"
        machines[name].mkdir(parents=True)
        (machines[name] / "dagster.yaml").write_text(_docs_dagster_yaml())
    env = {
        **os.environ,
        **postgres.env(),
        "DAGSTER_PG_HOST": host,
        "DAGSTER_PG_PORT": port,
        "DAGSTER_PG_USER": "lorafoundry",
        "DAGSTER_PG_DB": "dagster",
        "DAGSTER_HOME": str(machines["a"]),
        "LORAFOUNDRY_SPEC": str(spec),
        "LORAFOUNDRY_HOME": str(tmp_path / "a" / "home"),
    }
    dagster = Path(sys.executable).with_name("dagster")
    cmd = [str(dagster), "asset", "materialize", "-m", "orchestration.definitions"]
    res = subprocess.run(
        [*cmd, "--select", "dataset/categories/clean"], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not (machines["a"] / "history").exists()  # nothing of the run went to machine A's disk

    from dagster import AssetKey, DagsterInstance, DagsterRunStatus

    for key, value in env.items():
        if key.startswith("DAGSTER_PG_") or key == "PGPASSWORD":
            monkeypatch.setenv(key, value)
    instance = DagsterInstance.from_config(str(machines["b"]))  # machine B reads the same instance
    try:
        runs = instance.get_runs()
        assert [r.status for r in runs] == [DagsterRunStatus.SUCCESS]
        event = instance.get_latest_materialization_event(AssetKey(["dataset", "categories", "clean"]))
        assert event is not None and event.run_id == runs[0].run_id
    finally:
        instance.dispose()
