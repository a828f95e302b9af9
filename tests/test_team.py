"""Two machines of a team, on real servers started by the test session: a Postgres for the shared registry and an
S3-compatible store (SeaweedFS) for the adapters (tests/servers.py).

Home A is the demo home as the session's materialization left it (its registry export, imported into a new home),
moved to the team with `lorafoundry registry migrate --to URL`. Home B is an empty dir that shares nothing with A
but the registry's URL and the store's: `lorafoundry serve` there pulls each version from the store into its own
verified store, checks its sha256, and serves it by plain name, `name@V` and `name:alias`; what A promotes, B
answers within its resolve interval; an object changed in the store is refused on every name form. One `serve`
process for the module (a vLLM start costs ~30 s); each test puts back what it changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import boto3
import pytest

from lora_assets import envs
from registry.records import NewAdapter
from registry.store import AdapterRegistry
from tests.test_migrate import contents
from tests.test_registry_security import cli
from tests.test_serve_command import stop_serve, wait_until_serving
from tests.test_serving import PROMPTS, _copy_adapter, _post, complete

pytestmark = pytest.mark.slow

#: B's resolve interval (LORAFOUNDRY_RESOLVE_TTL_S): how long a change on A may take to reach B's answers.
RESOLVE_S = 1.0


class Team(NamedTuple):
    url: str  # B's server
    registry: AdapterRegistry  # the shared registry, as home A opens it
    home_a: Path
    home_b: Path
    local: AdapterRegistry  # home A's registry file before the move
    migrated: str  # what `registry migrate` printed
    moved: dict  # the shared registry's contents right after the move (tests/test_migrate.py:contents)
    expected: dict[str, str]  # the session server's answers to PROMPTS[1] for each demo adapter's version


def _new_database(postgres) -> str:
    import uuid

    import psycopg

    name = f"team_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.admin_url, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name} OWNER lorafoundry")
    return postgres.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="module")
def team(vllm_server, demo_export, postgres, object_store, tmp_path_factory):
    from tests.conftest import DEMO_SPEC, free_port

    root = tmp_path_factory.mktemp("team")
    home_a, home_b = root / "a", root / "b"
    url, store = _new_database(postgres), f"{object_store.url}/team"
    shared_env = {**postgres.env(), **object_store.env(), envs.REGISTRY_URL.name: url, envs.ARTIFACTS.name: store}
    with pytest.MonkeyPatch.context() as m:
        res = cli(home_a, "import", str(demo_export))  # home A: the demo home's registry, in its own file
        assert res.exit_code == 0, res.output
        for name, value in shared_env.items():
            m.setenv(name, value)
        res = cli(home_a, "migrate", "--to", url)
        assert res.exit_code == 0, res.output
        migrated = res.output
        local = AdapterRegistry(home_a / "registry.duckdb")
        shared = AdapterRegistry(url, store=store, actor="home-a")
        moved = contents(shared)
        expected = {r.name: complete(vllm_server["url"], f"{r.name}@{r.version}", PROMPTS[1]) for r in local.list()}
        port = free_port()
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "lorafoundry"), "serve", str(DEMO_SPEC), "--home", str(home_b)]
            + ["--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **shared_env, envs.RESOLVE_TTL_S.name: str(RESOLVE_S), "COLUMNS": "200"},
        )
        try:
            output = wait_until_serving(proc, port)
            assert proc.poll() is None, output
            yield Team(f"http://127.0.0.1:{port}", shared, home_a, home_b, local, migrated, moved, expected)
        finally:
            stop_serve(proc)


def test_the_demo_home_round_trips_through_migrate(team):
    """Same versions, aliases, history, events and sha256s; every version's objects are in the store and check."""
    assert "versions verified there" in " ".join(team.migrated.split())
    assert team.moved == contents(team.local)
    assert all(v.ok for v in team.registry.verify())


def test_home_b_serves_what_home_a_registered_under_every_name_form(team):
    """B holds nothing of A's but what it pulled into its verified store; every name form answers with A's
    weights: the session server's answer for the same version, token for token."""
    rec = team.registry.champion("categories")
    team.registry.set_alias("categories", "prod", rec.version)
    try:
        time.sleep(RESOLVE_S + 0.5)
        for ref in ("categories", f"categories@{rec.version}", "categories:prod"):
            body = {"model": ref, "prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0}
            r = _post(team.url, "/v1/completions", body)
            assert r.status_code == 200, (ref, r.text)
            assert r.json()["model"] == ("categories" if ref == "categories" else f"categories@{rec.version}")
            assert r.json()["choices"][0]["text"] == team.expected["categories"], ref
    finally:
        team.registry.set_alias("categories", "prod", None)
    verified = team.home_b / "serving" / "verified"
    weights = [p for p in team.home_b.rglob("adapter_model.safetensors") if not p.is_relative_to(verified)]
    assert weights == [] and (verified / rec.adapter_sha256).is_dir()


def test_a_promotion_on_home_a_reaches_home_b_within_its_resolve_interval(team, tmp_path):
    """A registers a `sentiment` version with the categories weights and promotes it; within B's resolve interval
    B's `sentiment` answers with them, and the old version stays addressable."""
    reg = team.registry
    old, cat = reg.champion("sentiment"), reg.champion("categories")
    scratch = _copy_adapter(team.local.get("categories", cat.version).path, tmp_path / "swap")
    new = reg.register(
        NewAdapter(
            name="sentiment", path=scratch, base_model=old.base_model, promote="manual",
            base_model_hash=old.base_model_hash, metrics=old.metrics,
        )
    )  # fmt: skip
    assert complete(team.url, "sentiment", PROMPTS[1]) == team.expected["sentiment"]
    try:
        reg.promote("sentiment", new.version)
        promoted = time.monotonic()
        while complete(team.url, "sentiment", PROMPTS[1]) != team.expected["categories"]:
            assert time.monotonic() - promoted < RESOLVE_S + 1.0, "B still answers with the old champion"
            time.sleep(0.1)
        assert complete(team.url, f"sentiment@{old.version}", PROMPTS[1]) == team.expected["sentiment"]
    finally:
        reg.promote("sentiment", old.version)
        reg.archive("sentiment", new.version)
    time.sleep(RESOLVE_S + 0.5)
    assert complete(team.url, "sentiment", PROMPTS[1]) == team.expected["sentiment"]


def test_an_object_changed_in_the_store_is_refused_on_every_name_form(team):
    """The champion's weights rewritten in the bucket (same size, one byte): 409 on the plain name, `name@V` and
    `name:alias`, the server answers the rest, and `registry verify` names the version. Put back after."""
    from registry.objects import AdapterStore

    rec = team.registry.champion("categories")
    store = AdapterStore(team.registry.store.url)
    s3 = boto3.client("s3")
    key = f"{store.prefix}/{rec.adapter_sha256}/adapter_model.safetensors"
    good = s3.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    bad = bytearray(good)
    bad[-1] ^= 1
    team.registry.set_alias("categories", "prod", rec.version)
    s3.put_object(Bucket=store.bucket, Key=key, Body=bytes(bad))
    try:
        time.sleep(RESOLVE_S + 0.5)
        for ref in ("categories", f"categories@{rec.version}", "categories:prod"):
            r = _post(team.url, "/v1/completions", {"model": ref, "prompt": PROMPTS[1], "max_tokens": 4})
            assert (r.status_code, r.json()["error"]["type"]) == (409, "AdapterIntegrityError"), (ref, r.text)
        assert complete(team.url, "sentiment", PROMPTS[1]) == team.expected["sentiment"]
        res = cli(team.home_a, "verify", "--json")
        assert res.exit_code == 1, res.output
        results = {(v["name"], v["version"]): v for v in map(json.loads, res.output.splitlines())}
        assert not results["categories", rec.version]["ok"]
        assert "changed after it was registered" in results["categories", rec.version]["detail"]
        assert [k for k, v in results.items() if not v["ok"]] == [("categories", rec.version)]
    finally:
        s3.put_object(Bucket=store.bucket, Key=key, Body=good)
        team.registry.set_alias("categories", "prod", None)
    time.sleep(RESOLVE_S + 0.5)
    assert complete(team.url, "categories", PROMPTS[1]) == team.expected["categories"]
