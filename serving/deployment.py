"""The long-running deployment: one vLLM server (or one fleet) per home dir, started or updated from the registry.

`lorafoundry serve` runs vLLM in the foreground (recorded in ``<home>/serving/serve.json`` while it runs); the
`serving/deployment` asset instead leaves a server running after the materialization ends, and records it in
``<home>/serving/deployment.json`` (pid, url, command, served models, replicas). With ``serving.replicas`` above 1
the process it leaves is a fleet's (``python -m serving.fleet_serve``: N replicas behind vllm-router and the guard on
the public port), which stops its replicas and router by their PIDs when it is stopped. Materializing again keeps a
healthy server whose command and replicas are unchanged, and otherwise replaces it. `lorafoundry stop` stops either.
"""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from lora_assets import envs
from lora_assets.files import write_json_atomic
from lora_assets.home import Home


def state_path(home: Path) -> Path:
    return Home.at(home).deployment_state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # our own child: reap it if it exited
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    # an exited process that its parent (maybe another process, e.g. the one that started the deployment) has
    # not reaped yet is a zombie: it is gone, and waiting for it to disappear would never end
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone_within(pid: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``pid`` to exit (a zombie counts as gone: its parent reaps it)."""
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _alive(pid)


def current(home: Path) -> dict | None:
    """The recorded deployment if its process is alive and answers on /v1/models, else None."""
    import httpx  # here, not at the top: `lorafoundry stop` reads the state file only

    from serving.launch import auth_headers

    path = state_path(home)
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    if not _alive(state["pid"]):
        return None
    try:
        if httpx.get(f"{state['url']}/v1/models", timeout=5, headers=auth_headers()).status_code != 200:
            return None
    except httpx.HTTPError:
        return None
    return state


def stop(home: Path, timeout_s: float = 30) -> bool:
    """Stop the recorded deployment (SIGTERM to its process group, SIGKILL after ``timeout_s``; a fleet's process
    gets three times as long: it stops its router and replicas first). Whatever it started and left (a fleet's
    replicas run in process groups of their own) is killed after it."""
    import psutil

    path = state_path(home)
    if not path.exists():
        return False
    state = json.loads(path.read_text())
    pid = state["pid"]
    stopped = False
    if _alive(pid):
        try:
            under = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            under = []
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not _gone_within(pid, timeout_s * (3 if state.get("replicas", 1) > 1 else 1)):
            os.killpg(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.1)
        for proc in under:
            _kill_group_leftovers(proc.pid)
        stopped = True
    _kill_group_leftovers(pid)
    left = _kill_members(state.get("members") or [])  # a fleet whose own process was killed: what it left
    path.unlink(missing_ok=True)
    return stopped or left > 0


@contextmanager
def foreground(home: Path, url: str, replicas: int):
    """Record this process as the home's foreground `lorafoundry serve` while the block runs (``serving/serve.json``:
    pid, its start time, url, replicas), so that `lorafoundry stop` can stop it; removed after, if still ours."""
    import psutil

    me = psutil.Process()
    path = Home.at(home).serve_state
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"pid": me.pid, "started": me.create_time(), "url": url, "replicas": replicas})
    try:
        yield
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == me.pid:
                path.unlink()
        except (OSError, ValueError):
            pass


def stop_foreground(home: Path, timeout_s: float = 90) -> bool:
    """SIGTERM the home's foreground `serve` (which stops its router and replicas by their PIDs) and wait for it to
    exit; after ``timeout_s``, SIGKILL it and every process under it. Only the process the record names: the same
    pid and start time, and a `serve` command line; a record that names another process is removed. True when a
    `serve` was stopped."""
    import psutil

    path = Home.at(home).serve_state
    try:
        state = json.loads(path.read_text())
        proc = psutil.Process(int(state["pid"]))
        ours = abs(proc.create_time() - float(state["started"])) < 0.01 and "serve" in proc.cmdline()
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        ours = False
    if not ours:
        path.unlink(missing_ok=True)
        return False
    under = proc.children(recursive=True)
    proc.terminate()
    if not _gone_within(proc.pid, timeout_s):
        for p in [proc, *under]:
            try:
                p.kill()
            except psutil.Error:
                pass
    path.unlink(missing_ok=True)
    return True


def _members(pid: int) -> list[dict]:
    """Every process under ``pid`` now (a fleet's replicas, their engines, the router), each with its start time."""
    import psutil

    out = []
    try:
        for proc in psutil.Process(pid).children(recursive=True):
            out.append({"pid": proc.pid, "started": proc.create_time()})
    except psutil.Error:
        pass
    return out


def _kill_members(members: list[dict]) -> int:
    """Kill each recorded member that is still the same process (pid and start time): what a fleet's process
    started is left running when that process is killed with SIGKILL (its replicas run in process groups of their
    own). A replica the fleet restarted after the record is not in it. Returns how many were killed."""
    import psutil

    killed = 0
    for member in members:
        try:
            proc = psutil.Process(int(member["pid"]))
            if abs(proc.create_time() - float(member["started"])) < 0.01:
                proc.kill()
                killed += 1
        except (psutil.Error, KeyError, TypeError, ValueError):
            pass
    return killed


def _kill_group_leftovers(pgid: int) -> None:
    """vLLM's engine-core and worker processes can outlive the API server they belong to (they were seen still
    running, 2 GB each, after it exited on SIGTERM): kill whatever is left in its process group."""
    import psutil

    for proc in psutil.process_iter(["pid"]):
        try:  # members of that group only: a stale id whose group is gone matches nothing
            if os.getpgid(proc.pid) == pgid:
                proc.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


def _wait_port_free(url: str, timeout_s: float = 30) -> None:
    """Wait until the server's port can be bound (a stopped server's processes may still hold it for a moment);
    fail with a clear message if something else keeps it."""
    import socket
    from urllib.parse import urlparse

    from serving.launch import ServerError

    parsed = urlparse(url)
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((parsed.hostname, parsed.port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"port {parsed.port} on {parsed.hostname} is in use by another process. Fix: "
                        "stop it, or set serving.port to a free port."
                    ) from None
        time.sleep(0.5)


def same_command(a: list[str], b: list[str]) -> bool:
    """Equal command lines, where the interpreter may be named differently (``.venv/bin/python`` from the CLI,
    ``.venv/bin/python3`` from a Dagster run worker) as long as it is the same file."""
    if not a or not b or a[1:] != b[1:]:
        return False
    same_dir = os.path.dirname(os.path.abspath(a[0])) == os.path.dirname(os.path.abspath(b[0]))  # same venv
    return a[0] == b[0] or (same_dir and os.path.realpath(a[0]) == os.path.realpath(b[0]))


def deploy(
    home: Path,
    cmd: list[str],
    env: dict[str, str],
    url: str,
    models: list[str],
    timeout_s: float,
    on_wait=None,
    replicas: int = 1,
    policy: str = "consistent_hash",
) -> tuple[dict, bool]:
    """Make the home's deployment run ``cmd`` (``replicas`` times behind vllm-router when above 1). Returns (state,
    changed).

    Args:
        home: lorafoundry home (state and logs live under it).
        cmd: the vLLM command line (see :func:`serving.launch.build_vllm_command`).
        env: its environment.
        url: the URL it will answer on.
        models: the served model names, recorded for the UI.
        timeout_s: how long to wait for it to answer.
        on_wait: optional callable(seconds waited) for progress.
        replicas, policy: above 1, a fleet (serving/fleet_serve.py) with the router's ``policy``.
    """
    import sys
    from urllib.parse import urlparse

    from serving.launch import ServerPlan, VLLMServer

    running = current(home)
    if running and same_command(running["cmd"], cmd) and running.get("replicas", 1) == replicas:
        return running, False
    stop(home)
    _wait_port_free(url)
    launch = cmd
    if replicas > 1:
        from serving import fleet_serve

        plan = Home.at(home).root / "serving" / "fleet-plan.json"
        parsed = urlparse(url)
        address = (parsed.hostname, parsed.port)
        fleet_serve.write_plan(plan, ServerPlan(cmd, env, url, models, []), replicas, policy, address, timeout_s)
        launch = [sys.executable, "-m", "serving.fleet_serve", str(plan)]
    server = VLLMServer(launch, env, Home.at(home).logs / "vllm-deployment.log", url).start()
    server.wait_ready(timeout_s * (2 if replicas > 1 else 1), on_wait=on_wait)  # replicas, then the router
    state = {
        "pid": server.proc.pid,
        "url": url,
        "cmd": cmd,
        "replicas": replicas,
        "members": _members(server.proc.pid) if replicas > 1 else [],  # stopped with it, even after a SIGKILL
        "models": models,
        "started_at": time.time(),
        "base_hash": envs.BASE_HASH.get(env) or None,
    }  # which adapters it can take (promotion sensor)
    write_json_atomic(state_path(home), state, indent=2)
    return state, True
