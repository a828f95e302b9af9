"""What the running vLLM server answers, and with which weights, decided from the registry: deny by default.

vLLM imports :class:`LoraFoundryGuard` through ``--middleware serving.guard.LoraFoundryGuard``. It reads the
server's settings (serving/settings.py: registry, base, adapter root, verified store, rank, the names loaded at
start) from the environment that ``lorafoundry serve`` / the deployment asset give vLLM, the admin key from
``LORAFOUNDRY_ADMIN_KEY`` (``X-Admin-Key``) and the client key from ``VLLM_API_KEY`` (``Authorization: Bearer``,
required on every route but ``GET /health``). Whether a version may be served is the resolver's one rule
(serving/resolver.py).

Routes: only those in :data:`ROUTES` reach vLLM; any other method and path (vLLM's ``/v1/messages``,
``/invocations``, ``/tokenize``, ``/pooling``, ``/scale_elastic_ep``, its docs, websockets…) answers 404. A model
route's body is read here: every model name except the base's (``name``, ``name@VERSION``, ``name:ALIAS``) is
checked against the registry (entry, status, base model, rank, path, sha256) and refused with an OpenAI-shaped 4xx
that says why; when the checks pass, the request goes on for the version the name means now (``name@VERSION``, so
the answer's ``model`` says which version answered; a name loaded at start keeps its name while it still means the
version loaded). Admin loads are accepted only for what the registry serves under that name, and vLLM is given
the verified copy. ``GET /v1/adapters`` is answered here: the catalog of every version this server would serve
(serving/catalog.py); ``GET /metrics`` (admin key) too: lorafoundry's metrics, then vLLM's, and every request
writes one access-log line (serving/observe.py). Lookups are cached for ``LORAFOUNDRY_RESOLVE_TTL_S`` seconds
(default 2). Bodies are bounded
in size, nesting and time to arrive; the request head's time and connections per client in serving/http_limits.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST

from lora_assets import envs
from registry.errors import RegistryError, RegistryInputError
from registry.rules import parse_ref
from serving.catalog import catalog
from serving.observe import Exchange, metrics_text
from serving.resolver import AdapterResolver, Refusal, registry_refusal
from serving.settings import BODY_TIMEOUT_S, ServerSettings

log = logging.getLogger(f"vllm.lorafoundry.{__name__}")  # under "vllm": kept and printed by vLLM's logging

#: Every route the server answers, and who may call it: `open` (anyone), `client` (the client key when one is
#: set), `catalog` (client key; answered here, serving/catalog.py), `model` (client key, and the body's model is
#: checked), `admin` (client key and the admin key), `metrics` (client key and the admin key; answered here:
#: serving/observe.py's metrics, then vLLM's own).
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/health"): "open",
    ("GET", "/v1/models"): "client",
    ("GET", "/v1/adapters"): "catalog",
    ("POST", "/v1/chat/completions"): "model",
    ("POST", "/v1/completions"): "model",
    ("POST", "/v1/load_lora_adapter"): "admin",
    ("POST", "/v1/unload_lora_adapter"): "admin",
    ("GET", "/metrics"): "metrics",
}
#: Largest `n` / `best_of` a request may ask for (each choice is a full generation).
MAX_CHOICES = 16
#: Largest request body the guard reads (a prompt of the longest context is far below it).
MAX_BODY_BYTES = 4 << 20
#: Deepest nesting of arrays and objects a request body may have (a chat request with tools and a JSON schema is
#: far below it; Python's parser itself gives up near 1,000 with a RecursionError).
MAX_JSON_DEPTH = 64


async def _send_json(send, status: int, body: bytes) -> None:
    await _send(send, status, body, "application/json")


async def _send(send, status: int, body: bytes, content_type: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class LoraFoundryGuard:
    """ASGI middleware in front of vLLM: the route allowlist, both keys, and registry checks on model names."""

    def __init__(self, app, env: Mapping[str, str] | None = None) -> None:
        """``env``: where the keys and the server's settings are read (default: this process's environment, as
        in vLLM's process; the fleet's front passes the replicas' environment)."""
        self.app = app
        self.admin_key = envs.ADMIN_KEY.get(env) or ""
        # vLLM's own API-key check runs after this middleware, and only under /v1: check the client key here on
        # every route, so that a client without it learns nothing about the registry and causes no lookups
        self.api_key = envs.VLLM_API_KEY.get(env) or ""
        settings = ServerSettings.from_env(env)
        self.resolver = AdapterResolver(settings) if settings else None
        self.base_name = settings.base_name if settings else ""
        self.held = dict(settings.static_models) if settings else {}  # adapter name -> the version vLLM holds
        self.replica = envs.REPLICA.get(env)  # this server's index in a fleet, None alone

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # websockets: no route is offered
            await receive()
            return await send({"type": "websocket.close", "code": 1008})
        path, method = scope.get("path", ""), scope.get("method", "")
        kind = ROUTES.get((method, path))
        if kind == "open":
            return await self.app(scope, receive, send)
        exchange = Exchange(method, path[:200], replica=self.replica)
        scope = exchange.traced(scope)
        try:
            await self._handle(kind, scope, receive, exchange.wrap(send), exchange)
        finally:
            exchange.finish()

    async def _handle(self, kind: str | None, scope, receive, send, exchange: Exchange) -> None:
        path, method = scope.get("path", ""), scope.get("method", "")
        refusal = self._check_caller(kind, method, path, dict(scope.get("headers") or []))
        if refusal:
            return await self._refuse(send, refusal, exchange)
        if kind == "catalog":
            return await self._catalog(scope, send)
        if kind == "metrics":
            return await self._metrics(scope, send)
        if path == "/v1/models":
            return await self._models(scope, send)
        if kind == "client" or self.resolver is None:
            return await self.app(scope, receive, send)
        payload = await self._checked_payload(kind, path, receive, exchange)
        if isinstance(payload, Refusal):
            return await self._refuse(send, payload, exchange)
        return await self._forward(scope, receive, send, payload)

    def _check_caller(self, kind: str | None, method: str, path: str, headers: dict) -> Refusal | None:
        """Refuse a route outside the allowlist (404), a missing or wrong client key, or admin key."""
        if kind is None:
            return Refusal(
                404,
                "NotFoundError",
                f"{method} {path[:200]} is not a route of this server. It answers: "
                + ", ".join(f"{m} {p}" for m, p in ROUTES),
                None,
            )
        if self.api_key and not hmac.compare_digest(
            headers.get(b"authorization", b""), b"Bearer " + self.api_key.encode()
        ):
            return Refusal(401, "AuthenticationError", "missing or wrong API key (Authorization: Bearer …).", None)
        return self._check_admin_key(headers) if kind in ("admin", "metrics") else None

    async def _checked_payload(self, kind: str, path: str, receive, exchange: Exchange) -> dict | Refusal:
        """The request body as vLLM should get it (model names resolved), or why it is refused."""
        body = await _read_body(receive)
        if isinstance(body, Refusal):
            return body
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested past what the parser handles
            payload = None
        if not isinstance(payload, dict):
            return Refusal(400, "BadRequestError", "the body must be a JSON object.", None)
        if json_depth(payload) > MAX_JSON_DEPTH:
            return Refusal(
                400, "BadRequestError", f"the body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels.", None
            )
        if kind == "admin":
            return await self._admin(path, payload, exchange)
        return await self._model(payload, exchange)

    async def _forward(self, scope, receive, send, payload: dict) -> None:
        """Pass the request on with exactly what was checked: the parsed and re-serialized body (no duplicate keys,
        no other parser)."""
        body = json.dumps(payload).encode()
        scope = {
            **scope,
            "headers": [(k, v) for k, v in scope.get("headers") or [] if k != b"content-length"]
            + [(b"content-length", str(len(body)).encode())],
        }
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _catalog(self, scope, send) -> None:
        """``GET /v1/adapters``: every version this server would serve (serving/catalog.py), OpenAI list-shaped."""
        entries: list[dict] = []
        if self.resolver is not None:
            loaded = await self._loaded_models(scope)
            try:
                entries = await asyncio.to_thread(
                    catalog, self.resolver.registry, self.resolver.listable, loaded, dict(self.held)
                )
            except RegistryError as e:
                return await self._refuse(send, registry_refusal(e, None))
        await _send_json(send, 200, json.dumps({"object": "list", "data": entries}).encode())

    async def _models(self, scope, send) -> None:
        """``GET /v1/models``: vLLM's list with each model's ``root`` set to its served name: vLLM puts the model
        dir and the verified store's paths there, and clients get names and versions, never this machine's paths."""
        status, models = await self._inner_models(scope)
        if status != 200 or models is None:
            return await self._refuse(send, Refusal(503, "ServiceUnavailable", "the model list is unavailable.", None))
        for card in models.get("data", []):
            if isinstance(card, dict):
                card["root"] = card.get("id")
        await _send_json(send, 200, json.dumps(models).encode())

    async def _loaded_models(self, scope) -> set[str]:
        """The model ids vLLM lists now."""
        _, models = await self._inner_models(scope)
        data = (models or {}).get("data", [])
        return {m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)}

    async def _metrics(self, scope, send) -> None:
        """``GET /metrics``: lorafoundry's metrics (serving/observe.py), then vLLM's own, in Prometheus' text format."""
        status, vllm = await self._inner_get(scope, "/metrics")
        await _send(send, 200, metrics_text() + (vllm if status == 200 else b""), CONTENT_TYPE_LATEST)

    async def _inner_models(self, scope) -> tuple[int, dict | None]:
        """vLLM's own ``GET /v1/models`` (status, parsed body), asked in-process with the caller's headers."""
        status, body = await self._inner_get(scope, "/v1/models")
        try:
            models = json.loads(body) if status == 200 else None
        except ValueError:
            return status, None
        return status, models if isinstance(models, dict) else None

    async def _inner_get(self, scope, path: str) -> tuple[int, bytes]:
        """vLLM's own answer to ``GET path`` (status, body), asked in-process with the caller's headers."""
        inner = {**scope, "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b""}
        status, chunks = 0, []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def collect(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(inner, receive, collect)
        return status, b"".join(chunks)

    @staticmethod
    async def _refuse(send, refusal: Refusal, exchange: Exchange | None = None) -> None:
        if exchange is not None:
            exchange.refused(refusal.status, refusal.type)
        await _send_json(send, refusal.status, refusal.body())

    def _check_admin_key(self, headers: dict) -> Refusal | None:
        given = headers.get(b"x-admin-key", b"")
        if not given:
            return Refusal(401, "AuthenticationError", "this endpoint needs the admin key in the X-Admin-Key header.")
        if not self.admin_key or not hmac.compare_digest(given, self.admin_key.encode()):
            return Refusal(
                403, "PermissionDeniedError", "wrong admin key (or no admin key configured: LORAFOUNDRY_ADMIN_KEY)."
            )
        return None

    async def _model(self, payload: dict, exchange: Exchange) -> dict | Refusal:
        """Check a generation request: `n`/`best_of` bounds, and the model it names (see the module doc)."""
        for field in ("n", "best_of"):
            value = payload.get(field)
            if value is not None and (type(value) is not int or not 1 <= value <= MAX_CHOICES):
                return Refusal(
                    400,
                    "BadRequestError",
                    f"{field}={str(value)[:40]} is out of range: this server allows 1..{MAX_CHOICES} choices per "
                    "request. Fix: send several requests.",
                    field,
                )
        model = payload.get("model")
        exchange.asked = model if isinstance(model, str) else None
        if model is None or model == self.base_name:
            exchange.resolved(self.base_name)
            return payload
        if not isinstance(model, str):
            return Refusal(400, "InvalidModelName", "model must be a string.")
        rec = await asyncio.to_thread(self.resolver.resolve, model)
        if isinstance(rec, Refusal):
            return rec
        exchange.resolved(rec.name, rec.version, rec.adapter_sha256)
        if self.held.get(model) == rec.version:  # loaded under this name, and it still means that version
            return payload
        return {**payload, "model": f"{rec.name}@{rec.version}"}

    async def _admin(self, path: str, payload: dict, exchange: Exchange) -> dict | Refusal:
        """Admin loads take only what the registry serves under that name, from the verified store."""
        name = payload.get("lora_name")
        if not isinstance(name, str):
            return Refusal(400, "InvalidModelName", f"lora_name {str(name)[:100]!r} is not a valid name.", "lora_name")
        try:
            _, version, alias = parse_ref(name)  # the registry's name rule
        except RegistryInputError as e:
            return registry_refusal(e, "lora_name")
        if path == "/v1/unload_lora_adapter":
            self.held.pop(name, None)
            return payload
        if name == self.base_name:
            return Refusal(400, "InvalidModelName", f"{name!r} is the base model, not an adapter.", "lora_name")
        rec = await asyncio.to_thread(self.resolver.resolve, name, True)
        if isinstance(rec, Refusal):
            return rec
        given = payload.get("lora_path")
        if given is not None and (not isinstance(given, str) or Path(given).resolve() != Path(rec.path).resolve()):
            return Refusal(
                403,
                "PathNotAllowed",
                f"lora_path is not what the registry serves as {name!r}: that is {rec.name}@{rec.version}. "
                "Fix: promote the version first (`lorafoundry registry promote`), or load it as NAME@VERSION.",
                "lora_path",
            )
        exchange.resolved(rec.name, rec.version, rec.adapter_sha256)
        plain = version is None and alias is None
        lora_name = name if plain else f"{rec.name}@{rec.version}"
        if plain:
            self.held[name] = rec.version
        return {**payload, "lora_name": lora_name, "lora_path": str(self.resolver.stage_root / rec.adapter_sha256)}


async def _read_body(receive) -> bytes | Refusal:
    """The whole request body, or a refusal when it is larger than :data:`MAX_BODY_BYTES` or takes longer than
    :data:`BODY_TIMEOUT_S` to arrive."""
    chunks, size, more = [], 0, True
    deadline = time.monotonic() + BODY_TIMEOUT_S
    while more:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return Refusal(408, "RequestTimeout", f"the request body took longer than {BODY_TIMEOUT_S:.0f} s.", None)
        if message["type"] == "http.disconnect":
            return Refusal(400, "BadRequestError", "the client disconnected before the body was complete.", None)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return Refusal(413, "RequestTooLarge", f"request body above {MAX_BODY_BYTES} bytes.", None)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def json_depth(value: object) -> int:
    """How deep arrays and objects nest in a parsed JSON value (a scalar is 0), counted without recursion and
    stopping once past :data:`MAX_JSON_DEPTH`."""
    deepest, stack = 0, [(value, 1)] if isinstance(value, dict | list) else []
    while stack and deepest <= MAX_JSON_DEPTH:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest
