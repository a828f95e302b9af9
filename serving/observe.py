"""What an operator sees of the running server: Prometheus metrics per adapter version and one JSON access-log line
per request, both written by the guard (serving/guard.py), which alone knows which registry version a request was
answered with.

Metrics (``GET /metrics``, admin key; vLLM's own metrics follow ours in the same answer):

- ``lorafoundry_requests_total{route, model, version, status}``: every request the guard passed on or refused on a
  model route; ``model`` and ``version`` are what the registry resolved (the base: its served name, version ``""``),
  never the text a client sent: a refused name is counted under ``model="-"``, so hostile names cannot grow the
  label set;
- ``lorafoundry_refusals_total{status, type}``: every refusal on any route (401, 403, 404, 408, 409, 413, ...), by
  its HTTP status and OpenAI error type; ``lorafoundry_integrity_refusals_total`` those whose weights failed their
  sha256 (a subset, for alerting);
- ``lorafoundry_prompt_tokens_total`` / ``lorafoundry_completion_tokens_total{model, version}``: from each answer's
  ``usage`` (a streamed answer reports it when the client asks for ``stream_options: {include_usage: true}``);
- ``lorafoundry_time_to_first_token_seconds`` / ``lorafoundry_request_duration_seconds{model, version}``: the time
  from the request's head to the first and to the last byte of the answer;
- ``lorafoundry_adapter_loads_total{model, version, via}``: versions made known to vLLM after start-up, by the
  registry resolver on first use (``via="registry"``, serving/vllm_plugin.py) or by an admin load (``"admin"``);
- ``lorafoundry_adapter_weight_loads_total{model, version}`` and
  ``lorafoundry_adapter_evictions_total{model, version, cache}``: what vLLM's worker did with the weights, counted
  where it happens (vLLM's engine process, serving/vllm_plugin.py): every read of a version's weights into vLLM's
  LoRA cache (at start, on first use, and again after an eviction), and every eviction, from the LoRA cache
  (``cache="cpu"``, ``--max-cpu-loras``: the next request reads the weights again) or from one of the
  ``--max-loras`` slots a batch can use (``cache="slot"``: copied back in from the cache). The worker writes these
  two counters into a file with prometheus_client's ``write_to_textfile`` (``LORAFOUNDRY_WORKER_METRICS``, set by
  `lorafoundry serve`); the guard reads it back at each scrape. They restart from zero when vLLM restarts.

The access log (logger ``vllm.lorafoundry.access``, so it lands in vLLM's log) writes one line ``access {json}`` per
request: time, method, route, status, the model as asked (cut to 100 characters), ``name@version`` and the first 12
hex digits of the sha256 it resolved to, the fleet's replica that answered (``replica``: its index; None on a single
server) and the process that wrote the line (``pid``), tokens, latency and time to first token. Never a key, a
header or prompt text. A replica names itself in each answer's ``X-LoraFoundry-Replica`` header, which is how the
fleet's public port (serving/front.py) knows which replica the router picked. With an OTLP endpoint configured, the
same facts go into one OpenTelemetry span per request (serving/tracing.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, write_to_textfile
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from lora_assets import envs
from serving import tracing

access_log = logging.getLogger("vllm.lorafoundry.access")

#: lorafoundry's own metrics; not prometheus_client's default registry, which vLLM may run in multiprocess mode.
REGISTRY = CollectorRegistry(auto_describe=True)
_ADAPTER = ("model", "version")
#: Latency buckets (seconds): from a cached short answer on a GPU to a long CPU generation.
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)

REQUESTS = Counter(
    "lorafoundry_requests", "Requests on model routes", ("route", *_ADAPTER, "status"), registry=REGISTRY
)
REFUSALS = Counter("lorafoundry_refusals", "Requests refused by the guard", ("status", "type"), registry=REGISTRY)
INTEGRITY_REFUSALS = Counter(
    "lorafoundry_integrity_refusals", "Requests refused because weights failed their sha256", registry=REGISTRY
)
ADAPTER_LOADS = Counter(
    "lorafoundry_adapter_loads", "Adapter versions made known to vLLM after start-up", (*_ADAPTER, "via"),
    registry=REGISTRY,
)  # fmt: skip
PROMPT_TOKENS = Counter("lorafoundry_prompt_tokens", "Prompt tokens answered", _ADAPTER, registry=REGISTRY)
COMPLETION_TOKENS = Counter("lorafoundry_completion_tokens", "Completion tokens generated", _ADAPTER, registry=REGISTRY)
FIRST_TOKEN = Histogram(
    "lorafoundry_time_to_first_token_seconds", "Request head to the answer's first byte", _ADAPTER,
    buckets=_BUCKETS, registry=REGISTRY,
)  # fmt: skip
DURATION = Histogram(
    "lorafoundry_request_duration_seconds", "Request head to the answer's last byte", _ADAPTER,
    buckets=_BUCKETS, registry=REGISTRY,
)  # fmt: skip

#: What vLLM's worker does with adapter weights (its own registry: it lives in vLLM's engine process, not the guard's).
WORKER_REGISTRY = CollectorRegistry(auto_describe=True)
WEIGHT_LOADS = Counter(
    "lorafoundry_adapter_weight_loads", "Adapter weights read into vLLM's LoRA cache", _ADAPTER,
    registry=WORKER_REGISTRY,
)  # fmt: skip
EVICTIONS = Counter(
    "lorafoundry_adapter_evictions", "Adapters evicted from vLLM's LoRA cache (cpu) or a batch slot (slot)",
    (*_ADAPTER, "cache"), registry=WORKER_REGISTRY,
)  # fmt: skip
#: The families the worker's file may carry; anything else in it is ignored.
WORKER_FAMILIES = ("lorafoundry_adapter_weight_loads", "lorafoundry_adapter_evictions")

#: The answer header in which a fleet's replica names itself (its index).
REPLICA_HEADER = b"x-lorafoundry-replica"

#: How much of a non-streamed answer is kept to read its ``usage`` (an answer is far smaller).
_MAX_KEPT = 1 << 20


def metrics_text() -> bytes:
    """lorafoundry's metrics in Prometheus' text format: the guard's, then the worker's (read from its file)."""
    return generate_latest(REGISTRY) + worker_metrics_text(envs.WORKER_METRICS.get())


def write_worker_metrics(path: str) -> None:
    """Write the worker's counters to ``path`` (atomically: a temp file renamed over it)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(path, WORKER_REGISTRY)


def worker_metrics(path: str | None) -> list[Metric]:
    """The worker's counter families from the file at ``path``: only :data:`WORKER_FAMILIES`, parsed and written
    again by prometheus_client, so nothing else in the file reaches a scrape. None, missing or unreadable: []."""
    if not path:
        return []
    try:
        with Path(path).open("rb") as f:
            text = f.read(_MAX_KEPT).decode("utf-8", errors="replace")  # a few hundred bytes per version
        return [f for f in text_string_to_metric_families(text) if f.name in WORKER_FAMILIES]
    except (OSError, ValueError):
        return []


def worker_metrics_text(path: str | None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(worker_metrics(path)))
    return generate_latest(registry)


class _Families:
    """prometheus_client collector over families already read."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


@dataclass
class Exchange:
    """One request as the guard sees it, from its head to its answer's last byte."""

    method: str
    route: str
    started: float = field(default_factory=time.monotonic)
    asked: str | None = None  # the model as the client sent it
    model: str = "-"  # what it resolved to: adapter name or the base's served name
    version: str = ""
    sha256: str = ""
    status: int = 0
    refusal_type: str | None = None
    first_byte: float | None = None
    usage: dict = field(default_factory=dict)
    replica: int | None = None  # this server's index in a fleet; at the public port, the replica that answered
    span: object = None  # its OpenTelemetry span, when traces are on (serving/tracing.py)
    _kept: list[bytes] = field(default_factory=list)
    _kept_size: int = 0

    def resolved(self, model: str, version: int | str = "", sha256: str = "") -> None:
        self.model, self.version, self.sha256 = model, str(version), sha256

    def refused(self, status: int, kind: str) -> None:
        self.status, self.refusal_type = status, kind

    def traced(self, scope: dict) -> dict:
        """Start the request's span when traces are on; returns the scope to pass on (carrying the span's
        ``traceparent``)."""
        self.span, scope = tracing.start_span(f"{self.method} {self.route}", scope)
        return scope

    def wrap(self, send):
        """``send`` that also notes the answer's status, its first byte and its ``usage``, and names the replica:
        a fleet's replica adds its index to the answer's headers; the public port reads it from them."""

        async def observed(message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                message = self._name_replica(message)
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if self.first_byte is None and chunk:
                    self.first_byte = time.monotonic()
                if self._kept_size + len(chunk) <= _MAX_KEPT:
                    self._kept.append(chunk)
                    self._kept_size += len(chunk)
            await send(message)

        return observed

    def _name_replica(self, start: dict) -> dict:
        headers = list(start.get("headers") or [])
        if self.replica is not None:
            return {**start, "headers": [*headers, (REPLICA_HEADER, str(self.replica).encode())]}
        named = [v for k, v in headers if k.lower() == REPLICA_HEADER]
        if named and named[-1].isdigit() and len(named[-1]) < 6:
            self.replica = int(named[-1])
        return start

    def finish(self) -> None:
        """Count the request in the metrics and write its access-log line."""
        ended = time.monotonic()
        self.usage = _usage(b"".join(self._kept)) if self.status == 200 else {}
        labels = (self.model, self.version)
        if self.refusal_type is not None:
            REFUSALS.labels(str(self.status), self.refusal_type).inc()
            if self.refusal_type == "AdapterIntegrityError":
                INTEGRITY_REFUSALS.inc()
        if self.route == "/v1/load_lora_adapter" and self.status == 200 and self.version:
            ADAPTER_LOADS.labels(*labels, "admin").inc()
        if self.route in ("/v1/completions", "/v1/chat/completions"):
            REQUESTS.labels(self.route, *labels, str(self.status)).inc()
            if self.status == 200:
                PROMPT_TOKENS.labels(*labels).inc(_count(self.usage.get("prompt_tokens")))
                COMPLETION_TOKENS.labels(*labels).inc(_count(self.usage.get("completion_tokens")))
                DURATION.labels(*labels).observe(ended - self.started)
                if self.first_byte is not None:
                    FIRST_TOKEN.labels(*labels).observe(self.first_byte - self.started)
        line = self._line(ended)
        access_log.info("access %s", json.dumps(line, separators=(",", ":")))
        if self.span is not None:
            tracing.end_span(self.span, self._attributes(line), self.status)

    def _attributes(self, line: dict) -> dict:
        """The span's attributes: OpenTelemetry's HTTP and GenAI names where they exist, the adapter's in
        ``lorafoundry.adapter.*``."""
        return {
            "http.request.method": self.method,
            "http.route": self.route,
            "http.response.status_code": self.status,
            "gen_ai.request.model": line["model"],
            "gen_ai.usage.input_tokens": line["prompt_tokens"],
            "gen_ai.usage.output_tokens": line["completion_tokens"],
            "lorafoundry.adapter.name": None if self.model == "-" else self.model,
            "lorafoundry.adapter.version": self.version or None,
            "lorafoundry.adapter.sha256": self.sha256 or None,
            "lorafoundry.replica": self.replica,
            "lorafoundry.refusal": self.refusal_type,
        }

    def _line(self, ended: float) -> dict:
        return {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "method": self.method,
            "route": self.route,
            "status": self.status,
            "model": self.asked[:100] if isinstance(self.asked, str) else None,
            "resolved": f"{self.model}@{self.version}" if self.version else (None if self.model == "-" else self.model),
            "sha256": self.sha256[:12] or None,
            "replica": self.replica,
            "pid": os.getpid(),
            "prompt_tokens": self.usage.get("prompt_tokens"),
            "completion_tokens": self.usage.get("completion_tokens"),
            "latency_s": round(ended - self.started, 4),
            "ttft_s": None if self.first_byte is None else round(self.first_byte - self.started, 4),
            "refusal": self.refusal_type,
        }


def _usage(body: bytes) -> dict:
    """The ``usage`` of an OpenAI answer: a JSON object, or server-sent events whose last ``usage`` counts."""
    try:
        if body.lstrip().startswith(b"{"):
            usage = json.loads(body).get("usage")
            return usage if isinstance(usage, dict) else {}
        found: dict = {}
        for line in body.split(b"\n"):
            if line.startswith(b"data: {") and b'"usage"' in line:
                usage = json.loads(line[6:]).get("usage")
                found = usage if isinstance(usage, dict) else found
        return found
    except (ValueError, AttributeError):
        return {}


def _count(value: object) -> int:
    return value if type(value) is int and value >= 0 else 0
