"""Tell a running vLLM server that a name's champion changed: the plain name is reloaded in place with the new
version's weights (no restart; requests keep being served). Older versions stay addressable as ``name@VERSION``
through the registry resolver."""

from __future__ import annotations

import httpx

from lora_assets import envs
from serving.launch import ServerError, auth_headers


def notify_promotion(
    url: str, name: str, adapter_path: str, admin_key: str | None = None, timeout_s: float = 120
) -> None:
    """Reload ``name`` on the server at ``url`` from ``adapter_path`` (vLLM's load_lora_adapter, in place).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        name: the served adapter name.
        adapter_path: the new champion's adapter dir (inside the server's adapter root).
        admin_key: the server's admin key; default ``LORAFOUNDRY_ADMIN_KEY``.
    """
    _admin_post(
        url,
        "/v1/load_lora_adapter",
        {"lora_name": name, "lora_path": adapter_path, "load_inplace": True},
        f"reload {name!r}",
        admin_key,
        timeout_s,
    )


def notify_unload(url: str, name: str, admin_key: str | None = None, timeout_s: float = 60) -> None:
    """Unload ``name`` from the server at ``url`` (no version of it may be served any more); a later request
    for it goes through the registry resolver again. Raises like :func:`notify_promotion`."""
    _admin_post(url, "/v1/unload_lora_adapter", {"lora_name": name}, f"unload {name!r}", admin_key, timeout_s)


def _admin_post(url: str, path: str, body: dict, what: str, admin_key: str | None, timeout_s: float) -> None:
    """POST to one of vLLM's adapter endpoints with the admin key; :class:`ServerUnavailable` when the server
    cannot be reached or fails (5xx), :class:`ServerError` when it refuses (or there is no key)."""
    key = admin_key or envs.ADMIN_KEY.get()
    if not key:
        raise ServerError(f"no admin key: set {envs.ADMIN_KEY.name} to the key the server was started with.")
    try:
        r = httpx.post(
            f"{url.rstrip('/')}{path}", json=body, timeout=timeout_s, headers=auth_headers() | {"X-Admin-Key": key}
        )
    except httpx.HTTPError as e:
        raise ServerUnavailable(f"could not reach {url} to {what}: {e}") from e
    if r.status_code != 200:
        kind = ServerUnavailable if r.status_code >= 500 else ServerError
        raise kind(f"{url} refused to {what} ({r.status_code}): {r.text[:500]}")


class ServerUnavailable(ServerError):
    """The server could not be reached or failed (5xx): worth trying again later, unlike a refusal (4xx)."""
