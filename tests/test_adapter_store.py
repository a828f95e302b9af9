"""The adapter store several machines share (registry/objects.py) on a real S3-compatible server (SeaweedFS, started
by the test session) with the shared registry on a real Postgres: the object is whole before its row commits, a
server on another home pulls it into its own verified store and checks its sha256 first, an object changed after
registration is refused, and a store that goes away mid-register leaves nothing behind that the next writer keeps."""

from __future__ import annotations

import time
from pathlib import Path

import boto3
import pytest

from registry.errors import RegistryUnavailableError
from registry.objects import ADAPTER_FILES, AdapterStore
from registry.records import NewAdapter, adapter_sha256
from registry.store import AdapterRegistry
from serving.resolver import AdapterResolver, Refusal
from serving.settings import ServerSettings
from tests.test_registry_security import make_adapter_dir


def _objects(store: AdapterStore) -> list[str]:
    s3 = boto3.client("s3")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=store.prefix + "/")
    return sorted(o["Key"].removeprefix(store.prefix + "/") for p in pages for o in p.get("Contents", []))


def _rewrite_same_size(store: AdapterStore, sha: str) -> None:
    """Overwrite the stored weights with one byte changed, as someone with write access to the bucket would."""
    s3 = boto3.client("s3")
    key = f"{store.prefix}/{sha}/adapter_model.safetensors"
    data = bytearray(s3.get_object(Bucket=store.bucket, Key=key)["Body"].read())
    data[-1] ^= 1
    s3.put_object(Bucket=store.bucket, Key=key, Body=bytes(data))


def _resolver(url: str, store: str, home: Path) -> AdapterResolver:
    """The resolver a server on ``home`` runs (another machine: nothing of machine A on its disk)."""
    settings = ServerSettings(
        registry=url, base_hash="h" * 64, base_name="base", adapter_root=home / "adapters",
        stage_root=home / "serving" / "verified", store=store,
    )  # fmt: skip
    return AdapterResolver(settings, ttl_s=0)


def test_a_version_registered_on_one_machine_is_pulled_and_checked_on_another(shared_registry, adapter_store, tmp_path):
    machine_a, machine_b = tmp_path / "a", tmp_path / "b"
    reg_a = AdapterRegistry(shared_registry, store=adapter_store)
    src = make_adapter_dir(machine_a / "adapters" / "x1")
    rec = reg_a.register(NewAdapter(name="x", path=src, base_model="b", base_model_hash="h" * 64))
    store = AdapterStore(adapter_store)
    sha = adapter_sha256(src)[0]
    assert rec.path == store.object_url(sha) and rec.adapter_sha256 == sha
    assert _objects(store) == [f"{sha}/{name}" for name in sorted(ADAPTER_FILES)]  # no upload marker left
    assert reg_a.register(NewAdapter(name="y", path=src, base_model="b")).path == rec.path  # stored once
    assert [v.ok for v in reg_a.verify()] == [True, True]

    reg_a.set_alias("x", "prod", rec.version)
    resolver = _resolver(shared_registry, adapter_store, machine_b)
    staged = machine_b / "serving" / "verified" / sha
    for ref in ("x", f"x@{rec.version}", "x:prod"):
        answer = resolver.resolve(ref)
        assert not isinstance(answer, Refusal), (ref, answer)
        assert answer.adapter_sha256 == sha and staged.is_dir()
    assert adapter_sha256(staged)[0] == sha
    assert not (machine_b / "adapters").exists()  # nothing but the verified copy was written on machine B


def test_an_object_changed_after_registration_is_refused_and_verify_names_it(shared_registry, adapter_store, tmp_path):
    reg = AdapterRegistry(shared_registry, store=adapter_store)
    rec = reg.register(
        NewAdapter(name="x", path=make_adapter_dir(tmp_path / "x1"), base_model="b", base_model_hash="h" * 64)
    )
    resolver = _resolver(shared_registry, adapter_store, tmp_path / "server")
    assert not isinstance(resolver.admit(rec), Refusal)  # pulled, checked and staged
    _rewrite_same_size(AdapterStore(adapter_store), rec.adapter_sha256)
    refusal = resolver.admit(rec)  # the staged copy is intact, but the store's object is not what was registered
    assert isinstance(refusal, Refusal) and (refusal.status, refusal.type) == (409, "AdapterIntegrityError")
    (result,) = reg.verify()
    assert not result.ok and "changed after it was registered" in result.detail


def test_an_object_outside_the_servers_store_is_refused(shared_registry, adapter_store, tmp_path):
    reg = AdapterRegistry(shared_registry, store=adapter_store)
    rec = reg.register(
        NewAdapter(name="x", path=make_adapter_dir(tmp_path / "x1"), base_model="b", base_model_hash="h" * 64)
    )
    other = _resolver(shared_registry, adapter_store.rsplit("/", 1)[0] + "/another-prefix", tmp_path / "server")
    refusal = other.admit(rec)
    assert isinstance(refusal, Refusal) and (refusal.status, refusal.type) == (403, "PathNotAllowed")


def test_the_store_stopped_mid_register_leaves_nothing_the_next_writer_keeps(
    object_store, shared_registry, adapter_store, tmp_path, monkeypatch
):
    """The store stops after this writer left its marker and put the config, before the weights: a clear error
    naming the store (no key in it), no version; the next writer, once the marker is stale, removes the orphan."""
    reg = AdapterRegistry(shared_registry, store=adapter_store)
    store = AdapterStore(adapter_store, orphan_after_s=1.0)
    real_exists = AdapterStore._exists

    def stop_before_the_weights(self, s3, key):
        if key.endswith("adapter_model.safetensors"):
            object_store.stop()
        return real_exists(self, s3, key)

    monkeypatch.setattr(AdapterStore, "_exists", stop_before_the_weights)
    d = make_adapter_dir(tmp_path / "x1")
    try:
        with pytest.raises(RegistryUnavailableError, match="adapter store at s3://") as e:
            reg.register(NewAdapter(name="x", path=d, base_model="b"))
    finally:
        monkeypatch.setattr(AdapterStore, "_exists", real_exists)
        object_store.start()
    assert object_store.secret_key not in str(e.value) and object_store.access_key not in str(e.value)
    assert reg.list() == []
    sha = adapter_sha256(d)[0]
    left = _objects(store)
    assert f"{sha}/adapter_config.json" in left and f"{sha}/adapter_model.safetensors" not in left
    time.sleep(1.1)
    next_writer = AdapterRegistry(shared_registry, store=adapter_store)
    next_writer.store = store  # the same store, with a 1 s threshold instead of 15 min
    other = make_adapter_dir(tmp_path / "y1", seed=5)
    rec = next_writer.register(NewAdapter(name="y", path=other, base_model="b"))
    assert _objects(store) == [f"{rec.adapter_sha256}/{name}" for name in sorted(ADAPTER_FILES)]


def test_a_changed_verified_copy_is_staged_again_from_the_store(shared_registry, adapter_store, tmp_path):
    """What vLLM's worker does when the verified copy it is about to load changed on disk (serving/vllm_plugin.py):
    on a machine whose registry rows point at the store, the copy is staged again from the pulled objects."""
    from serving.integrity import staged_intact
    from tests.test_fault_isolation import _flip_staged

    reg = AdapterRegistry(shared_registry, store=adapter_store)
    rec = reg.register(
        NewAdapter(name="x", path=make_adapter_dir(tmp_path / "x1"), base_model="b", base_model_hash="h" * 64)
    )
    resolver = _resolver(shared_registry, adapter_store, tmp_path / "server")
    staged = resolver.admit(rec)
    assert not isinstance(staged, Refusal)
    _flip_staged(staged)
    assert not staged_intact(staged)
    assert resolver.restage(rec.adapter_sha256) == staged
    assert staged_intact(staged) and adapter_sha256(staged)[0] == rec.adapter_sha256
