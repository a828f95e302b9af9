"""serving/guard.py and serving/resolver.py without a server: registry errors become HTTP codes by their type, and
concurrent lookups of one name share one registry read and one sha256 (the real-server tests are in
tests/test_serving.py and tests/test_security_serving.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from lora_assets import envs
from lora_assets.home import Home
from registry.errors import (
    AdapterNotFoundError,
    RegistryBusyError,
    RegistryConflictError,
    RegistryCorruptError,
    RegistryError,
    RegistryInputError,
    RegistrySchemaError,
)
from registry.records import AdapterRecord
from serving import resolver as resolver_module
from serving.guard import LoraFoundryGuard
from serving.resolver import AdapterResolver
from serving.settings import ServerSettings

BASE_HASH = "b" * 64


class SubclassOfNotFoundError(AdapterNotFoundError):
    """A registry error class the guard's table does not name: it takes its nearest parent's answer."""


class NewRegistryError(RegistryError):
    """A new direct subclass of the base: the base's answer."""


def record(tmp_path: Path, name: str = "sentiment", version: int = 3, **fields) -> AdapterRecord:
    values = {
        "name": name,
        "version": version,
        "status": "candidate",
        "base_model": "tiny",
        "base_model_hash": BASE_HASH,
        "method": "lora",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj"],
        "path": str(tmp_path / "adapters" / name),
        "adapter_sha256": "a" * 64,
        "size_bytes": 1,
        "created_at": datetime(2025, 1, 1),
    }
    return AdapterRecord(**{**values, **fields})


def make_resolver(registry: Path, base_hash: str, adapter_root: Path, ttl_s: float | None = None) -> AdapterResolver:
    """A resolver with the settings `plan_server` would give a server of this home (rank 16, the home's store)."""
    settings = ServerSettings(
        registry=registry,
        base_hash=base_hash,
        base_name="tiny",
        adapter_root=adapter_root,
        stage_root=Home.at(Path(registry).parent).verified,
    )
    return AdapterResolver(settings, ttl_s=ttl_s)


@pytest.fixture
def resolver(tmp_path) -> AdapterResolver:
    """A resolver over a registry file that is never opened: each test replaces the registry reads it needs."""
    (tmp_path / "adapters").mkdir()
    return make_resolver(tmp_path / "registry.duckdb", BASE_HASH, tmp_path / "adapters", ttl_s=2)


async def _downstream(scope, receive, send) -> None:
    """Stands in for vLLM: answers 200 with the body it was given."""
    message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": message["body"]})


def ask(app: LoraFoundryGuard, path: str, body: dict, headers: list | None = None) -> tuple[int, dict]:
    """One POST through the guard's ASGI app: (status, JSON body)."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers or []}
    asyncio.run(app(scope, receive, send))
    (start,) = [m for m in sent if m["type"] == "http.response.start"]
    return start["status"], json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


@pytest.fixture
def app(resolver, monkeypatch) -> LoraFoundryGuard:
    monkeypatch.delenv(envs.REGISTRY.name, raising=False)
    monkeypatch.delenv(envs.VLLM_API_KEY.name, raising=False)
    monkeypatch.setenv(envs.ADMIN_KEY.name, "admin")
    monkeypatch.setenv(envs.BASE_NAME.name, "tiny")
    monkeypatch.delenv(envs.STATIC_MODELS.name, raising=False)
    app = LoraFoundryGuard(_downstream)
    app.resolver = resolver
    return app


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (AdapterNotFoundError, 404, "NotFoundError"),
        (RegistryInputError, 400, "InvalidModelName"),
        (RegistryBusyError, 503, "RegistryUnavailable"),
        (RegistryCorruptError, 503, "RegistryUnavailable"),
        (RegistrySchemaError, 503, "RegistryUnavailable"),  # no entry of its own: RegistryError's, by the MRO
        (RegistryConflictError, 409, "RegistryConflict"),
        (RegistryError, 503, "RegistryUnavailable"),
        (SubclassOfNotFoundError, 404, "NotFoundError"),
        (NewRegistryError, 503, "RegistryUnavailable"),
    ],
)
@pytest.mark.parametrize("ref", ["sentiment@3", "sentiment:prod", "sentiment"])
def test_registry_errors_map_to_http_codes_by_type_not_message(app, resolver, monkeypatch, error, status, kind, ref):
    """The message is reworded to say something else entirely (even another error's words): the code follows the
    type, on generation and admin routes alike. A server-side failure's message stays in the log (it names this
    machine's files); the client reads that the registry is unavailable."""
    from serving.resolver import REGISTRY_UNAVAILABLE

    message = "something entirely different: registry locked by another writer; no such adapter; invalid name"

    def fail(*args, **kwargs):
        raise error(message)

    monkeypatch.setattr(resolver.registry, "get", fail)
    monkeypatch.setattr(resolver.registry, "servable", fail)
    code, body = ask(app, "/v1/completions", {"model": ref, "prompt": "hi"})
    told = message if status < 500 else REGISTRY_UNAVAILABLE
    assert (code, body["error"]["type"], body["error"]["message"]) == (status, kind, told)
    assert body["error"]["code"] == status
    code, body = ask(app, "/v1/load_lora_adapter", {"lora_name": ref}, [(b"x-admin-key", b"admin")])
    assert (code, body["error"]["type"]) == (status, kind)


def test_nearest_class_in_the_mro_decides(monkeypatch):
    """A class listed in the table wins over its parents; a new class with its own entry gets that entry."""
    monkeypatch.setitem(resolver_module.REGISTRY_ERRORS, SubclassOfNotFoundError, (409, "Conflict"))
    refusal = resolver_module.registry_refusal(SubclassOfNotFoundError("not found"))
    assert (refusal.status, refusal.type) == (409, "Conflict")
    assert resolver_module.registry_refusal(AdapterNotFoundError("conflict")).status == 404


@pytest.mark.parametrize(
    ("ref", "status"),
    [("../../etc/passwd", 400), ("a..b", 400), ("x@1234567890", 400), ("x:123", 400), ("-x", 400), ("x" * 65, 400)],
)
def test_malformed_names_are_refused_before_any_registry_read(app, resolver, monkeypatch, ref, status):
    def read(*args, **kwargs):
        raise AssertionError("the registry was read")

    monkeypatch.setattr(resolver.registry, "get", read)
    monkeypatch.setattr(resolver.registry, "servable", read)
    code, body = ask(app, "/v1/chat/completions", {"model": ref, "messages": []})
    assert (code, body["error"]["type"]) == (status, "InvalidModelName")


def test_a_servable_name_goes_on_as_name_at_version(app, resolver, tmp_path, monkeypatch):
    rec = record(tmp_path)
    monkeypatch.setattr(resolver.registry, "servable", lambda: [rec])
    monkeypatch.setattr(resolver_module, "adapter_sha256", lambda path: (rec.adapter_sha256, 1))
    monkeypatch.setattr(resolver_module, "stage", lambda path, sha, root: root / sha)
    monkeypatch.setattr(resolver_module, "weights_problem", lambda adapter_dir: None)  # no files behind the fake stage
    code, body = ask(app, "/v1/completions", {"model": "sentiment", "prompt": "hi"})
    assert (code, body) == (200, {"model": "sentiment@3", "prompt": "hi"})


def _count_lookups(resolver, tmp_path, monkeypatch, delay_s: float = 0.3) -> dict[str, int]:
    """Replace the registry read and the sha256 of ``resolver`` by slow counted fakes; return the counts."""
    counts = {"get": 0, "sha256": 0}
    lock = threading.Lock()

    def get(ref):
        with lock:
            counts["get"] += 1
        time.sleep(delay_s)
        name, _, version = ref.partition("@")
        return record(tmp_path, name=name, version=int(version))

    def sha256(path):
        with lock:
            counts["sha256"] += 1
        time.sleep(delay_s)
        return "a" * 64, 1

    monkeypatch.setattr(resolver.registry, "get", get)
    monkeypatch.setattr(resolver_module, "adapter_sha256", sha256)
    monkeypatch.setattr(resolver_module, "stage", lambda path, sha, root: root / sha)
    monkeypatch.setattr(resolver_module, "weights_problem", lambda adapter_dir: None)  # no files behind the fake stage
    return counts


@pytest.mark.parametrize("ttl_s", [2, 0.1, 0])
def test_concurrent_requests_for_one_uncached_name_do_one_lookup(resolver, tmp_path, monkeypatch, ttl_s):
    """Also when the lookup (0.6 s here) outlasts the cache time: the waiters take the answer found meanwhile."""
    resolver.ttl_s = ttl_s
    counts = _count_lookups(resolver, tmp_path, monkeypatch)
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: resolver.resolve("sentiment@3"), range(8)))
    assert counts == {"get": 1, "sha256": 1}
    assert all(isinstance(a, AdapterRecord) and a.version == 3 for a in answers)


def test_concurrent_requests_for_one_name_through_the_guard_do_one_lookup(app, resolver, tmp_path, monkeypatch):
    counts = _count_lookups(resolver, tmp_path, monkeypatch)

    async def many() -> list:
        body = json.dumps({"model": "sentiment@4", "prompt": "hi"}).encode()
        statuses = []

        async def one() -> None:
            async def receive():
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message):
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            await app({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive, send)

        await asyncio.gather(*(one() for _ in range(6)))
        return statuses

    assert asyncio.run(many()) == [200] * 6
    assert counts == {"get": 1, "sha256": 1}


def test_a_slow_lookup_does_not_hold_up_other_names(resolver, tmp_path, monkeypatch):
    release = threading.Event()
    started = threading.Event()

    def get(ref):
        if ref.startswith("slow"):
            started.set()
            assert release.wait(10)
        name, _, version = ref.partition("@")
        return record(tmp_path, name=name, version=int(version))

    monkeypatch.setattr(resolver.registry, "get", get)
    monkeypatch.setattr(resolver_module, "adapter_sha256", lambda path: ("a" * 64, 1))
    monkeypatch.setattr(resolver_module, "stage", lambda path, sha, root: root / sha)
    monkeypatch.setattr(resolver_module, "weights_problem", lambda adapter_dir: None)  # no files behind the fake stage
    with ThreadPoolExecutor(max_workers=2) as pool:
        slow = pool.submit(resolver.resolve, "slow@1")
        assert started.wait(10)
        assert resolver.resolve("fast@2").version == 2  # answered while "slow@1" is still being looked up
        assert not slow.done()
        release.set()
        assert slow.result(10).version == 1
    assert resolver_module._LOOKUP_LOCKS._locks == {}  # no lock left behind per client-chosen name


def test_answers_are_reused_within_the_ttl_and_fresh_asks_again(resolver, tmp_path, monkeypatch):
    counts = _count_lookups(resolver, tmp_path, monkeypatch, delay_s=0)
    resolver.resolve("sentiment@5")
    resolver.resolve("sentiment@5")
    assert counts["get"] == 1
    resolver.resolve("sentiment@5", fresh=True)
    assert counts["get"] == 2
    resolver.ttl_s = 0
    resolver.resolve("sentiment@5")
    assert counts["get"] == 3
