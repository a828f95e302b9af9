"""serving/observe.py through the guard with a stand-in for vLLM: what a request adds to the metrics and the access
log, that refused names never become label values, and that `usage` is read from plain and streamed answers. The
same on the real server: tests/test_serving.py::test_metrics_and_access_log_on_the_running_server."""

from __future__ import annotations

import asyncio
import json
import logging

from prometheus_client.parser import text_string_to_metric_families

from serving import observe
from tests.test_guard import app, ask, resolver  # noqa: F401  (fixtures)

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def samples() -> dict[tuple, float]:
    """Every sample of lorafoundry's registry: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(observe.metrics_text().decode()):
        for s in family.samples:
            if not s.name.endswith("_created"):  # when each series began, not a count
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


async def _answers_with_usage(scope, receive, send) -> None:
    """Stands in for vLLM: a completion with its usage."""
    await receive()
    body = json.dumps({"choices": [{"text": "ok"}], "usage": USAGE}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_a_base_request_and_a_refused_name_in_the_metrics_and_the_log(app, caplog):  # noqa: F811
    app.app, app.base_name = _answers_with_usage, "tiny"
    before = samples()
    with caplog.at_level(logging.INFO, logger="vllm.lorafoundry.access"):
        assert ask(app, "/v1/completions", {"model": "tiny", "prompt": "secret prompt text"})[0] == 200
        assert ask(app, "/v1/completions", {"model": "../../etc/passwd" + "x" * 500, "prompt": "hi"})[0] == 400
        assert ask(app, "/nope", {})[0] == 404
    got = delta(before, samples())

    def at(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    base = {"model": "tiny", "version": ""}
    assert at("lorafoundry_requests_total", route="/v1/completions", status="200", **base) == 1
    assert at("lorafoundry_prompt_tokens_total", **base) == 7
    assert at("lorafoundry_completion_tokens_total", **base) == 3
    assert at("lorafoundry_request_duration_seconds_count", **base) == 1
    assert at("lorafoundry_time_to_first_token_seconds_count", **base) == 1
    # the hostile name is no label value: refused requests count under model "-"
    assert at("lorafoundry_requests_total", route="/v1/completions", status="400", model="-", version="") == 1
    assert at("lorafoundry_refusals_total", status="400", type="InvalidModelName") == 1
    assert at("lorafoundry_refusals_total", status="404", type="NotFoundError") == 1
    assert not any("passwd" in str(labels) for _, labels in got)
    lines = [json.loads(r.getMessage().removeprefix("access ")) for r in caplog.records]
    assert [(line["route"], line["status"]) for line in lines] == [
        ("/v1/completions", 200), ("/v1/completions", 400), ("/nope", 404)
    ]  # fmt: skip
    assert (lines[0]["resolved"], lines[0]["prompt_tokens"], lines[0]["completion_tokens"]) == ("tiny", 7, 3)
    assert lines[1]["model"] == ("../../etc/passwd" + "x" * 500)[:100] and lines[1]["refusal"] == "InvalidModelName"
    assert "secret prompt text" not in caplog.text


def test_metrics_need_the_admin_key(app):  # noqa: F811
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    def get(headers: list) -> int:
        sent.clear()
        asyncio.run(app({"type": "http", "method": "GET", "path": "/metrics", "headers": headers}, receive, send))
        return next(m["status"] for m in sent if m["type"] == "http.response.start")

    assert get([]) == 401
    assert get([(b"x-admin-key", b"wrong")]) == 403
    assert get([(b"x-admin-key", b"admin")]) == 200
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b"lorafoundry_requests_total" in body or b"lorafoundry_refusals_total" in body


def test_usage_is_read_from_plain_and_streamed_answers():
    assert observe._usage(json.dumps({"usage": USAGE}).encode()) == USAGE
    stream = b"".join(
        f"data: {json.dumps(chunk)}\n\n".encode()
        for chunk in ({"choices": [{"text": "a"}]}, {"choices": [], "usage": USAGE})
    )
    assert observe._usage(stream + b"data: [DONE]\n\n") == USAGE
    assert observe._usage(b"not json") == {} and observe._usage(b'{"usage": "x"}') == {}


def test_an_accepted_admin_load_counts_as_a_load_of_its_version():
    before = samples()
    for status in (200, 403):
        exchange = observe.Exchange("POST", "/v1/load_lora_adapter")
        exchange.resolved("x", 3, "a" * 64)
        exchange.status = status
        exchange.finish()
    got = delta(before, samples())
    assert got == {("lorafoundry_adapter_loads_total", (("model", "x"), ("version", "3"), ("via", "admin"))): 1}


def test_the_worker_counters_reach_the_scrape_through_their_file(tmp_path, monkeypatch):
    """vLLM's worker writes its weight loads and evictions to the file the server was given; the guard's scrape
    reads them back, and nothing else the file may hold: other families, or a file that is not Prometheus text."""
    from lora_assets import envs

    path = tmp_path / "metrics" / "worker-8000.prom"
    monkeypatch.setenv(envs.WORKER_METRICS.name, str(path))
    assert b"lorafoundry_adapter_evictions" not in observe.metrics_text()  # no file yet: no worker families

    def worker() -> dict[tuple, float]:
        return {k: v for k, v in samples().items() if k[0].startswith(observe.WORKER_FAMILIES)}

    before = worker()
    observe.WEIGHT_LOADS.labels("x", "3").inc()
    observe.EVICTIONS.labels("x", "3", "cpu").inc(2)
    observe.write_worker_metrics(str(path))
    assert delta(before, worker()) == {
        ("lorafoundry_adapter_weight_loads_total", (("model", "x"), ("version", "3"))): 1,
        ("lorafoundry_adapter_evictions_total", (("cache", "cpu"), ("model", "x"), ("version", "3"))): 2,
    }
    requests = {k: v for k, v in samples().items() if k[0] == "lorafoundry_requests_total"}
    path.write_text(
        path.read_text()
        + '# TYPE lorafoundry_requests_total counter\nlorafoundry_requests_total{model="x",route="/",status="200",'
        'version="3"} 99\n# TYPE up gauge\nup 1\n'
    )
    assert {k: v for k, v in samples().items() if k[0] == "lorafoundry_requests_total"} == requests
    assert b"\nup 1" not in observe.metrics_text()
    path.write_text("<html>not metrics{{{")
    assert worker() == {} and observe.metrics_text().startswith(b"# HELP")


def test_the_access_line_names_the_replica_that_answered(caplog):
    """A fleet's replica (LORAFOUNDRY_REPLICA) names itself in its answer's headers and its log line; the public
    port reads the name from the answer it passes on; a header that is not a small number names nothing."""

    def answered(exchange: observe.Exchange, headers: list) -> tuple[list, dict]:
        sent: list[dict] = []

        async def send(message) -> None:
            sent.append(message)

        async def run() -> None:
            wrapped = exchange.wrap(send)
            await wrapped({"type": "http.response.start", "status": 200, "headers": headers})
            await wrapped({"type": "http.response.body", "body": b"{}"})

        with caplog.at_level(logging.INFO, logger="vllm.lorafoundry.access"):
            caplog.clear()
            asyncio.run(run())
            exchange.finish()
        return sent[0]["headers"], json.loads(caplog.records[-1].getMessage().removeprefix("access "))

    headers, line = answered(observe.Exchange("GET", "/v1/models", replica=1), [])
    assert headers == [(observe.REPLICA_HEADER, b"1")] and line["replica"] == 1
    headers, line = answered(observe.Exchange("GET", "/v1/models"), [(b"x-lorafoundry-replica", b"1")])
    assert line["replica"] == 1 and line["pid"] > 0
    for hostile in (b"-1", b"1e9", b"9" * 40, b"\xd9\xa3"):
        assert (
            answered(observe.Exchange("GET", "/v1/models"), [(observe.REPLICA_HEADER, hostile)])[1]["replica"] is None
        )
    assert answered(observe.Exchange("GET", "/v1/models"), [])[1]["replica"] is None


def test_traces_are_off_without_an_endpoint_and_a_bad_traceparent_starts_a_new_trace(monkeypatch):
    """No OTLP endpoint: no span and the scope passed on unchanged. With one (a real receiver): a ``traceparent``
    that is not W3C's format is ignored, and the scope passed on carries the new span's context, not the
    client's text."""
    from serving import tracing
    from tests.servers import TraceReceiver

    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    tracing.tracer.cache_clear()
    scope = {"type": "http", "headers": [(b"traceparent", b"00-zz-zz-01")]}
    assert tracing.start_span("GET /v1/models", scope) == (None, scope)
    receiver = TraceReceiver()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        tracing.tracer.cache_clear()
        span, passed_on = tracing.start_span("GET /v1/models", scope)
        tracing.end_span(span, {"lorafoundry.adapter.name": "x", "lorafoundry.adapter.version": None}, 503)
        trace_id = format(span.get_span_context().trace_id, "032x")
        (got,) = receiver.of_trace(trace_id)
        assert got.parent_span_id == b"" and got.status.code == 2  # a root span; a 5xx is an error
        assert [kv.key for kv in got.attributes] == ["lorafoundry.adapter.name"]
        (sent,) = [v for k, v in passed_on["headers"] if k == b"traceparent"]
        assert sent.decode().startswith(f"00-{trace_id}-{got.span_id.hex()}-")
    finally:
        tracing.tracer.cache_clear()
        receiver.close()
