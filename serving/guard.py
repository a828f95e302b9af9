"""What the running vLLM server answers, and with which weights, decided from the registry: deny by default.

vLLM imports :class:`LoraFoundryGuard` through ``--middleware serving.guard.LoraFoundryGuard`` and lorafoundry's
plugin registers a LoRA resolver built on :class:`AdapterResolver`. Both read their settings from the environment
that ``lorafoundry serve`` / the deployment asset give vLLM:

- ``LORAFOUNDRY_REGISTRY``: the registry file (opened read-only, briefly, per lookup);
- ``LORAFOUNDRY_BASE_HASH``: content hash of the served base model; adapters for another base are refused;
- ``LORAFOUNDRY_ADAPTER_ROOT``: no adapter outside this dir is ever read;
- ``LORAFOUNDRY_STAGE_DIR``: the verified store vLLM reads adapters from (serving/integrity.py);
- ``LORAFOUNDRY_MAX_LORA_RANK``: vLLM's ``--max-lora-rank``;
- ``LORAFOUNDRY_BASE_NAME``: the base's served name;
- ``LORAFOUNDRY_STATIC_MODELS``: comma-separated ``name@VERSION`` of the adapters loaded at start under ``name``;
- ``LORAFOUNDRY_ADMIN_KEY``: the key the admin routes require in ``X-Admin-Key``;
- ``VLLM_API_KEY``: the client key (``Authorization: Bearer``), required on every route but ``GET /health``.

Routes: only those in :data:`ROUTES` reach vLLM; any other method and path (vLLM's ``/v1/messages``,
``/invocations``, ``/tokenize``, ``/pooling``, ``/scale_elastic_ep``, its docs, websockets…) answers 404. A model
route's body is read here: every model name except the base's (``name``, ``name@VERSION``, ``name:ALIAS``) is
checked against the registry (entry, status, base model, rank, path, sha256) and refused with an OpenAI-shaped 4xx
that says why; when the checks pass, the request goes on for the version the name means now (``name@VERSION``, so
the answer's ``model`` says which version answered; a name loaded at start keeps its name while it still means the
version loaded). Admin loads are accepted only for what the registry serves under that name, and vLLM is given
the verified copy. ``GET /v1/adapters`` is answered here: the catalog of every version this server would serve
(serving/catalog.py). Lookups are cached for ``LORAFOUNDRY_RESOLVE_TTL_S`` seconds (default 2).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from registry.store import (
    SERVABLE_STATUSES,
    AdapterNotFoundError,
    AdapterRecord,
    AdapterRegistry,
    RegistryBusyError,
    RegistryConflictError,
    RegistryCorruptError,
    RegistryError,
    RegistryInputError,
    adapter_sha256,
    parse_ref,
)
from serving.catalog import catalog
from serving.integrity import IntegrityError, multi_lora_problem, stage, weights_problem

log = logging.getLogger(__name__)  # in vLLM's server log (serving/vllm_plugin.py)

#: Every route the server answers, and who may call it: `open` (anyone), `client` (the client key when one is
#: set), `catalog` (client key; answered here, serving/catalog.py), `model` (client key, and the body's model is
#: checked), `admin` (client key and the admin key).
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/health"): "open",
    ("GET", "/v1/models"): "client",
    ("GET", "/v1/adapters"): "catalog",
    ("POST", "/v1/chat/completions"): "model",
    ("POST", "/v1/completions"): "model",
    ("POST", "/v1/load_lora_adapter"): "admin",
    ("POST", "/v1/unload_lora_adapter"): "admin",
}
#: Largest `n` / `best_of` a request may ask for (each choice is a full generation).
MAX_CHOICES = 16
#: Largest request body the guard reads (a prompt of the longest context is far below it).
MAX_BODY_BYTES = 4 << 20
#: Deepest nesting of arrays and objects a request body may have (a chat request with tools and a JSON schema is
#: far below it; Python's parser itself gives up near 1,000 with a RecursionError).
MAX_JSON_DEPTH = 64
#: Seconds a client has to send the whole body once the request head arrived (a reverse proxy's
#: ``client_body_timeout``; ``LORAFOUNDRY_BODY_TIMEOUT_S``); a client that dribbles it gets 408 and its connection
#: is closed. The request head's own limit is in serving/http_limits.py.
BODY_TIMEOUT_S = float(os.environ.get("LORAFOUNDRY_BODY_TIMEOUT_S", "30"))

#: Registry errors as HTTP answers, by type: (status, OpenAI error type). An error takes the entry of the nearest
#: class in its MRO, so a subclass added to the registry later gets its parent's answer until it has its own.
#: Busy past the wait, a damaged file, anything else the registry cannot do: the server's fault, not the client's.
REGISTRY_ERRORS: dict[type[RegistryError], tuple[int, str]] = {
    RegistryError: (503, "RegistryUnavailable"),
    RegistryInputError: (400, "InvalidModelName"),
    AdapterNotFoundError: (404, "NotFoundError"),
    RegistryConflictError: (409, "RegistryConflict"),
    RegistryBusyError: (503, "RegistryUnavailable"),
    RegistryCorruptError: (503, "RegistryUnavailable"),
}

#: What a client is told when the registry fails on the server's side (the details, with paths, go to the log).
REGISTRY_UNAVAILABLE = "the adapter registry is unavailable; the server's log says why."

#: Resolver answers shared across the process: (settings..., ref) -> (monotonic times the lookup started and
#: ended, answer).
_ANSWERS: dict[tuple, tuple[float, float, AdapterRecord | Refusal]] = {}
_ANSWERS_LOCK = threading.Lock()  # guards the dict only; lookups run under the per-ref lock below


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: an HTTP status, an OpenAI error type, a message and the offending parameter."""

    status: int
    type: str
    message: str
    param: str | None = "model"

    def body(self) -> bytes:
        return json.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}
        ).encode()


def registry_refusal(error: RegistryError, param: str | None = "model") -> Refusal:
    """The answer to a registry error, chosen by its type in :data:`REGISTRY_ERRORS` (never by its message). A
    server-side failure's message names files of this machine: it goes to the server's log, and the client is
    told only that the registry is unavailable."""
    status, kind = next(REGISTRY_ERRORS[c] for c in type(error).__mro__ if c in REGISTRY_ERRORS)
    if status >= 500:
        log.error("registry unavailable: %s", error)
        return Refusal(status, kind, REGISTRY_UNAVAILABLE, param)
    return Refusal(status, kind, str(error), param)


class _KeyLocks:
    """One lock per key, like vLLM's ``lora_resolver_lock = defaultdict(Lock)``, but a key's lock is dropped once
    no thread holds or waits for it: the keys are client-chosen names, so the table must not grow with them."""

    def __init__(self) -> None:
        self._table_lock = threading.Lock()
        self._locks: dict[Hashable, tuple[threading.Lock, list[int]]] = {}  # key -> (lock, [threads using it])

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        with self._table_lock:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._table_lock:
                users[0] -= 1
                if not users[0]:
                    del self._locks[key]


#: Concurrent requests for one uncached ref wait for a single lookup (and sha256) while other refs proceed.
_LOOKUP_LOCKS = _KeyLocks()


class AdapterResolver:
    """Resolve a model reference to a registered adapter that this server may load, and stage its verified copy.

    Args:
        registry: the registry file.
        base_hash: content hash of the served base model.
        adapter_root: every adapter path must be inside this dir.
        max_rank: the server's ``--max-lora-rank``.
        ttl_s: how long an answer is reused.
        stage_root: the verified store (default ``<registry dir>/serving/verified``).
    """

    def __init__(
        self,
        registry: Path,
        base_hash: str,
        adapter_root: Path,
        max_rank: int,
        ttl_s: float | None = None,
        stage_root: Path | None = None,
    ) -> None:
        self.registry = AdapterRegistry(registry, max_wait_s=10, actor="vllm")
        self.base_hash, self.max_rank = base_hash, max_rank
        self.adapter_root = Path(adapter_root).resolve()
        self.stage_root = Path(stage_root) if stage_root else Path(registry).parent / "serving" / "verified"
        self.ttl_s = float(os.environ.get("LORAFOUNDRY_RESOLVE_TTL_S", "2")) if ttl_s is None else ttl_s

    @classmethod
    def from_env(cls) -> AdapterResolver | None:
        path = os.environ.get("LORAFOUNDRY_REGISTRY")
        if not path:
            return None
        stage_root = os.environ.get("LORAFOUNDRY_STAGE_DIR")
        return cls(
            Path(path),
            os.environ.get("LORAFOUNDRY_BASE_HASH", ""),
            Path(os.environ.get("LORAFOUNDRY_ADAPTER_ROOT", Path(path).parent / "adapters")),
            int(os.environ.get("LORAFOUNDRY_MAX_LORA_RANK", "16")),
            stage_root=Path(stage_root) if stage_root else None,
        )

    def resolve(self, ref: str, fresh: bool = False) -> AdapterRecord | Refusal:
        """The record to load for ``ref``, or the reason it is refused; answers are kept ``ttl_s`` seconds and
        shared by every resolver of the process with the same settings (the guard and vLLM's resolver plugin
        ask about the same name one after the other: one registry read and one sha256 serve both). Concurrent
        asks for one ref share one lookup; other refs do not wait for it. ``fresh``: ask the registry now (an
        admin load right after a promotion), and keep that answer for the others."""
        key = (str(self.registry.path), self.base_hash, str(self.adapter_root), self.max_rank, ref)
        asked = time.monotonic()
        if not fresh and (hit := self._cached(key)) is not None:
            return hit
        with _LOOKUP_LOCKS.hold(key):
            # an answer found while this thread waited is taken whatever its age (a lookup may outlast ttl_s)
            if not fresh and (hit := self._cached(key, found_after=asked)) is not None:
                return hit
            started = time.monotonic()
            outcome = self._resolve(ref)
            with _ANSWERS_LOCK:
                if len(_ANSWERS) > 10_000:  # names are client-chosen: bound the memory
                    _ANSWERS.clear()
                _ANSWERS[key] = (started, time.monotonic(), outcome)
        return outcome

    def _cached(self, key: tuple, found_after: float | None = None) -> AdapterRecord | Refusal | None:
        """The kept answer for ``key`` if it is under ``ttl_s`` old (counted from the start of its lookup) or its
        lookup ended after ``found_after``; else None."""
        with _ANSWERS_LOCK:
            hit = _ANSWERS.get(key)
        if hit is None:
            return None
        started, finished, outcome = hit
        fresh_enough = time.monotonic() - started < self.ttl_s
        return outcome if fresh_enough or (found_after is not None and finished > found_after) else None

    def resolve_staged(self, ref: str) -> Path | Refusal:
        """The verified copy vLLM reads for ``ref`` (see :meth:`resolve`)."""
        outcome = self.resolve(ref)
        return outcome if isinstance(outcome, Refusal) else self.stage_root / outcome.adapter_sha256

    def _resolve(self, ref: str) -> AdapterRecord | Refusal:
        try:
            rec = self._lookup(ref)
        except RegistryError as e:
            return registry_refusal(e)
        outcome = self.admit(rec)
        return outcome if isinstance(outcome, Refusal) else rec

    def admit(self, rec: AdapterRecord) -> Path | Refusal:
        """May this server serve ``rec``: the one rule for start-up (serving/launch.py), requests and admin loads.
        The record's checks (:meth:`refuse_record`), its registered files' sha256, its verified copy (staged, or
        staged again when the copy changed on disk) and the weights vLLM would read from that copy. Returns the
        verified copy's dir, or why not."""
        refusal = self.refuse_record(rec)
        if refusal is not None:
            return refusal
        staged = self._verify_and_stage(rec)
        if isinstance(staged, Refusal):
            return staged
        return _unservable(rec, staged) or staged  # read from the bytes vLLM would be given

    def _lookup(self, ref: str) -> AdapterRecord:
        """The registry's record for ``ref``: ``name@VERSION`` / ``name:ALIAS`` as given, a plain name the version
        served under it (its champion, else its latest candidate). Raises the registry's errors."""
        name, version, alias = parse_ref(ref)  # the registry's name rule, checked before any registry read
        if ".." in ref:  # the rule allows "a..b"; this server has never answered such names
            raise RegistryInputError(f"model {ref[:100]!r} is not a valid name here: it contains '..'.")
        if version is not None or alias is not None:
            return self.registry.get(ref)
        rec = next((r for r in self.registry.servable() if r.name == name), None)
        if rec is None:
            raise AdapterNotFoundError(
                f"model {ref!r} does not exist: no servable adapter of that name in the registry."
            )
        return rec

    def refuse_record(self, rec: AdapterRecord) -> Refusal | None:
        """Why this server may not load ``rec`` (status, base model, rank, location), or None."""
        if rec.status not in SERVABLE_STATUSES:
            return Refusal(
                403,
                "AdapterNotServable",
                f"{rec.name}@{rec.version} is {rec.status}; only candidates and champions are served.",
            )
        if rec.base_model_hash != self.base_hash:
            return Refusal(
                400,
                "BaseModelMismatch",
                f"{rec.name}@{rec.version} was trained on base "
                f"{rec.base_model!r} ({(rec.base_model_hash or '?')[:12]}), not on the model this server "
                f"serves ({self.base_hash[:12]}).",
            )
        if rec.r > self.max_rank:
            return Refusal(
                400,
                "RankTooLarge",
                f"{rec.name}@{rec.version} has r={rec.r}, above this server's "
                f"--max-lora-rank {self.max_rank}. Fix: restart the server (`lorafoundry serve`) so it "
                "sizes the rank for every registered adapter.",
            )
        if not Path(rec.path).resolve().is_relative_to(self.adapter_root):
            log.warning("%s@%s: %s is outside the adapter root %s", rec.name, rec.version, rec.path, self.adapter_root)
            return Refusal(
                403,
                "PathNotAllowed",
                f"{rec.name}@{rec.version} lives outside this server's adapter root; the server reads nothing else.",
            )
        return None

    def registered_copies(self, sha256: str) -> list[Path]:
        """The registered dirs inside the adapter root whose version has these bytes (to stage them again)."""
        dirs = [Path(r.path).resolve() for r in self.registry.list() if r.adapter_sha256 == sha256]
        return [d for d in dirs if d.is_relative_to(self.adapter_root)]

    def listable(self, rec: AdapterRecord) -> Refusal | None:
        """The catalog's filter: :meth:`refuse_record`, and weights vLLM cannot serve, read from the registered
        files without hashing them (a request for it runs all of :meth:`admit`)."""
        refusal = self.refuse_record(rec)
        if refusal is not None:
            return refusal
        return _unservable(rec, Path(rec.path))

    def _verify_and_stage(self, rec: AdapterRecord) -> Path | Refusal:
        """Hash the registered files in full (no size/mtime shortcut: a changed copy is refused under every name)
        and return the verified copy vLLM reads (checked again there)."""
        changed = Refusal(
            409,
            "AdapterIntegrityError",
            f"{rec.name}@{rec.version}: files changed after registration (sha256 mismatch); refused. "
            "Fix: `lorafoundry registry verify`.",
        )
        path = Path(rec.path).resolve()
        try:
            if adapter_sha256(path)[0] != rec.adapter_sha256:
                return changed
            return stage(path, rec.adapter_sha256, self.stage_root)
        except IntegrityError:
            return changed
        except OSError as e:
            log.error("%s@%s: files unreadable: %s", rec.name, rec.version, e)
            return Refusal(
                409, "AdapterIntegrityError", f"{rec.name}@{rec.version}: files unreadable (see the server log)."
            )


def _unservable(rec: AdapterRecord, adapter_dir: Path) -> Refusal | None:
    """Why vLLM cannot serve the adapter files in ``adapter_dir`` as they are: a variant its multi-LoRA kernels do
    not apply (DoRA), or weights it cannot load (not safetensors, tensors that do not fit the config)."""
    if problem := multi_lora_problem(adapter_dir):
        return Refusal(400, "VariantNotServable", f"{rec.name}@{rec.version} is not served here: {problem}.")
    if problem := weights_problem(adapter_dir):
        return Refusal(400, "AdapterNotLoadable", f"{rec.name}@{rec.version} cannot be loaded: {problem}.")
    return None


def _static_models() -> dict[str, int]:
    """Adapter name -> version loaded under that name at start (``LORAFOUNDRY_STATIC_MODELS``)."""
    held = {}
    for item in os.environ.get("LORAFOUNDRY_STATIC_MODELS", "").split(","):
        name, _, version = item.partition("@")
        if name and version.isascii() and version.isdigit():
            held[name] = int(version)
    return held


async def _send_json(send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class LoraFoundryGuard:
    """ASGI middleware in front of vLLM: the route allowlist, both keys, and registry checks on model names."""

    def __init__(self, app) -> None:
        self.app = app
        self.admin_key = os.environ.get("LORAFOUNDRY_ADMIN_KEY", "")
        # vLLM's own API-key check runs after this middleware, and only under /v1: check the client key here on
        # every route, so that a client without it learns nothing about the registry and causes no lookups
        self.api_key = os.environ.get("VLLM_API_KEY", "")
        self.resolver = AdapterResolver.from_env()
        self.base_name = os.environ.get("LORAFOUNDRY_BASE_NAME", "")
        self.held = _static_models()  # adapter name -> the version vLLM holds under that name

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
        refusal = self._check_caller(kind, method, path, dict(scope.get("headers") or []))
        if refusal:
            return await self._refuse(send, refusal)
        if kind == "catalog":
            return await self._catalog(scope, send)
        if path == "/v1/models":
            return await self._models(scope, send)
        if kind == "client" or self.resolver is None:
            return await self.app(scope, receive, send)
        payload = await self._checked_payload(kind, path, receive)
        if isinstance(payload, Refusal):
            return await self._refuse(send, payload)
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
        return self._check_admin_key(headers) if kind == "admin" else None

    async def _checked_payload(self, kind: str, path: str, receive) -> dict | Refusal:
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
        return await (self._admin(path, payload) if kind == "admin" else self._model(payload))

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

    async def _inner_models(self, scope) -> tuple[int, dict | None]:
        """vLLM's own ``GET /v1/models`` (status, parsed body), asked in-process with the caller's headers."""
        inner = {**scope, "method": "GET", "path": "/v1/models", "raw_path": b"/v1/models", "query_string": b""}
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
        try:
            models = json.loads(b"".join(chunks)) if status == 200 else None
        except ValueError:
            return status, None
        return status, models if isinstance(models, dict) else None

    @staticmethod
    async def _refuse(send, refusal: Refusal) -> None:
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

    async def _model(self, payload: dict) -> dict | Refusal:
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
        if model is None or model == self.base_name:
            return payload
        if not isinstance(model, str):
            return Refusal(400, "InvalidModelName", "model must be a string.")
        rec = await asyncio.to_thread(self.resolver.resolve, model)
        if isinstance(rec, Refusal):
            return rec
        if self.held.get(model) == rec.version:  # loaded under this name, and it still means that version
            return payload
        return {**payload, "model": f"{rec.name}@{rec.version}"}

    async def _admin(self, path: str, payload: dict) -> dict | Refusal:
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
