"""Every setting of a lorafoundry vLLM server, declared once: what `plan_server` decides, and the operator's limits.

`lorafoundry serve` and the deployment asset decide a :class:`ServerSettings` (serving/launch.py) and hand it to
vLLM through the environment (:meth:`ServerSettings.to_env`); the guard, the registry resolver and the plugin read
it back in vLLM's processes (:meth:`ServerSettings.from_env`). The limits below are the operator's to set in the
environment of `lorafoundry serve`, which vLLM inherits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lora_assets.home import Home

#: vLLM's ``--max-lora-rank`` when no adapter on the base says more.
DEFAULT_MAX_LORA_RANK = 16


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


#: Seconds a registry answer is reused by the guard and the resolver (``LORAFOUNDRY_RESOLVE_TTL_S``): a moved alias
#: or an archived version takes effect within that.
RESOLVE_TTL_S = _env_float("LORAFOUNDRY_RESOLVE_TTL_S", 2)
#: Seconds a client has to send the whole body once the request head arrived (``LORAFOUNDRY_BODY_TIMEOUT_S``, a
#: reverse proxy's ``client_body_timeout``): a client that dribbles it gets 408 (serving/guard.py).
BODY_TIMEOUT_S = _env_float("LORAFOUNDRY_BODY_TIMEOUT_S", 30)
#: Seconds a connection has to deliver a complete request head (``LORAFOUNDRY_HEAD_TIMEOUT_S``;
#: serving/http_limits.py).
HEAD_TIMEOUT_S = _env_float("LORAFOUNDRY_HEAD_TIMEOUT_S", 10)
#: Open connections one client address may hold (``LORAFOUNDRY_MAX_CONNECTIONS_PER_CLIENT``).
MAX_CONNECTIONS_PER_CLIENT = int(os.environ.get("LORAFOUNDRY_MAX_CONNECTIONS_PER_CLIENT") or 64)
#: The key the admin routes require in ``X-Admin-Key``; unset, they are closed.
ADMIN_KEY_ENV = "LORAFOUNDRY_ADMIN_KEY"
#: The client key `lorafoundry serve` requires (``Authorization: Bearer``); vLLM reads it as ``VLLM_API_KEY``.
API_KEY_ENV, VLLM_API_KEY_ENV = "LORAFOUNDRY_API_KEY", "VLLM_API_KEY"


@dataclass(frozen=True)
class ServerSettings:
    """What one server serves and from where, as `plan_server` decided it.

    Args:
        registry: the registry file (``LORAFOUNDRY_REGISTRY``), opened read-only, briefly, per lookup.
        base_hash: content hash of the served base (``LORAFOUNDRY_BASE_HASH``); adapters of another base are refused.
        base_name: the base's served name (``LORAFOUNDRY_BASE_NAME``).
        adapter_root: no adapter outside this dir is ever read (``LORAFOUNDRY_ADAPTER_ROOT``).
        stage_root: the verified store vLLM reads adapters from (``LORAFOUNDRY_STAGE_DIR``; serving/integrity.py).
        max_rank: vLLM's ``--max-lora-rank`` (``LORAFOUNDRY_MAX_LORA_RANK``).
        static_models: adapter name -> the version loaded under that name at start (``LORAFOUNDRY_STATIC_MODELS``,
            comma-separated ``name@VERSION``).
    """

    registry: Path
    base_hash: str
    base_name: str
    adapter_root: Path
    stage_root: Path
    max_rank: int = DEFAULT_MAX_LORA_RANK
    static_models: dict[str, int] = field(default_factory=dict)

    def to_env(self) -> dict[str, str]:
        """The environment variables that carry these settings to vLLM's processes."""
        return {
            "LORAFOUNDRY_REGISTRY": str(self.registry),
            "LORAFOUNDRY_BASE_HASH": self.base_hash,
            "LORAFOUNDRY_BASE_NAME": self.base_name,
            "LORAFOUNDRY_ADAPTER_ROOT": str(self.adapter_root),
            "LORAFOUNDRY_STAGE_DIR": str(self.stage_root),
            "LORAFOUNDRY_MAX_LORA_RANK": str(self.max_rank),
            "LORAFOUNDRY_STATIC_MODELS": ",".join(f"{n}@{v}" for n, v in self.static_models.items()),
        }

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ServerSettings | None:
        """The settings in ``env`` (default: this process's environment); None for a vLLM that lorafoundry did
        not start (no ``LORAFOUNDRY_REGISTRY``)."""
        env = os.environ if env is None else env
        registry = env.get("LORAFOUNDRY_REGISTRY")
        if not registry:
            return None
        home = Home.at(Path(registry).parent, registry)  # the registry's home, unless told otherwise
        return cls(
            registry=Path(registry),
            base_hash=env.get("LORAFOUNDRY_BASE_HASH", ""),
            base_name=env.get("LORAFOUNDRY_BASE_NAME", ""),
            adapter_root=Path(env.get("LORAFOUNDRY_ADAPTER_ROOT") or home.adapters),
            stage_root=Path(env.get("LORAFOUNDRY_STAGE_DIR") or home.verified),
            max_rank=int(env.get("LORAFOUNDRY_MAX_LORA_RANK") or DEFAULT_MAX_LORA_RANK),
            static_models=_parse_static(env.get("LORAFOUNDRY_STATIC_MODELS", "")),
        )


def _parse_static(value: str) -> dict[str, int]:
    held = {}
    for item in value.split(","):
        name, _, version = item.partition("@")
        if name and version.isascii() and version.isdigit():
            held[name] = int(version)
    return held
