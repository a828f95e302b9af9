"""Several vLLM replicas behind vLLM's router, with lorafoundry's guard as the only public port.

``lorafoundry serve --replicas N`` (or ``serving.replicas: N``) runs, on this machine::

    client ──> front (serving/front.py: the guard, keys, allowlist, metrics)       host:port from the spec
                 └─> vllm-router (consistent hash on the resolved name@version)    127.0.0.1, a free port
                       └─> N replicas (vLLM, each with the guard and the resolver)  127.0.0.1, free ports

Why the router is not the public port: vllm-router 0.1.17 answers ``/add_worker``, ``/remove_worker``,
``/flush_cache``, ``/list_workers``, ``/workers``, ``/get_loads`` and more to anyone, with no option to close them (its
``--api-key`` is the key it sends to workers). So it listens on loopback only, and the public port is the guard's,
whose allowlist is the single server's. Every replica is a full lorafoundry server (same plan, same registry, its
own guard): the weights are checked where they are loaded, whatever the path a request took.

Each replica gets its share of this process's CPUs (``VLLM_CPU_OMP_THREADS_BIND``), a log of its own
(``logs/vllm-replica-<i>.log``), and is restarted by :class:`Fleet`'s supervisor when it dies; the router's health
checks take it out of the ring and back in.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lora_assets import envs
from lora_assets.home import worker_metrics_file
from serving.launch import ServerError, ServerPlan, VLLMServer, free_port

#: How often the supervisor looks at the replicas, and the router at their ``/health`` (seconds).
CHECK_INTERVAL_S = 1


def cpu_shares(cpus: list[int], replicas: int) -> list[str]:
    """Split this process's CPUs into ``replicas`` disjoint lists, as ``VLLM_CPU_OMP_THREADS_BIND`` spells them
    (``"0,1"``); with fewer CPUs than replicas, replicas share them round robin."""
    if not cpus:
        raise ServerError("no CPU is available to this process.")
    cpus = sorted(cpus)
    if len(cpus) < replicas:
        return [str(cpus[i % len(cpus)]) for i in range(replicas)]
    size, extra = divmod(len(cpus), replicas)
    shares, start = [], 0
    for i in range(replicas):
        end = start + size + (1 if i < extra else 0)
        shares.append(",".join(str(c) for c in cpus[start:end]))
        start = end
    return shares


def replica_command(cmd: list[str], port: int) -> list[str]:
    """The single server's vLLM command, bound to 127.0.0.1 on ``port``."""
    out = list(cmd)
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        out[out.index(flag) + 1] = value
    return out


def router_command(worker_urls: list[str], port: int, metrics_port: int, policy: str = "consistent_hash") -> list[str]:
    """vllm-router on loopback: by default consistent hashing on the ``X-Session-ID`` header (the front sets it to
    the version a request resolved to, so an adapter's requests stay on the replica that holds it), health checks
    every second, and its own Prometheus listener on loopback too."""
    return [
        sys.executable,
        "-m",
        "vllm_router.launch_router",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *worker_urls,
        "--policy",
        policy,
        "--health-check-interval-secs",
        str(CHECK_INTERVAL_S),
        "--health-failure-threshold",
        "1",
        "--health-success-threshold",
        "1",
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(metrics_port),
        "--log-level",
        "warning",
    ]


@dataclass
class Replica:
    """One vLLM replica: its server, and how often it was restarted."""

    index: int
    server: VLLMServer
    restarts: int = 0

    @property
    def up(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None


@dataclass
class Fleet:
    """N replicas and the router in front of them, started and stopped by their own PIDs.

    Args:
        plan: the single server's plan (serving/launch.py:plan_server); each replica runs its command.
        replicas: how many.
        logs: where each process's log goes.
        policy: the router's policy (``serving.router_policy``).
    """

    plan: ServerPlan
    replicas: int
    logs: Path
    policy: str = "consistent_hash"
    members: list[Replica] = field(default_factory=list)
    router: VLLMServer | None = None  # the router's process, started and stopped like a vLLM's
    router_url: str = ""
    router_metrics_url: str = ""  # the router's own Prometheus listener (loopback)
    _stop: threading.Event = field(default_factory=threading.Event)
    _watch: threading.Thread | None = None

    def start(self, timeout_s: float) -> Fleet:
        """Start every replica, wait until each answers, then start the router and wait until it sees them all;
        then watch the replicas. Raises :class:`ServerError` (everything started is stopped)."""
        shares = cpu_shares(sorted(os.sched_getaffinity(0)), self.replicas)
        try:
            for i, cpus in enumerate(shares):
                port = free_port()
                env = self.plan.env | {"VLLM_CPU_OMP_THREADS_BIND": cpus, envs.REPLICA.name: str(i)}
                if envs.WORKER_METRICS.name in env:  # one file per replica, beside the single server's
                    metrics_dir = Path(env[envs.WORKER_METRICS.name]).parent
                    env[envs.WORKER_METRICS.name] = str(worker_metrics_file(metrics_dir, port))
                server = VLLMServer(
                    replica_command(self.plan.cmd, port),
                    env,
                    self.logs / f"vllm-replica-{i}.log",
                    f"http://127.0.0.1:{port}",
                )
                self.members.append(Replica(i, server.start()))
            for member in self.members:
                member.server.wait_ready(timeout_s)
            self._start_router(timeout_s)
        except BaseException:
            self.stop()
            raise
        self._watch = threading.Thread(target=self._supervise, name="lorafoundry-fleet", daemon=True)
        self._watch.start()
        return self

    @property
    def replica_urls(self) -> list[str]:
        return [m.server.url for m in self.members]

    def _start_router(self, timeout_s: float) -> None:
        port = free_port()
        self.router_url = f"http://127.0.0.1:{port}"
        env = os.environ | {"RUST_LOG": os.environ.get("RUST_LOG", "warn")}  # else a log line per request
        metrics_port = free_port()
        self.router_metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        cmd = router_command(self.replica_urls, port, metrics_port, self.policy)
        self.router = VLLMServer(cmd, env, self.logs / "router.log", self.router_url).start()  # a process by PID
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.router.proc.poll()
            if code is not None:
                raise ServerError(f"vllm-router exited with code {code}. Last log lines:\n{self.router.log_tail()}")
            try:
                ready = httpx.get(f"{self.router_url}/readiness", timeout=2).json()
                if ready.get("healthy_workers") == self.replicas:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise ServerError(f"vllm-router did not see {self.replicas} healthy replicas within {timeout_s:.0f} s.")

    def _supervise(self) -> None:
        """Restart a replica whose process died (its engine's leftovers are killed with its group)."""
        while not self._stop.wait(CHECK_INTERVAL_S / 2):
            for member in self.members:
                if self._stop.is_set() or member.up:
                    continue
                code = member.server.stop()  # the rest of its process group
                print(f"replica {member.index} exited with code {code}; restarting it", file=sys.stderr, flush=True)
                member.restarts += 1
                member.server.start()

    def status(self) -> list[dict]:
        """Each replica's index, URL, whether its process runs, and its restarts."""
        return [{"replica": m.index, "url": m.server.url, "up": m.up, "restarts": m.restarts} for m in self.members]

    def stop(self) -> None:
        """Stop the router and every replica by the PIDs this object started."""
        self._stop.set()
        if self._watch is not None:
            self._watch.join(5)
        if self.router is not None:
            self.router.stop(10)
        for member in self.members:
            member.server.stop()
