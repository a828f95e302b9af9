"""Every setting of a lorafoundry vLLM server, declared once: what `plan_server` decides, and the operator's limits.

`lorafoundry serve` and the deployment asset decide a :class:`ServerSettings` (serving/launch.py) and hand it to
vLLM through the environment (:meth:`ServerSettings.to_env`); the guard, the registry resolver and the plugin read
it back in vLLM's processes (:meth:`ServerSettings.from_env`). The limits below are the operator's to set in the
environment of `lorafoundry serve`, which vLLM inherits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lora_assets import envs
from lora_assets.home import Home
from registry.location import is_shared

#: vLLM's ``--max-lora-rank`` when no adapter on the base says more.
DEFAULT_MAX_LORA_RANK = envs.MAX_LORA_RANK.default

#: The operator's limits (lora_assets/envs.py says what each means), read once when a server's process starts.
RESOLVE_TTL_S = envs.RESOLVE_TTL_S.get()
BODY_TIMEOUT_S = envs.BODY_TIMEOUT_S.get()
HEAD_TIMEOUT_S = envs.HEAD_TIMEOUT_S.get()
MAX_CONNECTIONS_PER_CLIENT = envs.MAX_CONNECTIONS_PER_CLIENT.get()


@dataclass(frozen=True)
class ServerSettings:
    """What one server serves and from where, as `plan_server` decided it.

    Args:
        registry: the registry file (``LORAFOUNDRY_REGISTRY``), opened read-only, briefly, per lookup; or a shared
            registry's URL (``LORAFOUNDRY_REGISTRY_URL``).
        base_hash: content hash of the served base (``LORAFOUNDRY_BASE_HASH``); adapters of another base are refused.
        base_name: the base's served name (``LORAFOUNDRY_BASE_NAME``).
        adapter_root: no adapter outside this dir is ever read (``LORAFOUNDRY_ADAPTER_ROOT``).
        stage_root: the verified store vLLM reads adapters from (``LORAFOUNDRY_STAGE_DIR``; serving/integrity.py).
        max_rank: vLLM's ``--max-lora-rank`` (``LORAFOUNDRY_MAX_LORA_RANK``).
        static_models: adapter name -> the version loaded under that name at start (``LORAFOUNDRY_STATIC_MODELS``,
            comma-separated ``name@VERSION``).
        store: the adapter store versions are pulled from (``LORAFOUNDRY_ARTIFACTS``, registry/objects.py); an
            object outside it is never read. None: only adapter dirs under ``adapter_root``.
    """

    registry: Path | str
    base_hash: str
    base_name: str
    adapter_root: Path
    stage_root: Path
    max_rank: int = DEFAULT_MAX_LORA_RANK
    static_models: dict[str, int] = field(default_factory=dict)
    store: str | None = None

    def to_env(self) -> dict[str, str]:
        """The environment variables that carry these settings to vLLM's processes."""
        return {
            envs.REGISTRY.name: str(self.registry),
            envs.ARTIFACTS.name: self.store or "",
            envs.BASE_HASH.name: self.base_hash,
            envs.BASE_NAME.name: self.base_name,
            envs.ADAPTER_ROOT.name: str(self.adapter_root),
            envs.STAGE_DIR.name: str(self.stage_root),
            envs.MAX_LORA_RANK.name: str(self.max_rank),
            envs.STATIC_MODELS.name: ",".join(f"{n}@{v}" for n, v in self.static_models.items()),
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerSettings | None:
        """The settings in ``env`` (default: this process's environment); None for a vLLM that lorafoundry did
        not start (no registry named)."""
        registry = envs.REGISTRY.get(env)
        if not registry:
            return None
        # the registry's home, unless told otherwise (a shared registry has none: the home names the dirs)
        home = Home.at(envs.HOME.get(env) if is_shared(registry) else Path(registry).parent, registry)
        return cls(
            registry=registry if is_shared(registry) else Path(registry),
            store=envs.ARTIFACTS.get(env) or None,
            base_hash=envs.BASE_HASH.get(env),
            base_name=envs.BASE_NAME.get(env),
            adapter_root=Path(envs.ADAPTER_ROOT.get(env) or home.adapters),
            stage_root=Path(envs.STAGE_DIR.get(env) or home.verified),
            max_rank=envs.MAX_LORA_RANK.get(env),
            static_models=_parse_static(envs.STATIC_MODELS.get(env)),
        )


def _parse_static(value: str) -> dict[str, int]:
    held = {}
    for item in value.split(","):
        name, _, version = item.partition("@")
        if name and version.isascii() and version.isdigit():
            held[name] = int(version)
    return held
