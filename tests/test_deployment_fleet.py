"""The ``serving/deployment`` asset with ``serving.replicas: 2``: what a Dagster UI user gets who asks the spec for
replicas. The asset leaves a fleet running (serving/fleet_serve.py: two vLLM replicas behind vllm-router, the guard on
the public port), materializing again keeps it, and `lorafoundry stop` stops every process it started, even after the
fleet's own process was killed with SIGKILL. The fleet's
routing, promotion, failure and metrics behaviour is tested on `lorafoundry serve --replicas 2` in tests/test_team.py:
both run serving/fleet_serve.py:run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_serving import PROMPTS, complete

pytestmark = pytest.mark.slow


def test_the_deployment_asset_runs_a_fleet_when_the_spec_asks_for_replicas(home_copy, demo_spec):
    import dagster as dg

    from orchestration.assets import build_assets
    from orchestration.resources import resources_from_env
    from serving import deployment
    from tests.conftest import ADMIN_KEY, free_port

    serving = demo_spec.serving.model_copy(update={"port": free_port(), "replicas": 2})
    spec = demo_spec.model_copy(update={"serving": serving})
    only = dg.AssetSelection.assets(dg.AssetKey(["serving", "deployment"]))

    def materialize() -> dict:
        result = dg.materialize(build_assets(spec), selection=only, resources=resources_from_env(home_copy))
        assert result.success
        (event,) = result.get_asset_materialization_events()
        return {k: v.value for k, v in event.materialization.metadata.items()}

    try:
        first = materialize()
        state = deployment.current(home_copy)
        assert state is not None and state["replicas"] == first["replicas"] == 2
        started = psutil.Process(state["pid"]).children(recursive=True)
        servers = [p for p in started if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())]
        assert len(servers) == 2 and any(p.name() == "vllm::router" for p in started), started  # its title
        assert ADMIN_KEY not in (home_copy / "serving" / "fleet-plan.json").read_text()  # keys stay in the env
        assert complete(state["url"], "categories", PROMPTS[0])
        text = httpx.get(f"{state['url']}/metrics", headers={"X-Admin-Key": ADMIN_KEY}, timeout=30).text
        up = {f.name: f for f in text_string_to_metric_families(text)}["lorafoundry_replica_up"]
        assert {s.labels["replica"]: s.value for s in up.samples} == {"0": 1.0, "1": 1.0}
        again = materialize()  # same plan, same replicas: the fleet is kept
        assert (again["pid"], again["restarted"]) == (state["pid"], False)
        # the fleet's process killed with SIGKILL: its replicas and router are left, in process groups of their own;
        # `lorafoundry stop` stops them by the PIDs the deployment recorded
        os.kill(state["pid"], signal.SIGKILL)
        stop = subprocess.run(
            [str(Path(sys.executable).parent / "lorafoundry"), "stop", "--home", str(home_copy)],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert stop.returncode == 0 and "stopped the deployment" in stop.stdout, stop.stdout + stop.stderr
        time.sleep(1)
        left = [p.pid for p in [psutil.Process(state["pid"]), *started] if _alive(p)]
        assert not left, f"processes of the deployment left behind: {left}"
        assert deployment.current(home_copy) is None
    finally:
        deployment.stop(home_copy)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
