"""GET /v1/adapters through the guard, on a real registry file: every version the server would serve, with the
names a client can send, and whether vLLM has it loaded (vLLM itself stands in as an ASGI app answering
/v1/models; the real-server test is tests/test_serving.py::test_catalog_lists_every_servable_version)."""

from __future__ import annotations

import asyncio
import json

import pytest

from lora_assets import envs
from registry.records import NewAdapter
from registry.store import AdapterRegistry
from serving.guard import LoraFoundryGuard
from tests.test_guard import make_resolver
from tests.test_registry import make_adapter_dir

BASE_HASH = "b" * 64


def downstream(loaded: list[str], status: int = 200):
    """Stands in for vLLM: /v1/models lists ``loaded``; any other route answers 599 so a leak would show."""

    async def app(scope, receive, send) -> None:
        ok = scope["path"] == "/v1/models" and scope["method"] == "GET"
        body = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in loaded]}).encode()
        await send({"type": "http.response.start", "status": status if ok else 599, "headers": []})
        await send({"type": "http.response.body", "body": body if ok else b"{}"})

    return app


def get(app: LoraFoundryGuard, path: str, headers: list | None = None) -> tuple[int, dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "GET", "path": path, "headers": headers or []}, receive, send))
    (start,) = [m for m in sent if m["type"] == "http.response.start"]
    return start["status"], json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


@pytest.fixture
def registry(tmp_path) -> AdapterRegistry:
    reg = AdapterRegistry(tmp_path / "registry.duckdb")
    adapters = tmp_path / "adapters"

    def add(name: str, seed: int, r: int = 4, status: str = "candidate", base: str = BASE_HASH, **extra):
        return reg.register(
            NewAdapter(
                name=name,
                path=make_adapter_dir(adapters / f"{name}-{seed}", r=r, seed=seed),
                base_model="tiny",
                base_model_hash=base,
                status=status,
                metrics={"exact_match": {"base": 0.1, "adapter": 0.6, "gain": 0.5}, "eval_loss": {"adapter": 1.2}},
                **extra,
            )
        )

    add("sentiment", 1)  # v1, then promoted: the champion
    reg.promote("sentiment", 1)
    add("sentiment", 2)  # v2: a candidate, not what the plain name serves
    reg.set_alias("sentiment", "canary", 2)
    add("sentiment", 3, status="rejected")  # failed its gate: never listed
    add("sentiment", 4, base="0" * 64)  # another base: not for this server
    add("sentiment", 5, r=64)  # above the server's max rank
    add("categories", 6, training_config={"variant": "rslora"})
    return reg


@pytest.fixture
def guard(registry, tmp_path, monkeypatch):
    for var in (envs.VLLM_API_KEY.name, envs.REGISTRY.name, envs.STATIC_MODELS.name):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(envs.BASE_NAME.name, "tiny")

    def make(loaded: list[str], static: str = "", api_key: str = "") -> LoraFoundryGuard:
        resolver = make_resolver(registry.path, BASE_HASH, tmp_path / "adapters", ttl_s=0)
        for var, value in resolver.settings.to_env().items():  # what plan_server hands vLLM
            monkeypatch.setenv(var, value)
        monkeypatch.setenv(envs.STATIC_MODELS.name, static)
        monkeypatch.setenv(envs.VLLM_API_KEY.name, api_key)
        app = LoraFoundryGuard(downstream(loaded))
        app.resolver = resolver
        return app

    return make


def test_lists_every_servable_version_with_its_names_and_load_state(guard):
    status, body = get(guard(["tiny", "sentiment", "categories@1"], static="sentiment@1"), "/v1/adapters")
    assert status == 200 and body["object"] == "list"
    entries = {e["id"]: e for e in body["data"]}
    assert set(entries) == {"sentiment@1", "sentiment@2", "categories@1"}  # rejected, foreign base, r=64 left out
    champion, canary, other = entries["sentiment@1"], entries["sentiment@2"], entries["categories@1"]
    assert champion["status"] == "champion"
    assert champion["model_names"] == ["sentiment", "sentiment@1", "sentiment:champion"]
    assert champion["loaded"] is True  # held under the plain name since start
    assert canary["status"] == "candidate" and canary["aliases"] == ["canary"]
    assert canary["model_names"] == ["sentiment@2", "sentiment:canary"] and canary["loaded"] is False
    assert other["loaded"] is True and other["variant"] == "rslora" and other["model_names"][0] == "categories"
    assert champion["variant"] == "lora" and champion["r"] == 4
    assert champion["metrics"] == {"exact_match": {"adapter": 0.6, "gain": 0.5}, "eval_loss": {"adapter": 1.2}}


def test_a_plain_name_loaded_at_start_counts_only_for_the_version_it_holds(guard):
    _, body = get(guard(["tiny", "sentiment"], static="sentiment@2"), "/v1/adapters")
    loaded = {e["id"]: e["loaded"] for e in body["data"]}
    assert loaded == {"sentiment@1": False, "sentiment@2": True, "categories@1": False}


def test_the_catalog_needs_the_client_key(guard):
    app = guard(["tiny"], api_key="client-key")
    assert get(app, "/v1/adapters")[0] == 401
    assert get(app, "/v1/adapters", [(b"authorization", b"Bearer wrong")])[0] == 401
    status, body = get(app, "/v1/adapters", [(b"authorization", b"Bearer client-key")])
    assert status == 200 and len(body["data"]) == 3


def test_other_methods_on_the_catalog_are_closed(guard):
    app = guard(["tiny"])
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "POST", "path": "/v1/adapters", "headers": []}, receive, send))
    assert sent[0]["status"] == 404


def test_vllm_not_answering_its_model_list_means_nothing_is_loaded(guard, monkeypatch):
    app = guard([])
    app.app = downstream(["sentiment"], status=500)
    status, body = get(app, "/v1/adapters")
    assert status == 200 and not any(e["loaded"] for e in body["data"])
