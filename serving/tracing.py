"""Optional OpenTelemetry traces: one span per request the guard (serving/guard.py) handles, carrying what only the
guard knows, the adapter name, version and sha256 a request resolved to (vLLM's own spans do not name the LoRA:
vllm-project/vllm#23767).

Off unless an OTLP endpoint is configured with OpenTelemetry's own variables (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
or ``OTEL_EXPORTER_OTLP_ENDPOINT``; ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc`` for gRPC, else HTTP/protobuf;
``OTEL_SERVICE_NAME``, default ``lorafoundry``; ``OTEL_SDK_DISABLED=true`` turns it off). The SDK exports in a
background thread (``BatchSpanProcessor``), so a slow or absent collector never holds a request.

A span continues the caller's trace when the request carries a W3C ``traceparent``, and the request passed on
carries the span's own context: through a fleet's public port, the router and a replica, one trace holds the
public port's span and the replica's as its child.
"""

from __future__ import annotations

import functools

from lora_assets import envs

#: The W3C Trace Context headers (https://www.w3.org/TR/trace-context/).
_CONTEXT_HEADERS = (b"traceparent", b"tracestate")


@functools.cache
def tracer():
    """This process's tracer when traces are configured, else None (and nothing of OpenTelemetry is imported)."""
    endpoint = envs.OTEL_TRACES_ENDPOINT.get() or envs.OTEL_ENDPOINT.get()
    if not endpoint or envs.OTEL_SDK_DISABLED.get().lower() == "true":
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if (envs.OTEL_TRACES_PROTOCOL.get() or envs.OTEL_PROTOCOL.get()) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: envs.OTEL_SERVICE_NAME.get()}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # reads the endpoint and headers itself
    return provider.get_tracer("lorafoundry.serving")


def start_span(name: str, scope: dict):
    """A server span named ``name`` for the request of ``scope``, child of the caller's ``traceparent`` when it
    sent a valid one; and the scope to pass on, whose ``traceparent`` is the new span's. ``(None, scope)`` when
    traces are off."""
    found = tracer()
    if found is None:
        return None, scope
    from opentelemetry.trace import SpanKind, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    headers = list(scope.get("headers") or [])
    carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers if k.lower() in _CONTEXT_HEADERS}
    span = found.start_span(name, context=propagator.extract(carrier), kind=SpanKind.SERVER)
    out: dict[str, str] = {}
    propagator.inject(out, context=set_span_in_context(span))
    passed_on = [(k, v) for k, v in headers if k.lower() not in _CONTEXT_HEADERS]
    passed_on += [(k.encode(), v.encode("latin-1")) for k, v in out.items()]
    return span, {**scope, "headers": passed_on}


def end_span(span, attributes: dict, status: int) -> None:
    """Set ``attributes`` (None values left out) and the HTTP status on ``span`` and end it; a 5xx is an error."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attributes({k: v for k, v in attributes.items() if v is not None})
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()
