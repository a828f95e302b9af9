"""The fleet's public port: the guard (serving/guard.py) in front of vllm-router, in ``lorafoundry serve``'s process.

:func:`front_app` is the single server's guard, unchanged (route allowlist, client and admin keys, every model name
checked against the registry, access log and metrics), wrapped around :class:`FleetProxy` instead of vLLM:

- model routes go to the router with ``X-Session-ID`` set to the model the guard resolved (``name@VERSION``, or
  the base's name): the router's consistent hash keeps each version on one replica while it is healthy;
- ``GET /v1/models`` (and the catalog's view of it) is one replica's answer, through the router;
- admin loads and unloads go to every replica, each of which checks them again with its own guard; the answer
  is 200 only when every replica took it;
- ``GET /metrics``: the guard's metrics for the public port, then ``lorafoundry_replica_up{replica}`` and
  ``lorafoundry_replica_restarts_total{replica}``, then each replica's own ``vllm:`` metrics and its worker's adapter
  weight loads and evictions with a ``replica`` label, then the router's own ``vllm_router_`` metrics (requests,
  retries, circuit breakers, worker health; read from its loopback Prometheus listener), all parsed and written by
  prometheus_client.

Nothing else reaches the router: its worker-management routes are closed at this port by the guard's allowlist.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from serving.fleet import Fleet
from serving.guard import LoraFoundryGuard
from serving.observe import WORKER_FAMILIES

#: Headers that belong to one connection, not to the request (RFC 9110 §7.6.1), and those this proxy sets itself.
_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"host",
    b"content-length",
    b"x-session-id",
}
_ADMIN = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def front_app(fleet: Fleet, env: Mapping[str, str]):
    """The ASGI app of the fleet's public port: the guard, configured like the replicas, around the proxy."""
    return LoraFoundryGuard(FleetProxy(fleet), env=env)


class FleetProxy:
    """ASGI app that sends what the guard passed on to the router (or to every replica, or gathers from them)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        # generation can take minutes; connecting cannot
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=10), limits=httpx.Limits(max_connections=512)
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send, self.client)
        body = await _body(receive)
        path, method = scope["path"], scope["method"]
        headers = [(k, v) for k, v in scope.get("headers") or [] if k.lower() not in _HOP]
        if path in _ADMIN:
            return await self._broadcast(path, headers, body, send)
        if path == "/metrics":
            return await _answer(send, 200, await self._metrics(headers), b"text/plain; version=0.0.4; charset=utf-8")
        if method == "POST":
            headers.append((b"x-session-id", _routing_key(body).encode()))
        url = self.fleet.router_url + path + (f"?{scope['query_string'].decode()}" if scope.get("query_string") else "")
        try:
            upstream = await self.client.send(
                self.client.build_request(method, url, headers=headers, content=body or None), stream=True
            )
        except httpx.HTTPError as e:
            return await _error(send, 502, f"no replica could take the request ({type(e).__name__}).")
        try:
            out = [(k.lower().encode(), v.encode()) for k, v in upstream.headers.items()]
            out = [(k, v) for k, v in out if k not in _HOP or k == b"content-length"]
            await send({"type": "http.response.start", "status": upstream.status_code, "headers": out})
            async for chunk in upstream.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await upstream.aclose()

    async def _broadcast(self, path: str, headers: list, body: bytes, send) -> None:
        """An admin load or unload, by name only, to every replica (each replica's guard resolves and stages it)."""
        payload = json.loads(body)
        forward = json.dumps({"lora_name": payload["lora_name"]}).encode()
        answers = await asyncio.gather(
            *(self._post(url + path, headers, forward) for url in self.fleet.replica_urls), return_exceptions=True
        )
        failed = [(i, a) for i, a in enumerate(answers) if isinstance(a, BaseException) or a.status_code != 200]
        if not failed:
            return await _answer(send, 200, answers[0].content, answers[0].headers.get("content-type", "").encode())
        i, first = failed[0]
        if isinstance(first, BaseException):
            return await _error(send, 502, f"replica {i} did not answer ({type(first).__name__}); the others: "
                                f"{len(answers) - len(failed)} of {len(answers)} took it.")  # fmt: skip
        return await _answer(send, first.status_code, first.content, b"application/json")

    async def _post(self, url: str, headers: list, body: bytes) -> httpx.Response:
        return await self.client.post(url, headers=headers + [(b"content-type", b"application/json")], content=body)

    async def _metrics(self, headers: list) -> bytes:
        """The replicas' state and their own metrics, labelled by replica, then the router's."""
        urls = [url + "/metrics" for url in self.fleet.replica_urls]
        answers = await asyncio.gather(
            *(self.client.get(url, headers=headers) for url in urls),
            self.client.get(self.fleet.router_metrics_url),
            return_exceptions=True,
        )
        texts = {i: a.text for i, a in enumerate(answers) if not isinstance(a, BaseException) and a.status_code == 200}
        router = texts.pop(len(urls), "")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_ReplicaCollector(self.fleet.status(), texts, router))
        return generate_latest(registry)


#: Of a replica's metrics, the families the public port passes on: vLLM's and its worker's (serving/observe.py). The
#: replica's other ``lorafoundry_*`` families are left out: the front counts the requests at the public port.
_PER_REPLICA = ("vllm:", *WORKER_FAMILIES)


class _ReplicaCollector:
    """prometheus_client collector: the fleet's replica gauges, every replica's vLLM and worker families, the
    router's families."""

    def __init__(self, status: list[dict], texts: dict[int, str], router: str = "") -> None:
        self.status, self.texts, self.router = status, texts, router

    def collect(self):
        up = GaugeMetricFamily("lorafoundry_replica_up", "1 while the replica's process runs", labels=["replica"])
        restarts = CounterMetricFamily(
            "lorafoundry_replica_restarts", "Times the replica was restarted after it died", labels=["replica"]
        )
        for s in self.status:
            up.add_metric([str(s["replica"])], 1.0 if s["up"] else 0.0)
            restarts.add_metric([str(s["replica"])], s["restarts"])
        yield up
        yield restarts
        merged: dict[str, Metric] = {}
        for replica, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                if not family.name.startswith(_PER_REPLICA):
                    continue
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    labels = {**sample.labels, "replica": str(replica)}
                    into.add_sample(sample.name, labels, sample.value, sample.timestamp)
        yield from merged.values()
        try:
            router = [f for f in text_string_to_metric_families(self.router) if f.name.startswith("vllm_router_")]
        except ValueError:  # not Prometheus text: the router's answer is left out, not the scrape
            router = []
        yield from router


def _routing_key(body: bytes) -> str:
    """The model the guard resolved, which the router hashes (the guard re-serialized the body, so it parses)."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        model = None
    return model if isinstance(model, str) else ""


async def _body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _answer(send, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _error(send, status: int, message: str) -> None:
    body = {"error": {"message": message, "type": "ServiceUnavailable", "param": None, "code": status}}
    await _answer(send, status, json.dumps(body).encode(), b"application/json")


async def _lifespan(receive, send, client: httpx.AsyncClient) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
