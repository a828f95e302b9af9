"""Every environment variable lorafoundry reads, declared once: its name, type, default and meaning.

As vLLM's ``vllm/envs.py`` does, nothing else in the project spells a ``LORAFOUNDRY_*`` name in code: a module reads a
setting with ``envs.HOME.get()`` and writes one into a child's environment with ``{envs.REGISTRY.name: ...}``.
Values are read when asked for, not at import, so a test's ``monkeypatch.setenv`` takes effect. An empty value
means unset. Docs and ``--help`` texts may name a variable; code takes the name from here.

This module sits on the lowest floor that reads the environment (``lora_assets/``; ``registry/`` reads none) and
imports nothing of ours.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    """One environment variable.

    Args:
        name: the variable's name.
        default: the value when it is unset or empty.
        parse: turns the text into the typed value (e.g. ``float``); a value it refuses raises ``ValueError``.
        doc: what it sets, for the table in docs and for errors.
        shown: whether an error may show the value (False: it may carry a credential).
    """

    name: str
    default: T
    parse: Callable[[str], T]
    doc: str
    shown: bool = True

    def get(self, env: Mapping[str, str] | None = None) -> T:
        """The value in ``env`` (default: this process's environment), or the default when unset or empty."""
        text = (os.environ if env is None else env).get(self.name, "").strip()
        if not text:
            return self.default
        try:
            return self.parse(text)
        except ValueError as exc:
            value = f"={text!r}" if self.shown else " (its value not shown)"
            raise ValueError(f"{self.name}{value} is not valid ({exc}). Fix: {self.doc}") from None

    def is_set(self, env: Mapping[str, str] | None = None) -> bool:
        """True when the variable holds a non-empty value."""
        return bool((os.environ if env is None else env).get(self.name, "").strip())


def _text(value: str) -> str:
    return value


def _seconds(value: str) -> float:
    seconds = float(value)
    if not seconds >= 0:
        raise ValueError("must be a number of seconds, 0 or more")
    return seconds


def _postgres_url(value: str) -> str:
    """A shared registry's URL (registry/shared.py), refused when it carries a password: a URL shows in logs,
    process lists and Dagster's UI."""
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("not a postgresql:// URL")
    if re.match(r"^[a-z]+://[^:/@]*:[^@/]*@", value):
        raise ValueError(
            "it carries a password; put that in PGPASSWORD or a PGPASSFILE (~/.pgpass), where libpq reads it"
        )
    return value


def _s3_url(value: str) -> str:
    """An adapter store's URL (registry/objects.py)."""
    if not value.startswith("s3://") or not value.removeprefix("s3://").split("/")[0]:
        raise ValueError("not an s3://BUCKET/PREFIX URL; the endpoint goes in AWS_ENDPOINT_URL")
    return value


def _count(value: str) -> int:
    count = int(value)
    if count < 1:
        raise ValueError("must be a whole number of at least 1")
    return count


# --- Where state lives -------------------------------------------------------------------------------------------
#: The home dir: registry, datasets, adapters, models, logs, Dagster's instance (lora_assets/home.py).
HOME: EnvVar[str | None] = EnvVar("LORAFOUNDRY_HOME", None, _text, "a directory; unset means ./.lorafoundry.")
#: The registry file, when it is not ``<home>/registry.duckdb`` (e.g. on shared storage).
REGISTRY: EnvVar[str | None] = EnvVar("LORAFOUNDRY_REGISTRY", None, _text, "the path of a registry.duckdb file.")
#: A registry shared by several machines (registry/shared.py): ``postgresql://USER@HOST:PORT/DATABASE``, its
#: password in ``PGPASSWORD`` or ``PGPASSFILE`` (never printed: messages mask it). Wins over LORAFOUNDRY_REGISTRY.
REGISTRY_URL: EnvVar[str | None] = EnvVar(
    "LORAFOUNDRY_REGISTRY_URL", None, _postgres_url, "a postgresql://USER@HOST:PORT/DATABASE URL.", shown=False
)
#: The adapter store several machines share (registry/objects.py): ``s3://BUCKET/PREFIX``; its endpoint and keys
#: come from the usual AWS settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws). Unset:
#: registry rows point at adapter dirs on this machine.
ARTIFACTS: EnvVar[str | None] = EnvVar("LORAFOUNDRY_ARTIFACTS", None, _s3_url, "an s3://BUCKET/PREFIX URL.")
#: The spec `workspace.yaml`'s code location loads (orchestration/definitions.py); unset: the embedded demo spec.
SPEC: EnvVar[str | None] = EnvVar("LORAFOUNDRY_SPEC", None, _text, "the path of a spec YAML file.")
#: Where built base models are kept between runs and homes, keyed by their recipe hash (lora_assets/builtin.py);
#: unset: none are kept outside the home.
MODEL_CACHE: EnvVar[str | None] = EnvVar(
    "LORAFOUNDRY_MODEL_CACHE", None, _text, "a directory for built base models, shared by homes."
)

# --- How training computes ---------------------------------------------------------------------------------------
#: What ``dtype: auto`` means (``float32`` or ``bfloat16``); unset: bf16 where the hardware computes in it natively
#: (lora_assets/hardware.py).
DTYPE: EnvVar[str | None] = EnvVar("LORAFOUNDRY_DTYPE", None, _text, "float32 or bfloat16, or unset it.")
#: A folder where each rank of a data-parallel run appends the example ids it trains on (a test and debugging aid;
#: lora_assets/data_parallel.py).
RECORD_EXAMPLES: EnvVar[str | None] = EnvVar("LORAFOUNDRY_RECORD_EXAMPLES", None, _text, "a directory, or unset it.")

# --- Keys --------------------------------------------------------------------------------------------------------
#: The key of a server's admin routes (``X-Admin-Key``: load, unload); unset, they are closed.
ADMIN_KEY: EnvVar[str | None] = EnvVar("LORAFOUNDRY_ADMIN_KEY", None, _text, "a secret string, or unset it.")
#: The key clients send (``Authorization: Bearer``) to `lorafoundry serve`; unset, no key is asked.
API_KEY: EnvVar[str | None] = EnvVar("LORAFOUNDRY_API_KEY", None, _text, "a secret string, or unset it.")
#: vLLM's own name for the client key: lorafoundry writes :data:`API_KEY` into it for vLLM, never on a command line.
VLLM_API_KEY: EnvVar[str | None] = EnvVar("VLLM_API_KEY", None, _text, "a secret string, or unset it.")
#: The server the promotion sensor tells to reload, e.g. a load balancer; unset: the deployment asset's own server.
SERVING_URL: EnvVar[str | None] = EnvVar("LORAFOUNDRY_SERVING_URL", None, _text, "an http(s) URL, or unset it.")

# --- A server's limits (the operator's, read by vLLM's processes) ------------------------------------------------
#: Seconds a registry answer is reused by the guard and the resolver: a moved alias or an archived version takes
#: effect within that.
RESOLVE_TTL_S: EnvVar[float] = EnvVar("LORAFOUNDRY_RESOLVE_TTL_S", 2.0, _seconds, "a number of seconds, 0 or more.")
#: Seconds a client has to send the whole body once the request head arrived (a reverse proxy's
#: ``client_body_timeout``): a client that dribbles it gets 408.
BODY_TIMEOUT_S: EnvVar[float] = EnvVar("LORAFOUNDRY_BODY_TIMEOUT_S", 30.0, _seconds, "a number of seconds, 0 or more.")
#: Seconds a connection has to deliver a complete request head (serving/http_limits.py).
HEAD_TIMEOUT_S: EnvVar[float] = EnvVar("LORAFOUNDRY_HEAD_TIMEOUT_S", 10.0, _seconds, "a number of seconds, 0 or more.")
#: Open connections one client address may hold.
MAX_CONNECTIONS_PER_CLIENT: EnvVar[int] = EnvVar(
    "LORAFOUNDRY_MAX_CONNECTIONS_PER_CLIENT", 64, _count, "a whole number of at least 1."
)

# --- OpenTelemetry's own variables, read to decide whether the guard traces (serving/tracing.py) -----------------
#: Where spans go (OTLP); set, the guard writes one span per request. The SDK reads it too, as it does the rest of
#: its ``OTEL_EXPORTER_OTLP_*`` settings (headers, timeout, certificates).
OTEL_TRACES_ENDPOINT: EnvVar[str | None] = EnvVar(
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None, _text, "an OTLP URL, e.g. http://127.0.0.1:4318/v1/traces."
)
#: The OTLP endpoint of every signal (traces at ``/v1/traces`` under it); used when the traces' own is unset.
OTEL_ENDPOINT: EnvVar[str | None] = EnvVar(
    "OTEL_EXPORTER_OTLP_ENDPOINT", None, _text, "an OTLP base URL, e.g. http://127.0.0.1:4318."
)
#: ``grpc`` or ``http/protobuf`` (the default) for traces; else :data:`OTEL_PROTOCOL`.
OTEL_TRACES_PROTOCOL: EnvVar[str | None] = EnvVar(
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", None, _text, "grpc or http/protobuf."
)
#: ``grpc`` or ``http/protobuf`` (the default) for every signal.
OTEL_PROTOCOL: EnvVar[str | None] = EnvVar("OTEL_EXPORTER_OTLP_PROTOCOL", None, _text, "grpc or http/protobuf.")
#: The ``service.name`` of the spans.
OTEL_SERVICE_NAME: EnvVar[str] = EnvVar("OTEL_SERVICE_NAME", "lorafoundry", _text, "a service name.")
#: ``true`` turns traces off whatever the endpoint.
OTEL_SDK_DISABLED: EnvVar[str] = EnvVar("OTEL_SDK_DISABLED", "false", _text, "true or false.")

# --- What `plan_server` decided (written by lorafoundry into vLLM's environment; serving/settings.py) ------------
#: Content hash of the served base; adapters of another base are refused.
BASE_HASH: EnvVar[str] = EnvVar("LORAFOUNDRY_BASE_HASH", "", _text, "set by `lorafoundry serve`.")
#: The base's served name.
BASE_NAME: EnvVar[str] = EnvVar("LORAFOUNDRY_BASE_NAME", "", _text, "set by `lorafoundry serve`.")
#: No adapter outside this dir is ever read; unset: the registry's home's ``adapters/``.
ADAPTER_ROOT: EnvVar[str | None] = EnvVar("LORAFOUNDRY_ADAPTER_ROOT", None, _text, "set by `lorafoundry serve`.")
#: The verified store vLLM reads adapters from; unset: the registry's home's ``serving/verified/``.
STAGE_DIR: EnvVar[str | None] = EnvVar("LORAFOUNDRY_STAGE_DIR", None, _text, "set by `lorafoundry serve`.")
#: vLLM's ``--max-lora-rank``: no adapter of a higher rank is served.
MAX_LORA_RANK: EnvVar[int] = EnvVar("LORAFOUNDRY_MAX_LORA_RANK", 16, _count, "set by `lorafoundry serve`.")
#: Which replica of a fleet this server is (``serve --replicas N``: 0 to N-1, serving/fleet.py); its guard names it
#: in each answer's ``X-LoraFoundry-Replica`` header and its access log. Unset: a single server.
REPLICA: EnvVar[int | None] = EnvVar("LORAFOUNDRY_REPLICA", None, int, "set by `lorafoundry serve --replicas N`.")
#: The file in which vLLM's worker writes its adapter weight loads and evictions (Prometheus text, serving/observe.py)
#: and the guard reads them back for ``GET /metrics``; one per server (a fleet: one per replica). Unset: not counted.
WORKER_METRICS: EnvVar[str | None] = EnvVar("LORAFOUNDRY_WORKER_METRICS", None, _text, "set by `lorafoundry serve`.")
#: The adapters loaded at start, comma-separated ``name@VERSION``.
STATIC_MODELS: EnvVar[str] = EnvVar("LORAFOUNDRY_STATIC_MODELS", "", _text, "set by `lorafoundry serve`.")

#: Every variable above, by name.
ALL: dict[str, EnvVar] = {var.name: var for var in globals().copy().values() if isinstance(var, EnvVar)}


def problems(env: Mapping[str, str] | None = None) -> list[str]:
    """Every variable of :data:`ALL` whose value is refused, one message each (name, reason, fix); the CLI checks
    them all before any command runs."""
    found = []
    for var in ALL.values():
        try:
            var.get(env)
        except ValueError as e:
            found.append(str(e))
    return found
