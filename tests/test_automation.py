"""Resources from the environment, declarative automation that respects blocking checks, and the promotion
sensor's cursor."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import dagster as dg
import pytest

from lora_assets import envs
from orchestration.assets import build_assets
from orchestration.resources import RegistryResource, ServingResource, resources_from_env
from tests.test_clean_assets import small_spec
from tests.test_registry import make_adapter_dir


def test_resources_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(envs.REGISTRY.name, str(tmp_path / "shared" / "reg.duckdb"))
    monkeypatch.setenv(envs.SERVING_URL.name, "http://lb.internal:8000")
    monkeypatch.setenv(envs.ADMIN_KEY.name, "s3cret")
    res = resources_from_env(tmp_path / "home")
    assert res["lorafoundry"].home == str((tmp_path / "home").resolve())
    assert res["registry"].path == str(tmp_path / "shared" / "reg.duckdb")
    assert res["serving"].url == "http://lb.internal:8000"
    # the key is an EnvVar: the UI shows its name; the resource sees the value when it runs
    assert isinstance(res["serving"].admin_key, dg.EnvVar)

    @dg.asset
    def probe(serving: ServingResource, registry: RegistryResource) -> dict:
        return {"key": serving.admin_key, "registry": str(registry.open().path)}

    result = dg.materialize([probe], resources=res)
    assert result.output_for_node("probe") == {"key": "s3cret", "registry": str(tmp_path / "shared" / "reg.duckdb")}

    monkeypatch.delenv(envs.REGISTRY.name)
    monkeypatch.delenv(envs.SERVING_URL.name)
    monkeypatch.delenv(envs.ADMIN_KEY.name)
    res = resources_from_env(tmp_path / "home")
    assert res["registry"].path == str((tmp_path / "home" / "registry.duckdb").resolve())
    assert res["serving"].url is None and res["serving"].admin_key is None


@pytest.mark.slow
def test_automation_follows_upstream_only_after_blocking_checks_pass(tmp_path, random_base):
    """A re-cleaned dataset makes training follow, unless a blocking check on the cleaning failed."""
    spec = small_spec(tmp_path, random_base)
    home = tmp_path / "home"
    defs = dg.Definitions(assets=build_assets(spec, deployment=False), resources=resources_from_env(home))
    chain = {dg.AssetKey(["adapter", "a", stage]) for stage in ("train", "eval", "register")}

    def requested(result) -> set[dg.AssetKey]:
        return {k for k in defs.resolve_asset_graph().get_all_asset_keys() if result.get_num_requested(k)}

    with dg.DagsterInstance.ephemeral() as instance:
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert first.total_requested == 0  # nothing happens on the first evaluation

        def clean() -> dict[str, bool]:
            r = dg.materialize(
                build_assets(spec, deployment=False),
                selection=["dataset/d/clean"],
                instance=instance,
                resources=resources_from_env(home),
                raise_on_error=False,
            )
            return {e.asset_check_key.name: e.passed for e in r.get_asset_check_evaluations()}

        dg.materialize(  # as every whole-graph run does: a parent never materialized holds automation back
            build_assets(spec, deployment=False),
            selection=[f"base_model/{random_base.name}"],
            instance=instance,
            resources=resources_from_env(home),
        )
        assert all(clean().values())
        passed = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        assert requested(passed) == chain  # one run: train, then eval and register
        run = dg.materialize(
            build_assets(spec, deployment=False),
            selection=[k.to_user_string() for k in chain],
            instance=instance,
            resources=resources_from_env(home),
        )  # what the sensor launches
        assert run.success
        idle = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=passed.cursor)
        assert idle.total_requested == 0  # the sensor's next tick: everything is up to date

        out_dir = Path(json.loads((home / "datasets" / "d" / "current.json").read_text())["dir"])
        with (out_dir / "eval.jsonl").open("a") as f:  # a train row leaks into eval
            f.write((out_dir / "train.jsonl").read_text().splitlines()[0] + "\n")
        assert clean()["no_train_eval_leakage"] is False
        blocked = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=idle.cursor)
        assert blocked.total_requested == 0

        assert all(clean().values()) is False  # still leaking: nothing follows on later ticks either
        later = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=blocked.cursor)
        assert later.total_requested == 0

        lines = (out_dir / "eval.jsonl").read_text().splitlines()
        (out_dir / "eval.jsonl").write_text("\n".join(lines[:-2]) + "\n")  # the data is fixed
        assert all(clean().values())
        fixed = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=later.cursor)
        assert requested(fixed) == chain


def test_promotion_sensor_cursor_starts_at_now_and_holds_on_failure(tmp_path, monkeypatch):
    from orchestration.sensors import notify_new_promotions
    from registry.records import NewAdapter
    from registry.store import AdapterRegistry

    reg = AdapterRegistry(tmp_path / "registry.duckdb")
    v = [
        reg.register(
            NewAdapter(name="a", path=make_adapter_dir(tmp_path / f"d{i}", seed=i), base_model="b", promote="manual")
        )
        for i in range(4)
    ]
    lines, empty = notify_new_promotions(reg, tmp_path, None)  # no promotion yet: the very first one will count
    reg.promote("a", v[3].version)
    assert notify_new_promotions(reg, tmp_path, empty)[0] == [
        f"a@{v[3].version}: promoted; no running deployment serves a"
    ]
    reg.promote("a", v[0].version)
    lines, cursor = notify_new_promotions(reg, tmp_path, None)
    assert lines == [] and cursor  # the first tick records history, sends nothing

    reg.promote("a", v[1].version)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    lines, held = notify_new_promotions(reg, tmp_path, cursor, url=dead, admin_key="k")
    assert len(lines) == 1 and "could not update the server (will retry)" in lines[0]
    assert held == cursor  # retried next tick

    lines, moved = notify_new_promotions(reg, tmp_path, cursor)  # no deployment: nothing to update
    assert lines == [f"a@{v[1].version}: promoted; no running deployment serves a"] and moved > cursor
    assert notify_new_promotions(reg, tmp_path, moved) == ([], moved)

    reg.promote("a", v[2].version)  # a refusal (here: no admin key at all) is reported once, not retried
    monkeypatch.delenv(envs.ADMIN_KEY.name, raising=False)
    lines, after = notify_new_promotions(reg, tmp_path, moved, url=dead)
    assert "refused the update (not retried)" in lines[0] and after > moved


def test_promotion_sensor_reloads_or_unloads_when_a_champion_is_rejected(tmp_path, monkeypatch):
    """Decision logic against a recording HTTP endpoint (the real reload is tested on the session's vLLM in
    test_serving): a champion rejected on re-evaluation is replaced by the name's next servable version, or
    unloaded when there is none."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from orchestration.sensors import notify_new_promotions
    from registry.records import NewAdapter
    from registry.store import AdapterRegistry

    seen: list[tuple[str, dict]] = []

    class Recorder(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv(envs.ADMIN_KEY.name, "k")
    try:
        reg = AdapterRegistry(tmp_path / "registry.duckdb")
        metrics = {"eval_loss": {"base": 2.0, "adapter": 1.0}}

        def add(name: str, seed: int, status: str = "candidate"):
            return reg.register(
                NewAdapter(
                    name=name,
                    path=make_adapter_dir(tmp_path / f"{name}{seed}", seed=seed),
                    base_model="b",
                    metrics=metrics,
                    status=status,
                    promote="manual",
                )
            )

        a1, a2, b1 = add("a", 1), add("a", 2), add("b", 3)
        reg.promote("a", a2.version)
        reg.promote("b", b1.version)
        _, cursor = notify_new_promotions(reg, tmp_path, None, url=url)
        add("a", 2, status="rejected")  # a's champion fails a re-evaluation: a1 is what a deployment would serve
        add("b", 3, status="rejected")  # b's only version fails: nothing left to serve
        lines, _ = notify_new_promotions(reg, tmp_path, cursor, url=url)
        assert seen == [
            ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": a1.path, "load_inplace": True}),
            ("/v1/unload_lora_adapter", {"lora_name": "b"}),
        ], lines
    finally:
        server.shutdown()
