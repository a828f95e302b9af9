"""The catalog: every adapter version this server would serve, not only the ones loaded now.

vLLM's ``/v1/models`` lists what is loaded (vLLM #10784 and LoRAX #463 ask for more). The guard answers
``GET /v1/adapters`` (behind the client key) with :func:`catalog`: each registered version that passes the same
checks a request for it would pass before its files are hashed (servable status, the server's base, rank, adapter
root), with every name a client can send for it (``name`` when the plain name serves it, ``name@VERSION``,
``name:ALIAS``), its variant, headline metrics, and whether it is loaded now. The files' sha256 is checked when a
version is loaded, as for every request, not here: listing stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from registry.metrics import CHRF, EVAL_LOSS, EXACT_MATCH
from registry.records import AdapterRecord
from registry.rules import SERVABLE_STATUSES
from registry.store import AdapterRegistry

#: The metrics a catalog entry carries (adapter value and gain over the base), when the version has them.
HEADLINE_METRICS = tuple(m.name for m in (EXACT_MATCH, CHRF, EVAL_LOSS))


def variant(rec: AdapterRecord) -> str:
    """How the adapter's weights are shaped: ``lora``, ``rslora``, ``dora``, ... (``training_config.variant``,
    recorded at registration; ``lora`` for versions registered before variants existed)."""
    return str(rec.training_config.get("variant") or "lora")


def catalog(
    registry: AdapterRegistry,
    refuse: Callable[[AdapterRecord], object | None],
    loaded: set[str],
    held: dict[str, int],
) -> list[dict[str, Any]]:
    """The catalog entries, by name then version.

    Args:
        registry: the registry (read once for the versions, once for the aliases).
        refuse: the server's checks on a record (status, base, rank, root); a record it refuses is left out.
        loaded: the model ids vLLM lists now (``/v1/models``).
        held: adapter name -> the version vLLM holds under that plain name.
    """
    plain = {r.name: r.version for r in registry.servable()}
    aliases = registry.every_alias()
    entries = []
    for rec in registry.list():
        if rec.status not in SERVABLE_STATUSES or refuse(rec) is not None:
            continue
        ref = f"{rec.name}@{rec.version}"
        names = ([rec.name] if plain.get(rec.name) == rec.version else []) + [ref]
        names += [f"{rec.name}:{a}" for a in aliases.get((rec.name, rec.version), [])]
        entries.append(
            {
                "id": ref,
                "object": "adapter",
                "name": rec.name,
                "version": rec.version,
                "status": rec.status,
                "aliases": aliases.get((rec.name, rec.version), []),
                "model_names": names,
                "variant": variant(rec),
                "method": rec.method,
                "r": rec.r,
                "lora_alpha": rec.lora_alpha,
                "dataset": rec.dataset,
                "metrics": {
                    m: {k: rec.metrics[m][k] for k in ("adapter", "gain") if k in rec.metrics[m]}
                    for m in HEADLINE_METRICS
                    if m in rec.metrics
                },
                "loaded": ref in loaded or (held.get(rec.name) == rec.version and rec.name in loaded),
                "created_at": rec.created_at.isoformat(),
            }
        )
    return entries
