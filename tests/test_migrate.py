"""`lorafoundry registry migrate --to URL`: a home's registry file copied into a shared registry on a real Postgres,
its weights into a real S3-compatible store (both started by the test session): versions, aliases and their
history, events and sha256s the same on both sides; a second run adds nothing; a URL with a password, or a target
that is not a shared registry with a store, is refused before anything is copied. The demo home's round trip is
tests/test_team.py's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lora_assets import envs
from registry.records import NewAdapter
from registry.store import AdapterRegistry
from tests.test_registry_security import cli, make_adapter_dir, refused


def contents(reg: AdapterRegistry) -> dict[str, Any]:
    """Everything a registry holds about its versions, but where their files are (a local path, an object URL)."""
    records = reg.list()
    names = sorted({r.name for r in records})
    return {
        "versions": [r.model_dump(exclude={"path"}) for r in records],
        "aliases": reg.every_alias(),
        "history": {n: reg.alias_history(n) for n in names},
        "events": {n: reg.events(n) for n in names},
    }


def _local_registry(home: Path) -> AdapterRegistry:
    """A home's registry with two names, a promotion, an alias moved twice and an archived version."""
    reg = AdapterRegistry(home / "registry.duckdb")
    adapters = home / "adapters"
    a1 = reg.register(NewAdapter(name="a", path=make_adapter_dir(adapters / "a1"), base_model="b", promote="manual"))
    a2 = reg.register(
        NewAdapter(name="a", path=make_adapter_dir(adapters / "a2", seed=1), base_model="b", promote="manual")
    )
    reg.register(NewAdapter(name="other", path=make_adapter_dir(adapters / "o1", seed=2), base_model="b"))
    reg.promote("a", a2.version)
    reg.set_alias("a", "canary", a1.version)
    reg.set_alias("a", "canary", a2.version)
    reg.archive("a", a1.version)
    return reg


def test_migrate_copies_everything_checks_every_sha256_and_adds_nothing_twice(
    shared_registry, adapter_store, monkeypatch, tmp_path
):
    home = tmp_path / "home"
    local = _local_registry(home)
    monkeypatch.setenv(envs.ARTIFACTS.name, adapter_store)
    res = cli(home, "migrate", "--to", shared_registry)
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "added adapters 3," in flat and "3 versions verified there" in flat, flat
    shared = AdapterRegistry(shared_registry, store=adapter_store)
    assert contents(shared) == contents(local)
    assert all(r.path.startswith(adapter_store + "/") for r in shared.list())
    assert [v.ok for v in shared.verify()] == [True] * 3

    res = cli(home, "migrate", "--to", shared_registry)
    assert res.exit_code == 0, res.output
    assert "added adapters 0, aliases 0, alias_history 0, events 0" in " ".join(res.output.split()), res.output
    assert contents(shared) == contents(local)


def test_migrate_refuses_a_password_in_the_url_and_a_target_it_cannot_use(
    postgres, shared_registry, adapter_store, monkeypatch, tmp_path
):
    home = tmp_path / "home"
    _local_registry(home)
    with_password = shared_registry.replace("lorafoundry@", f"lorafoundry:{postgres.password}@")
    flat = refused(cli(home, "migrate", "--to", with_password, "--artifacts", adapter_store), "PGPASSWORD")
    assert postgres.password not in flat
    refused(cli(home, "migrate", "--to", shared_registry), "no adapter store", "--artifacts")
    refused(cli(home, "migrate", "--to", str(tmp_path / "r.duckdb"), "--artifacts", adapter_store), "a local file")
    refused(cli(tmp_path / "empty", "migrate", "--to", shared_registry), "no registry file at")
    assert AdapterRegistry(shared_registry).list() == []


@pytest.mark.parametrize("stop", ["postgres", "object_store"])
def test_a_service_stopped_mid_migrate_leaves_nothing_and_a_rerun_completes(
    request, stop, shared_registry, adapter_store, monkeypatch, tmp_path
):
    """The catalog or the store goes away after the first version's files are put: exit 1 naming the service, the
    shared registry holds no version; once it is back, the same command migrates everything."""
    from registry.objects import AdapterStore

    home = tmp_path / "home"
    local = _local_registry(home)
    server = request.getfixturevalue(stop)
    real = AdapterStore.begin_upload
    calls = []

    def stop_after_the_first(self, adapter_dir, sha256):
        calls.append(sha256)
        if len(calls) == 2:
            server.stop()
        return real(self, adapter_dir, sha256)

    monkeypatch.setattr(AdapterStore, "begin_upload", stop_after_the_first)
    try:
        res = cli(home, "migrate", "--to", shared_registry, "--artifacts", adapter_store)
    finally:
        monkeypatch.setattr(AdapterStore, "begin_upload", real)
        server.start()
    service = "adapter store at s3://" if stop == "object_store" else "shared registry at postgresql://"
    refused(res, service)
    assert AdapterRegistry(shared_registry).list() == []
    res = cli(home, "migrate", "--to", shared_registry, "--artifacts", adapter_store)
    assert res.exit_code == 0, res.output
    assert contents(AdapterRegistry(shared_registry, store=adapter_store)) == contents(local)
