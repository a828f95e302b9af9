"""Two machines of a team, on real servers started by the test session: a Postgres for the shared registry and an
S3-compatible store (SeaweedFS) for the adapters (tests/servers.py); machine B serves from a fleet.

Home A is the demo home as the session's materialization left it (its registry export, imported into a new home),
moved to the team with `lorafoundry registry migrate --to URL`. Home B is an empty dir that shares nothing with A
but the registry's URL and the store's: `lorafoundry serve --replicas 2` there runs two vLLM replicas behind
vllm-router with the guard on the public port (serving/fleet.py, serving/front.py); each replica pulls each version
from the store into B's verified store, checks its sha256, and serves it by plain name, `name@V` and `name:alias`;
what A promotes, B answers within its resolve interval, under load; an object changed in the store is refused on
every name form; the router's own routes are closed at the public port; a replica killed under load costs no
request and comes back. One `serve` process for the module (a vLLM start costs ~30 s); each test puts back what it
changed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import boto3
import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lora_assets import envs
from registry.records import NewAdapter
from registry.store import AdapterRegistry
from tests.test_migrate import contents
from tests.test_registry_security import cli
from tests.test_serve_command import stop_serve, wait_until_serving
from tests.test_serving import (
    PROMPTS,
    _copy_adapter,
    _post,
    adapter_counters,
    batch_flips,
    complete,
    greedy,
    served_dtype,
)

pytestmark = pytest.mark.slow

#: B's resolve interval (LORAFOUNDRY_RESOLVE_TTL_S): how long a change on A may take to reach B's answers.
RESOLVE_S = 1.0


class Team(NamedTuple):
    url: str  # B's public port: the guard in front of the router
    registry: AdapterRegistry  # the shared registry, as home A opens it
    home_a: Path
    home_b: Path
    local: AdapterRegistry  # home A's registry file before the move
    migrated: str  # what `registry migrate` printed
    moved: dict  # the shared registry's contents right after the move (tests/test_migrate.py:contents)
    expected: dict[str, str]  # the session server's answers to PROMPTS[1] for each demo adapter's version
    proc: subprocess.Popen  # B's `serve --replicas 2`
    router: str  # vllm-router's loopback URL, as `serve` printed it


def _new_database(postgres) -> str:
    import uuid

    import psycopg

    name = f"team_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.admin_url, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name} OWNER lorafoundry")
    return postgres.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="module")
def team(vllm_server, demo_export, postgres, object_store, trace_receiver, tmp_path_factory):
    from tests.conftest import DEMO_SPEC, free_port

    root = tmp_path_factory.mktemp("team")
    home_a, home_b = root / "a", root / "b"
    url, store = _new_database(postgres), f"{object_store.url}/team"
    shared_env = {**postgres.env(), **object_store.env(), envs.REGISTRY_URL.name: url, envs.ARTIFACTS.name: store}
    with pytest.MonkeyPatch.context() as m:
        res = cli(home_a, "import", str(demo_export))  # home A: the demo home's registry, in its own file
        assert res.exit_code == 0, res.output
        for name, value in shared_env.items():
            m.setenv(name, value)
        res = cli(home_a, "migrate", "--to", url)
        assert res.exit_code == 0, res.output
        migrated = res.output
        local = AdapterRegistry(home_a / "registry.duckdb")
        shared = AdapterRegistry(url, store=store, actor="home-a")
        moved = contents(shared)
        expected = {r.name: complete(vllm_server["url"], f"{r.name}@{r.version}", PROMPTS[1]) for r in local.list()}
        port = free_port()
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "lorafoundry"), "serve", str(DEMO_SPEC), "--home", str(home_b)]
            + ["--port", str(port), "--replicas", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={
                **os.environ,
                **shared_env,
                envs.RESOLVE_TTL_S.name: str(RESOLVE_S),
                envs.OTEL_TRACES_ENDPOINT.name: trace_receiver.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "200",
                "COLUMNS": "200",
            },
        )
        try:
            output = wait_until_serving(proc, port)
            assert proc.poll() is None, output
            router = re.search(r"behind vllm-router at (http://127\.0\.0\.1:\d+)", output).group(1)
            yield Team(
                f"http://127.0.0.1:{port}", shared, home_a, home_b, local, migrated, moved, expected, proc, router
            )
            # `lorafoundry stop` (SIGTERM to `serve`) stops the router and every replica by the PIDs `serve` started,
            # and `serve` exits 0
            started = psutil.Process(proc.pid).children(recursive=True)
            stop = subprocess.run(
                [str(Path(sys.executable).parent / "lorafoundry"), "stop", "--home", str(home_b)],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert "stopped `lorafoundry serve`" in stop.stdout, stop.stdout + stop.stderr
            assert proc.wait(60) == 0, proc.stdout.read()[-2000:]
            time.sleep(1)
            left = [p.pid for p in started if _alive(p)]
            assert not left, f"processes of `serve` left behind: {left}"
        finally:
            stop_serve(proc)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_demo_home_round_trips_through_migrate(team):
    """Same versions, aliases, history, events and sha256s; every version's objects are in the store and check."""
    assert "versions verified there" in " ".join(team.migrated.split())
    assert team.moved == contents(team.local)
    assert all(v.ok for v in team.registry.verify())


def test_home_b_serves_what_home_a_registered_under_every_name_form(team):
    """B holds nothing of A's but what it pulled into its verified store; every name form answers with A's
    weights: the session server's answer for the same version, token for token."""
    rec = team.registry.champion("categories")
    team.registry.set_alias("categories", "prod", rec.version)
    try:
        time.sleep(RESOLVE_S + 0.5)
        for ref in ("categories", f"categories@{rec.version}", "categories:prod"):
            body = {"model": ref, "prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0}
            r = _post(team.url, "/v1/completions", body)
            assert r.status_code == 200, (ref, r.text)
            assert r.json()["model"] == ("categories" if ref == "categories" else f"categories@{rec.version}")
            assert r.json()["choices"][0]["text"] == team.expected["categories"], ref
    finally:
        team.registry.set_alias("categories", "prod", None)
    verified = team.home_b / "serving" / "verified"
    weights = [p for p in team.home_b.rglob("adapter_model.safetensors") if not p.is_relative_to(verified)]
    assert weights == [] and (verified / rec.adapter_sha256).is_dir()


def test_a_promotion_on_home_a_reaches_every_replica_of_b_under_load(team, tmp_path):
    """A registers a `sentiment` version with the categories weights and promotes it while 16 clients ask B for
    `sentiment`: no request fails, every request sent a resolve interval after the promotion is answered by the new
    version (its weights, and `sentiment@NEW` as the answer's model), none by any other version than the two; the
    old version stays addressable, and when A archives the new one B answers with the old again."""
    reg = team.registry
    old, cat = reg.champion("sentiment"), reg.champion("categories")
    scratch = _copy_adapter(team.local.get("categories", cat.version).path, tmp_path / "swap")
    new = reg.register(
        NewAdapter(
            name="sentiment", path=scratch, base_model=old.base_model, promote="manual",
            base_model_hash=old.base_model_hash, metrics=old.metrics,
        )
    )  # fmt: skip
    assert complete(team.url, "sentiment", PROMPTS[1]) == team.expected["sentiment"]
    try:
        seen, (asked, promoted) = _under_load(team.url, "sentiment", 16, lambda: reg.promote("sentiment", new.version))
        assert seen and all(a.status == 200 for a in seen), {a.status for a in seen}
        assert {a.model for a in seen} <= {
            "sentiment",
            f"sentiment@{old.version}",
            f"sentiment@{new.version}",
        }
        late = [(a.model, a.text) for a in seen if a.sent > promoted + RESOLVE_S + 0.2]
        assert late and set(late) == {(f"sentiment@{new.version}", team.expected["categories"])}
        early = {a.text for a in seen if a.answered < asked}  # answered before the promotion began
        assert early == {team.expected["sentiment"]}
        assert complete(team.url, f"sentiment@{old.version}", PROMPTS[1]) == team.expected["sentiment"]
    finally:
        reg.promote("sentiment", old.version)
        reg.archive("sentiment", new.version)
    time.sleep(RESOLVE_S + 0.5)
    assert complete(team.url, "sentiment", PROMPTS[1]) == team.expected["sentiment"]
    r = _post(team.url, "/v1/completions", {"model": f"sentiment@{new.version}", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 403 and r.json()["error"]["type"] == "AdapterNotServable", r.text


class Answer(NamedTuple):
    """One request of :func:`_under_load`: when it was sent and answered (monotonic seconds), and the answer."""

    sent: float
    status: int | str  # the HTTP status, or the name of the exception the client got
    model: str | None  # the answer's ``model``
    text: str | None
    answered: float


def _under_load(url: str, model: str, clients: int, action, after_s: float = RESOLVE_S + 2.0):
    """``clients`` threads ask ``model`` for PROMPTS[1] without pause; ``action`` runs 1 s in, and the load goes on
    ``after_s`` more. Returns each request's :class:`Answer` and when ``action`` was called and returned."""
    stop, seen = threading.Event(), []

    def client() -> None:
        body = {"model": model, "prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0}
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = c.post(f"{url}/v1/completions", json=body)
                except httpx.HTTPError as e:
                    seen.append(Answer(sent, type(e).__name__, None, None, time.monotonic()))
                    continue
                answer = r.json() if r.status_code == 200 else {}
                text = answer.get("choices", [{}])[0].get("text")
                seen.append(Answer(sent, r.status_code, answer.get("model"), text, time.monotonic()))

    with ThreadPoolExecutor(clients) as pool:
        running = [pool.submit(client) for _ in range(clients)]
        time.sleep(1)
        called = time.monotonic()
        action()
        done = time.monotonic()
        time.sleep(after_s)
        stop.set()
        for f in running:
            f.result()
    return seen, (called, done)


def test_an_object_changed_in_the_store_is_refused_on_every_name_form(team):
    """The champion's weights rewritten in the bucket (same size, one byte): 409 on the plain name, `name@V` and
    `name:alias`, the server answers the rest, and `registry verify` names the version. Put back after."""
    from registry.objects import AdapterStore

    rec = team.registry.champion("categories")
    store = AdapterStore(team.registry.store.url)
    s3 = boto3.client("s3")
    key = f"{store.prefix}/{rec.adapter_sha256}/adapter_model.safetensors"
    good = s3.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    bad = bytearray(good)
    bad[-1] ^= 1
    team.registry.set_alias("categories", "prod", rec.version)
    s3.put_object(Bucket=store.bucket, Key=key, Body=bytes(bad))
    try:
        time.sleep(RESOLVE_S + 0.5)
        for ref in ("categories", f"categories@{rec.version}", "categories:prod"):
            r = _post(team.url, "/v1/completions", {"model": ref, "prompt": PROMPTS[1], "max_tokens": 4})
            assert (r.status_code, r.json()["error"]["type"]) == (409, "AdapterIntegrityError"), (ref, r.text)
        assert complete(team.url, "sentiment", PROMPTS[1]) == team.expected["sentiment"]
        res = cli(team.home_a, "verify", "--json")
        assert res.exit_code == 1, res.output
        results = {(v["name"], v["version"]): v for v in map(json.loads, res.output.splitlines())}
        assert not results["categories", rec.version]["ok"]
        assert "changed after it was registered" in results["categories", rec.version]["detail"]
        assert [k for k, v in results.items() if not v["ok"]] == [("categories", rec.version)]
    finally:
        s3.put_object(Bucket=store.bucket, Key=key, Body=good)
        team.registry.set_alias("categories", "prod", None)
    time.sleep(RESOLVE_S + 0.5)
    assert complete(team.url, "categories", PROMPTS[1]) == team.expected["categories"]


#: vllm-router 0.1.17's own routes (its axum router's paths, read from the wheel's vllm_router_rs with strings(1)),
#: each of which it answers to anyone, worker management included: none may answer at the fleet's public port.
ROUTER_ROUTES = [
    ("POST", "/add_worker?url=http://127.0.0.1:9"),
    ("POST", "/remove_worker?url=http://127.0.0.1:9"),
    ("GET", "/list_workers"),
    ("GET", "/workers"),
    ("POST", "/workers"),
    ("DELETE", "/workers/http%3A%2F%2F127.0.0.1%3A9"),
    ("POST", "/flush_cache"),
    ("GET", "/get_loads"),
    ("GET", "/get_server_info"),
    ("GET", "/get_model_info"),
    ("GET", "/readiness"),
    ("GET", "/liveness"),
    ("GET", "/health_generate"),
    ("GET", "/scheduling/diagnostics"),
    ("POST", "/finish_session"),
    ("POST", "/start_profile"),
    ("POST", "/stop_profile"),
    ("GET", "/pd_capabilities"),
    ("POST", "/generate"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/x"),
    ("POST", "/v1/responses/x/cancel"),
    ("POST", "/v1/rerank"),
    ("POST", "/rerank"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/classify"),
]


def _replicas(team) -> list[psutil.Process]:
    """B's vLLM API server processes (the replicas), children of its `serve`."""
    children = psutil.Process(team.proc.pid).children()
    return [p for p in children if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())]


def _replica_url(process: psutil.Process) -> str:
    cmd = process.cmdline()
    return f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"


def test_the_public_port_closes_the_routers_routes_and_the_replicas(team, session_home, served_spec):
    """Deny by default at the fleet's public port: every route of vllm-router's and of the replicas' vLLM app
    outside the guard's allowlist answers 404 (with or without the admin key), `/metrics` wants the admin key; the
    router behind, which answers its worker routes to anyone on loopback, still has both replicas afterwards."""
    from serving.guard import ROUTES
    from tests.conftest import ADMIN_KEY
    from tests.test_security_serving import _vllm_routes

    assert httpx.get(f"{team.router}/list_workers", timeout=10).status_code == 200  # what the router leaves open
    closed = [
        (m, re.sub(r"\{[^}]+\}", "x", p)) for m, p in sorted(_vllm_routes(session_home, served_spec) - set(ROUTES))
    ]
    for method, path in ROUTER_ROUTES + closed:
        for headers in ({}, {"X-Admin-Key": ADMIN_KEY}):
            r = httpx.request(method, f"{team.url}{path}", json={"model": "categories"}, headers=headers, timeout=30)
            assert r.status_code == 404, (method, path, r.status_code, r.text[:200])
    assert httpx.get(f"{team.url}/metrics", timeout=30).status_code == 401
    assert httpx.get(f"{team.url}/metrics", headers={"X-Admin-Key": "wrong"}, timeout=30).status_code == 403
    assert httpx.get(f"{team.url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{team.router}/readiness", timeout=10).json()["healthy_workers"] == 2


def test_base_and_adapters_sent_together_through_the_router_answer_as_alone(team, vllm_server, demo_spec):
    """Batch invariance through the router: the base and both adapters, 4 prompts each, sent at once to the
    fleet, give the session's single server's greedy answers to each request sent alone (in bf16, up to a
    runner-up at a near-tie: ``batch_flips``)."""
    versions = {r.name: f"{r.name}@{r.version}" for r in team.local.list() if r.status == "champion"}
    jobs = [(m, p) for m in ("builtin-tiny", "categories", "sentiment") for p in PROMPTS[:4]]
    alone = {(m, p): greedy(vllm_server["url"], versions.get(m, m), p) for m, p in jobs}
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = dict(zip(jobs, pool.map(lambda job: greedy(team.url, *job), jobs), strict=True))
    flips = {job: why for job in jobs if (why := batch_flips(alone[job], together[job], served_dtype(demo_spec)))}
    assert not flips, flips


def test_metrics_at_the_public_port_count_each_version_and_each_replica(team):
    """`/metrics` (admin key) on the public port: a counter per `name@version` that moves by the requests sent,
    both replicas up, each replica's own vLLM metrics and its worker's adapter weight loads under a `replica`
    label, and the router's own metrics."""
    from tests.conftest import ADMIN_KEY

    def requests() -> dict[tuple, float]:
        text = httpx.get(f"{team.url}/metrics", headers={"X-Admin-Key": ADMIN_KEY}, timeout=30).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        up = {s.labels["replica"]: s.value for s in families["lorafoundry_replica_up"].samples}
        assert up == {"0": 1.0, "1": 1.0}
        running = families["vllm:num_requests_running"].samples
        assert {s.labels["replica"] for s in running} == {"0", "1"}
        assert families["vllm_router_active_workers"].samples[0].value == 2
        return {
            (s.labels["model"], s.labels["version"]): s.value
            for s in families["lorafoundry_requests"].samples
            if s.name == "lorafoundry_requests_total" and s.labels["status"] == "200"
        }

    before = requests()
    cat = team.registry.champion("categories")
    sent = {("categories", str(cat.version)): 3, ("builtin-tiny", ""): 2}
    for (model, _), n in sent.items():
        for _ in range(n):
            complete(team.url, model, PROMPTS[0])
    after = requests()
    assert {k: after.get(k, 0) - before.get(k, 0) for k in sent} == sent
    loads = adapter_counters(team.url)  # each replica read the champion's weights at start, or on first use
    version = ("lorafoundry_adapter_weight_loads_total", "categories", str(cat.version), None)
    assert {key[-1] for key in loads if key[:4] == version} == {"0", "1"}, loads
    # the public port's access log names the replica that answered (its X-LoraFoundry-Replica header): the router's
    # consistent hash keeps one version on one replica
    log = (team.home_b / "logs" / "front.log").read_text().splitlines()
    lines = [json.loads(line.split("access ", 1)[1]) for line in log if "access {" in line]
    lines = [line for line in lines if line["route"] == "/v1/completions"][-5:]
    by_model = {(line["resolved"], line["replica"]) for line in lines}
    assert by_model in ({(f"categories@{cat.version}", r), ("builtin-tiny", b)} for r in (0, 1) for b in (0, 1)), (
        by_model
    )


def test_one_trace_holds_the_public_port_and_the_replica_that_answered(team, trace_receiver):
    """A request with a ``traceparent`` through the fleet: the public port's span is the caller's child, the
    replica's span is the public port's child (its context went through vllm-router), and both name the adapter
    version and the replica that answered."""
    import secrets

    from tests.test_serving import span_attributes

    cat = team.registry.champion("categories")
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    body = {"model": "categories", "prompt": PROMPTS[1], "max_tokens": 3}
    r = httpx.post(f"{team.url}/v1/completions", json=body, headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    assert r.status_code == 200, r.text
    spans = trace_receiver.of_trace(trace_id, 2)
    (front,) = [s for s in spans if s.parent_span_id.hex() == parent]
    (replica,) = [s for s in spans if s.parent_span_id == front.span_id]
    assert len(spans) == 2
    seen = [span_attributes(s) for s in (front, replica)]
    for attrs in seen:
        assert (attrs["lorafoundry.adapter.name"], attrs["lorafoundry.adapter.version"]) == (
            "categories",
            str(cat.version),
        )
    assert seen[0]["lorafoundry.replica"] == seen[1]["lorafoundry.replica"] in (0, 1)
    assert r.headers["x-lorafoundry-replica"] == str(seen[1]["lorafoundry.replica"])


def test_an_admin_load_reaches_every_replica(team, tmp_path):
    """An admin load through the public port is checked there and sent to each replica, whose own guard checks it
    again: afterwards every replica lists the version, and an unload takes it off every one; without the admin key
    nothing is loaded anywhere."""
    from tests.conftest import ADMIN_KEY

    reg, cat = team.registry, team.registry.champion("categories")
    scratch = _copy_adapter(team.local.get("categories", cat.version).path, tmp_path / "copy")
    new = reg.register(
        NewAdapter(
            name="categories", path=scratch, base_model=cat.base_model, promote="manual",
            base_model_hash=cat.base_model_hash, metrics=cat.metrics,
        )
    )  # fmt: skip
    name, admin = f"categories@{new.version}", {"X-Admin-Key": ADMIN_KEY}

    def listed() -> list[bool]:
        return [
            name in {m["id"] for m in httpx.get(f"{_replica_url(p)}/v1/models", timeout=30).json()["data"]}
            for p in _replicas(team)
        ]

    try:
        time.sleep(RESOLVE_S + 0.5)
        body = {"lora_name": name}
        assert httpx.post(f"{team.url}/v1/load_lora_adapter", json=body, timeout=60).status_code == 401
        assert listed() == [False, False]
        r = httpx.post(f"{team.url}/v1/load_lora_adapter", json=body, headers=admin, timeout=120)
        assert r.status_code == 200, r.text
        assert listed() == [True, True]
        r = httpx.post(f"{team.url}/v1/unload_lora_adapter", json=body, headers=admin, timeout=60)
        assert r.status_code == 200, r.text
        assert listed() == [False, False]
    finally:
        reg.archive("categories", new.version)


def test_a_replica_killed_under_load_costs_no_request_and_comes_back(team):
    """SIGKILL one replica while 8 clients send requests: no request fails (the router retries what was in flight
    on the dead replica on the other one, and its health check takes it out of the ring), the supervisor restarts
    it, and the router routes to it again. The time until it serves again is printed for the closing note."""
    from tests.conftest import ADMIN_KEY

    victim = _replicas(team)[0]
    killed = {}

    def kill() -> None:
        victim.send_signal(signal.SIGKILL)
        killed["at"] = time.monotonic()

    seen, _ = _under_load(team.url, "categories", 8, kill, after_s=4.0)
    failed = [(round(a.sent - killed["at"], 2), a.status) for a in seen if a.status != 200]
    assert failed == [], failed
    assert {a.text for a in seen} == {team.expected["categories"]}
    deadline = time.monotonic() + 240
    while httpx.get(f"{team.router}/readiness", timeout=10).json().get("healthy_workers") != 2:
        assert time.monotonic() < deadline, "the killed replica did not come back"
        time.sleep(0.5)
    back = time.monotonic() - killed["at"]
    text = httpx.get(f"{team.url}/metrics", headers={"X-Admin-Key": ADMIN_KEY}, timeout=30).text
    restarts = {
        s.labels["replica"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "lorafoundry_replica_restarts"
        for s in f.samples
    }
    assert sum(restarts.values()) == 1, restarts
    assert victim.pid not in {p.pid for p in _replicas(team)} and len(_replicas(team)) == 2
    print(f"\nreplica killed under load of 8 clients: {len(seen)} requests, 0 failed; serving again after {back:.1f} s")
