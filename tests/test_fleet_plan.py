"""The fleet's pure parts: CPU shares, the replica and router command lines, the routing key, the merged replica
metrics. The fleet itself runs on real processes in tests/test_team.py."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving.fleet import cpu_shares, replica_command, router_command
from serving.front import _ReplicaCollector, _routing_key


@pytest.mark.parametrize(
    ("cpus", "replicas", "shares"),
    [
        ([0, 1], 2, ["0", "1"]),
        ([0, 1, 2, 3, 4], 2, ["0,1,2", "3,4"]),
        ([3, 1, 2, 0], 4, ["0", "1", "2", "3"]),
        ([0, 1], 3, ["0", "1", "0"]),  # more replicas than CPUs: shared round robin
        ([0, 1, 2, 3], 1, ["0,1,2,3"]),
    ],
)
def test_each_replica_gets_its_share_of_the_cpus(cpus, replicas, shares):
    assert cpu_shares(cpus, replicas) == shares


def test_replicas_listen_on_loopback_whatever_the_spec_says():
    cmd = ["python", "-m", "vllm", "--host", "0.0.0.0", "--port", "8000", "--model", "m"]
    assert replica_command(cmd, 41000) == ["python", "-m", "vllm", "--host", "127.0.0.1", "--port", "41000"] + [
        "--model",
        "m",
    ]
    assert cmd[4] == "0.0.0.0"  # the plan's command is not changed


def test_the_router_listens_on_loopback_and_hashes_the_resolved_version():
    cmd = router_command(["http://127.0.0.1:1", "http://127.0.0.1:2"], 9000, 9001)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--prometheus-host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--policy") + 1] == "consistent_hash"
    assert cmd[cmd.index("--worker-urls") + 1 : cmd.index("--worker-urls") + 3] == [
        "http://127.0.0.1:1",
        "http://127.0.0.1:2",
    ]
    other = router_command(["u"], 1, 2, "round_robin")
    assert other[other.index("--policy") + 1] == "round_robin"


def test_the_routing_key_is_the_model_the_guard_passed_on():
    assert _routing_key(json.dumps({"model": "sentiment@7", "prompt": "x"}).encode()) == "sentiment@7"
    assert _routing_key(b'{"prompt": "x"}') == ""
    assert _routing_key(b"not json") == ""
    assert _routing_key(b'{"model": 5}') == ""


REPLICA_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="base"} 2.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="length",model_name="base"} 7.0
# HELP lorafoundry_requests_total Requests
# TYPE lorafoundry_requests_total counter
lorafoundry_requests_total{model="x",route="/v1/completions",status="200",version="1"} 3.0
# HELP lorafoundry_adapter_evictions_total Adapters evicted
# TYPE lorafoundry_adapter_evictions_total counter
lorafoundry_adapter_evictions_total{cache="cpu",model="x",version="1"} 4.0
"""
ROUTER_METRICS = """# TYPE vllm_router_active_workers gauge
vllm_router_active_workers 2
# TYPE vllm_router_requests_total counter
vllm_router_requests_total{route="/v1/completions"} 9
# TYPE process_open_fds gauge
process_open_fds 12
"""


def test_replica_metrics_are_merged_under_a_replica_label():
    """Each replica's own vLLM metrics and its worker's adapter counters, one family each with a `replica` label;
    the replicas' request metrics are left out (the public port's guard counts every request once); up and restarts
    per replica; the router's own `vllm_router_` families as the router wrote them, nothing else of its answer."""
    registry = CollectorRegistry(auto_describe=False)
    status = [{"replica": 0, "up": True, "restarts": 0}, {"replica": 1, "up": False, "restarts": 2}]
    texts = {0: REPLICA_METRICS, 1: REPLICA_METRICS.replace("7.0", "5.0")}
    registry.register(_ReplicaCollector(status, texts, ROUTER_METRICS))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert {s.labels["replica"]: s.value for s in families["lorafoundry_replica_up"].samples} == {"0": 1.0, "1": 0.0}
    restarts = families["lorafoundry_replica_restarts"].samples
    assert {s.labels["replica"]: s.value for s in restarts if s.name.endswith("_total")} == {"0": 0.0, "1": 2.0}
    done = families["vllm:request_success"].samples
    assert {s.labels["replica"]: s.value for s in done} == {"0": 7.0, "1": 5.0}
    assert all(s.labels["model_name"] == "base" for s in done)
    assert "lorafoundry_requests" not in families
    evicted = families["lorafoundry_adapter_evictions"].samples
    assert {(s.labels["replica"], s.labels["model"], s.value) for s in evicted} == {("0", "x", 4.0), ("1", "x", 4.0)}
    assert families["vllm_router_active_workers"].samples[0].value == 2
    assert families["vllm_router_requests"].samples[0].labels == {"route": "/v1/completions"}
    assert "process_open_fds" not in families


def test_a_router_answer_that_is_not_prometheus_text_leaves_out_the_router_only():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ReplicaCollector([{"replica": 0, "up": True, "restarts": 0}], {0: REPLICA_METRICS}, "<html>"))
    families = {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert {"lorafoundry_replica_up", "vllm:request_success"} <= families
    assert not any(name.startswith("vllm_router_") for name in families)


def test_stop_stops_only_the_serve_its_record_names(tmp_path):
    """`lorafoundry stop` with a record of a foreground `serve` that names another process (this test's, with
    another start time; a `sleep` with its own start time but no `serve` command line) stops nothing and removes
    the record; with none it says nothing is serving."""
    import os
    import subprocess

    import psutil
    from typer.testing import CliRunner

    from lora_assets.home import Home
    from orchestration.cli import app

    record = Home.at(tmp_path).serve_state
    record.parent.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for pid, started in ((os.getpid(), 1.0), (sleeper.pid, psutil.Process(sleeper.pid).create_time())):
            record.write_text(json.dumps({"pid": pid, "started": started, "url": "http://x", "replicas": 2}))
            res = CliRunner().invoke(app, ["stop", "--home", str(tmp_path)])
            assert res.exit_code == 0 and "nothing is serving" in res.output, res.output
            assert not record.exists()
        assert sleeper.poll() is None
        record.write_text("{not json")
        assert "nothing is serving" in CliRunner().invoke(app, ["stop", "--home", str(tmp_path)]).output
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_public_port_is_held_while_the_replicas_start_and_freed_when_they_fail(monkeypatch, tmp_path):
    """The replicas take a minute to start and pick loopback ports from the ephemeral range, where a test's (or an
    operator's) public port may be too: the fleet binds its public port first, so nothing takes it meanwhile, and a
    client is refused, not left waiting, until the replicas answer. (A stand-in for Fleet: the real one runs in
    tests/test_team.py and tests/test_deployment_fleet.py.)"""
    import logging
    import socket

    from serving import fleet_serve
    from serving.launch import ServerError, ServerPlan
    from tests.conftest import free_port

    port, seen = free_port(), {}

    class StartingFleet:
        def __init__(self, *args) -> None:
            pass

        def start(self, timeout_s):
            with socket.socket() as other:  # another process asking for the port meanwhile
                seen["bind"] = _bind_error(other, port)
            with socket.socket() as client:
                seen["connect"] = client.connect_ex(("127.0.0.1", port))
            raise ServerError("a replica exited while starting")

    monkeypatch.setattr(fleet_serve, "Fleet", StartingFleet)
    monkeypatch.setattr(fleet_serve.signal, "signal", lambda *a: None)
    plan = ServerPlan(["vllm"], {}, f"http://127.0.0.1:{port}", [], [])
    front_log = logging.getLogger("vllm.lorafoundry")  # run() gives it a handler on the log dir
    monkeypatch.setattr(front_log, "handlers", [])
    with pytest.raises(ServerError):
        fleet_serve.run(plan, 2, "consistent_hash", ("127.0.0.1", port), tmp_path, 1.0)
    assert seen["bind"] is True  # held
    assert seen["connect"] != 0  # refused, not queued
    with socket.socket() as after:  # and freed once the start failed
        after.bind(("127.0.0.1", port))


def _bind_error(sock, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return True
    return False
