"""What the running vLLM server may load, decided from the registry; and the ASGI middleware that enforces it.

vLLM imports :class:`LoraFoundryGuard` through ``--middleware serving.guard.LoraFoundryGuard`` and lorafoundry's
plugin registers a LoRA resolver built on :class:`AdapterResolver`. Both read their settings from the environment
that ``lorafoundry serve`` / the deployment asset give vLLM:

- ``LORAFOUNDRY_REGISTRY``: the registry file (opened read-only, briefly, per lookup);
- ``LORAFOUNDRY_BASE_HASH``: content hash of the served base model; adapters for another base are refused;
- ``LORAFOUNDRY_ADAPTER_ROOT``: no adapter outside this dir is ever read;
- ``LORAFOUNDRY_MAX_LORA_RANK``: vLLM's ``--max-lora-rank``;
- ``LORAFOUNDRY_STATIC_MODELS``: comma-separated names served from the start (base and ``--lora-modules``);
- ``LORAFOUNDRY_BASE_NAME``: the base's served name (the `parent` of resolved adapters in ``/v1/models``);
- ``LORAFOUNDRY_ADMIN_KEY``: the key ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter`` and ``/adapters``
  require in the ``X-Admin-Key`` header (distinct from the client ``--api-key``): no header 401, a wrong key (or no
  key configured) 403.

A request for a model the server was not started with (``name``, ``name@VERSION`` or ``name:ALIAS``) is checked
here (registry entry, status, base model, rank, path, sha256) and refused with an OpenAI-shaped 4xx that says why.
When the checks pass the request goes on to vLLM for the immutable ``name@VERSION`` it resolved to (so the answer's
``model`` says which version answered, as OpenAI does for its aliases), and vLLM's resolver loads that version on
first use. Lookups are cached for ``LORAFOUNDRY_RESOLVE_TTL_S`` seconds (default 2): after that, a moved alias
answers with its new version and an archived version is refused, although vLLM still holds its weights.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from registry.store import ADAPTER_FILES, AdapterRecord, AdapterRegistry, RegistryError, adapter_sha256

NAME_RE = re.compile(r"[A-Za-z0-9._-]+(@[0-9]+|:[A-Za-z0-9._-]+)?")
# vLLM's adapter-loading endpoints; with runtime LoRA updating on it also serves POST/DELETE /adapters[/{name}]
ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
ADMIN_PREFIX = "/adapters"
MODEL_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses")


#: Resolver answers shared across the process: (settings..., ref) -> (monotonic time, answer).
_ANSWERS: dict[tuple, tuple[float, AdapterRecord | Refusal]] = {}
_ANSWERS_LOCK = threading.Lock()
#: Adapter dir -> (size and mtime of its files, their sha256).
_HASHED: dict[Path, tuple[tuple, str]] = {}


@dataclass(frozen=True)
class Refusal:
    """Why a model reference cannot be served: an HTTP status, an OpenAI error type and a message."""

    status: int
    type: str
    message: str

    def body(self) -> bytes:
        return json.dumps(
            {"error": {"message": self.message, "type": self.type, "param": "model", "code": self.status}}
        ).encode()


class AdapterResolver:
    """Resolve a model reference to a registered adapter that this server may load.

    Args:
        registry: the registry file.
        base_hash: content hash of the served base model.
        adapter_root: every adapter path must be inside this dir.
        max_rank: the server's ``--max-lora-rank``.
    """

    def __init__(
        self, registry: Path, base_hash: str, adapter_root: Path, max_rank: int, ttl_s: float | None = None
    ) -> None:
        self.registry = AdapterRegistry(registry, max_wait_s=10, actor="vllm")
        self.base_hash, self.max_rank = base_hash, max_rank
        self.adapter_root = Path(adapter_root).resolve()
        self.ttl_s = float(os.environ.get("LORAFOUNDRY_RESOLVE_TTL_S", "2")) if ttl_s is None else ttl_s

    @classmethod
    def from_env(cls) -> AdapterResolver | None:
        path = os.environ.get("LORAFOUNDRY_REGISTRY")
        if not path:
            return None
        return cls(
            Path(path),
            os.environ.get("LORAFOUNDRY_BASE_HASH", ""),
            Path(os.environ.get("LORAFOUNDRY_ADAPTER_ROOT", Path(path).parent / "adapters")),
            int(os.environ.get("LORAFOUNDRY_MAX_LORA_RANK", "16")),
        )

    def resolve(self, ref: str) -> AdapterRecord | Refusal:
        """The record to load for ``ref``, or the reason it is refused; answers are kept ``ttl_s`` seconds and
        shared by every resolver of the process with the same settings (the guard and vLLM's resolver plugin
        ask about the same name one after the other: one registry read and one sha256 serve both)."""
        key = (str(self.registry.path), self.base_hash, str(self.adapter_root), self.max_rank, ref)
        now = time.monotonic()
        with _ANSWERS_LOCK:
            hit = _ANSWERS.get(key)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        outcome = self._resolve(ref)
        with _ANSWERS_LOCK:
            if len(_ANSWERS) > 10_000:  # names are client-chosen: bound the memory
                _ANSWERS.clear()
            _ANSWERS[key] = (now, outcome)
        return outcome

    def _resolve(self, ref: str) -> AdapterRecord | Refusal:
        if not NAME_RE.fullmatch(ref) or ".." in ref:
            return Refusal(
                400,
                "InvalidModelName",
                f"model {ref!r} is not a valid name: use letters, digits, "
                "'.', '_', '-', optionally with @VERSION or :ALIAS (e.g. sentiment@2, sentiment:prod).",
            )
        name = re.split(r"[@:]", ref, maxsplit=1)[0]
        try:
            if "@" in ref or ":" in ref:
                rec = self.registry.get(ref)
            else:  # the plain name means the champion, else the latest candidate
                rec = next((r for r in self.registry.servable() if r.name == name), None)
                if rec is None:
                    return Refusal(
                        404,
                        "NotFoundError",
                        f"model {ref!r} does not exist: no servable adapter of that name in the registry.",
                    )
        except RegistryError as e:
            status = 404 if "no adapter" in str(e) or "no alias" in str(e) else 503
            return Refusal(status, "NotFoundError" if status == 404 else "RegistryUnavailable", str(e))
        if rec.status not in ("candidate", "champion"):
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
        path = Path(rec.path).resolve()
        if not path.is_relative_to(self.adapter_root):
            return Refusal(
                403,
                "PathNotAllowed",
                f"{rec.name}@{rec.version} lives outside the adapter root "
                f"{self.adapter_root}; the server reads nothing else.",
            )
        try:
            sha = _files_sha256(path)
        except OSError as e:
            return Refusal(409, "AdapterIntegrityError", f"{rec.name}@{rec.version}: files unreadable ({e}).")
        if sha != rec.adapter_sha256:
            return Refusal(
                409,
                "AdapterIntegrityError",
                f"{rec.name}@{rec.version}: files changed after "
                "registration (sha256 mismatch); refused. Fix: `lorafoundry registry verify`.",
            )
        return rec


def _files_sha256(path: Path) -> str:
    """The adapter's sha256, recomputed only when a file's size or modification time changed since the last
    time (the guard re-checks a name every few seconds; hashing large adapters each time would be the cost)."""
    stamp = tuple((f, (path / f).stat().st_size, (path / f).stat().st_mtime_ns) for f in ADAPTER_FILES)
    with _ANSWERS_LOCK:
        known = _HASHED.get(path)
    if known is not None and known[0] == stamp:
        return known[1]
    sha, _ = adapter_sha256(path)
    with _ANSWERS_LOCK:
        _HASHED[path] = (stamp, sha)
    return sha


def _static_models() -> set[str]:
    return {m for m in os.environ.get("LORAFOUNDRY_STATIC_MODELS", "").split(",") if m}


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
    """ASGI middleware: the admin key on the adapter-loading endpoints, and registry checks on model names."""

    def __init__(self, app) -> None:
        self.app = app
        self.admin_key = os.environ.get("LORAFOUNDRY_ADMIN_KEY", "")
        # vLLM's own API-key check runs after this middleware: check the client key first, so that a client
        # without it learns nothing about the registry and causes no lookups
        self.api_key = os.environ.get("VLLM_API_KEY", "")
        self.resolver = AdapterResolver.from_env()
        self.static = _static_models()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        admin = path in ADMIN_PATHS or path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")
        if not admin and scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        if self.api_key and path in MODEL_PATHS:
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(auth, b"Bearer " + self.api_key.encode()):
                return await _send_json(
                    send,
                    401,
                    Refusal(401, "AuthenticationError", "missing or wrong API key (Authorization: Bearer …).").body(),
                )
        if admin:
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"x-admin-key", b"")
            if not given:
                return await _send_json(
                    send,
                    401,
                    Refusal(
                        401, "AuthenticationError", "this endpoint needs the admin key in the X-Admin-Key header."
                    ).body(),
                )
            if not self.admin_key or not hmac.compare_digest(given, self.admin_key.encode()):
                return await _send_json(
                    send,
                    403,
                    Refusal(
                        403,
                        "PermissionDeniedError",
                        "wrong admin key (or no admin key configured: LORAFOUNDRY_ADMIN_KEY).",
                    ).body(),
                )
        elif path not in MODEL_PATHS or self.resolver is None:
            return await self.app(scope, receive, send)
        # read the body to see the model (or the adapter path), then replay it to vLLM
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = {}
        payload = payload if isinstance(payload, dict) else {}
        lora_path = payload.get("lora_path", payload.get("src"))
        if (
            admin
            and isinstance(lora_path, str)
            and self.resolver is not None
            and not Path(lora_path).resolve().is_relative_to(self.resolver.adapter_root)
        ):
            return await _send_json(
                send,
                403,
                Refusal(
                    403,
                    "PathNotAllowed",
                    f"lora_path {lora_path!r} is outside the adapter root {self.resolver.adapter_root}.",
                ).body(),
            )
        model = payload.get("model")
        if path in MODEL_PATHS and isinstance(model, str) and model not in self.static:
            outcome = await asyncio.to_thread(self.resolver.resolve, model)  # off the event loop
            if isinstance(outcome, Refusal):
                return await _send_json(send, outcome.status, outcome.body())
            concrete = f"{outcome.name}@{outcome.version}"
            if model != concrete:  # an alias or a plain name: ask vLLM for the version it means now
                body = json.dumps({**payload, "model": concrete}).encode()
                scope = {
                    **scope,
                    "headers": [
                        (k, str(len(body)).encode() if k == b"content-length" else v)
                        for k, v in scope.get("headers") or []
                    ],
                }
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
