"""Run a fleet until SIGINT or SIGTERM: N vLLM replicas and vllm-router on loopback (serving/fleet.py), the guard on
the public port (serving/front.py), and everything it started stopped by PID at the end.

`lorafoundry serve --replicas N` runs :func:`run` in its own process, in the foreground. The ``serving/deployment``
asset cannot: its run ends, and the fleet's supervisor must outlive it. With ``serving.replicas`` above 1 it starts
``python -m serving.fleet_serve PLAN`` as a process of its own instead of one vLLM (serving/deployment.py), and
leaves it running. ``PLAN`` is a JSON file the asset wrote (:func:`write_plan`): the replicas' vLLM command, the public
host and port, the replica count and the router's policy. The environment (the registry, the keys) is the process's
own, as a vLLM's is: never in a file.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from lora_assets.files import write_json_atomic
from serving.fleet import Fleet
from serving.launch import ServerError, ServerPlan


def run(
    plan: ServerPlan,
    replicas: int,
    policy: str,
    address: tuple[str, int],
    logs: Path,
    timeout_s: float,
    on_listening: Callable[[Fleet], None] | None = None,
    during: AbstractContextManager | None = None,
) -> None:
    """Start the fleet, then answer on ``address`` until SIGINT or SIGTERM; stop the router and the replicas at the
    end, or when a signal comes while they start. Raises :class:`ServerError` when the fleet cannot start.

    Args:
        plan: the single server's plan (serving/launch.py:plan_server); its env is the replicas' and the guard's.
        replicas, policy: how many replicas, and the router's policy (``serving.router_policy``).
        address: the public host and port.
        logs: the home's log dir (``front.log``: the public port's access log; one log per replica and the router).
        timeout_s: how long each replica may take to answer.
        on_listening: called once the public port is bound, before the first request is taken.
        during: a context held while the public port answers (the CLI's record of its foreground `serve`).
    """
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from serving import http_limits
    from serving.front import front_app

    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / "front.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    front_log = logging.getLogger("vllm.lorafoundry")  # the guard's and the access log's logger, as in vLLM
    front_log.addHandler(handler)
    front_log.setLevel(logging.INFO)
    sock = _reserve(address)
    signal.signal(signal.SIGTERM, _exit)  # while the replicas start: Fleet.start stops what it started
    fleet = None
    try:
        fleet = Fleet(plan, replicas, logs, policy).start(timeout_s)
        sock.listen()  # before anyone is told
        http_limits.apply(H11Protocol)
        config = uvicorn.Config(
            front_app(fleet, plan.env), log_level="warning", lifespan="on", http="h11", timeout_keep_alive=5
        )
        # uvicorn restores the handlers it found and raises the signal again once it has shut down: with the
        # default handler there, SIGTERM would end this process before the replicas are stopped
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: None)
        with during or nullcontext():
            if on_listening is not None:
                on_listening(fleet)
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        if fleet is not None:
            fleet.stop()


def _reserve(address: tuple[str, int]) -> socket.socket:
    """The public port, bound but not listening (a client is refused, as by a free port): bound before the replicas
    start, which takes a minute on a small machine, so that no process takes it meanwhile; their own loopback ports
    come from the same ephemeral range. ``socket.create_server`` would listen at once."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as create_server: a restart's TIME_WAIT
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def write_plan(path: Path, plan: ServerPlan, replicas: int, policy: str, address: tuple[str, int], timeout_s: float):
    """The file ``python -m serving.fleet_serve`` reads: everything but the environment."""
    host, port = address
    fields = {"replicas": replicas, "policy": policy, "host": host, "port": port, "timeout_s": timeout_s}
    write_json_atomic(path, {"cmd": plan.cmd, "url": plan.url, "names": plan.names, **fields}, indent=2)


def main(argv: list[str] | None = None) -> int:
    """``python -m serving.fleet_serve PLAN``: the deployment's fleet, logs in ``<PLAN's home>/logs``."""
    path = Path((argv or sys.argv[1:])[0])
    p = json.loads(path.read_text())
    plan = ServerPlan(p["cmd"], dict(os.environ), p["url"], p["names"], [])
    logs = path.parent.parent / "logs"  # the plan lives in <home>/serving/
    try:
        run(plan, p["replicas"], p["policy"], (p["host"], p["port"]), logs, p["timeout_s"])
    except ServerError as e:
        print(f"the fleet failed to start: {e}", file=sys.stderr, flush=True)
        return 1
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
