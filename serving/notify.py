"""Tell a running vLLM server that a name's champion changed: the plain name is reloaded in place with the new
version's weights (no restart; requests keep being served). Older versions stay addressable as ``name@VERSION``
through the registry resolver."""

from __future__ import annotations

import os

import httpx

from serving.launch import ServerError, auth_headers


def notify_promotion(url: str, name: str, adapter_path: str, admin_key: str | None = None,
                     timeout_s: float = 120) -> None:
    """Reload ``name`` on the server at ``url`` from ``adapter_path`` (vLLM's load_lora_adapter, in place).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        name: the served adapter name.
        adapter_path: the new champion's adapter dir (inside the server's adapter root).
        admin_key: the server's admin key; default ``LORAFOUNDRY_ADMIN_KEY``.
    """
    key = admin_key or os.environ.get("LORAFOUNDRY_ADMIN_KEY")
    if not key:
        raise ServerError("no admin key: set LORAFOUNDRY_ADMIN_KEY to the key the server was started with.")
    headers = auth_headers() | {"X-Admin-Key": key}
    try:
        r = httpx.post(f"{url.rstrip('/')}/v1/load_lora_adapter", headers=headers, timeout=timeout_s,
                       json={"lora_name": name, "lora_path": adapter_path, "load_inplace": True})
    except httpx.HTTPError as e:
        raise ServerUnavailable(f"could not reach {url} to reload {name!r}: {e}") from e
    if r.status_code != 200:
        kind = ServerUnavailable if r.status_code >= 500 else ServerError
        raise kind(f"{url} refused to reload {name!r} ({r.status_code}): {r.text[:500]}")


def notify_unload(url: str, name: str, admin_key: str | None = None, timeout_s: float = 60) -> None:
    """Unload ``name`` from the server at ``url`` (no version of it may be served any more); a later request
    for it goes through the registry resolver again. Raises like :func:`notify_promotion`."""
    key = admin_key or os.environ.get("LORAFOUNDRY_ADMIN_KEY")
    if not key:
        raise ServerError("no admin key: set LORAFOUNDRY_ADMIN_KEY to the key the server was started with.")
    try:
        r = httpx.post(f"{url.rstrip('/')}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=timeout_s,
                       headers=auth_headers() | {"X-Admin-Key": key})
    except httpx.HTTPError as e:
        raise ServerUnavailable(f"could not reach {url} to unload {name!r}: {e}") from e
    if r.status_code != 200:
        kind = ServerUnavailable if r.status_code >= 500 else ServerError
        raise kind(f"{url} refused to unload {name!r} ({r.status_code}): {r.text[:500]}")


class ServerUnavailable(ServerError):
    """The server could not be reached or failed (5xx): worth trying again later, unlike a refusal (4xx)."""
