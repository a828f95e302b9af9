"""The adapter registry: one DuckDB file, numbered migrations, a typed repository class.

DuckDB lets one process at a time open a file read-write, and no other process can open it meanwhile, not even
read-only. So writers and readers never share the file:

- writers take turns on an OS lock (``flock``) on ``<file>.lock``; the holder opens the file read-write, does its
  work in one transaction, checkpoints, closes, and publishes a copy, ``<file>.snapshot``, by write-then-rename;
- readers attach the latest snapshot read-only. It is never written in place (only replaced), so no reader waits
  on a writer and no writer waits on a reader. A snapshot older than the file (a writer killed before publishing,
  the file changed by another program) is republished by the next reader that finds no writer at work.

Adapter paths inside the registry file's dir (the home) are stored relative to it, so a home can be moved, copied
or restored and keep serving; records always carry the absolute path. Never hold a connection open.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import duckdb
from pydantic import BaseModel, ConfigDict, Field

from registry.adapter_files import check_adapter_files
from registry.errors import (
    AdapterNotFoundError,
    RegistryBusyError,
    RegistryConflictError,
    RegistryCorruptError,
    RegistryError,
    RegistryInputError,
    RegistrySchemaError,
)
from registry.rules import (
    LOWER_IS_BETTER,
    SERVABLE_STATUSES,
    VERSION_RE,
    Status,
    check_alias,
    check_name,
    check_status,
    parse_ref,
)

__all__ = [
    "ADAPTER_FILES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "TABLES",
    "AdapterRecord",
    "AdapterRegistry",
    "NewAdapter",
    "VerifyResult",
    "adapter_sha256",
    "check_adapter_dir",
    "file_lock",
    "stored_path",
]

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: The registry's tables: what `registry export` writes and `registry import` reads, one parquet file each.
TABLES = ("adapters", "aliases", "alias_history", "events")

T = TypeVar("T")


def _m001_initial(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("""
        CREATE TABLE adapters (
            name VARCHAR NOT NULL,
            version INTEGER NOT NULL,
            status VARCHAR NOT NULL,
            base_model VARCHAR NOT NULL,
            base_model_hash VARCHAR,
            method VARCHAR NOT NULL,
            r INTEGER NOT NULL,
            lora_alpha INTEGER NOT NULL,
            target_modules VARCHAR[] NOT NULL,
            training_config JSON,
            dataset VARCHAR,
            dataset_fingerprint VARCHAR,
            path VARCHAR NOT NULL,
            adapter_sha256 VARCHAR NOT NULL,
            size_bytes BIGINT NOT NULL,
            trainable_params BIGINT,
            metrics JSON,
            created_at TIMESTAMP NOT NULL,
            run_id VARCHAR,
            code_version VARCHAR,
            PRIMARY KEY (name, version)
        )""")
    con.execute("""
        CREATE TABLE events (
            occurred_at TIMESTAMP NOT NULL,
            actor VARCHAR NOT NULL,
            action VARCHAR NOT NULL,
            name VARCHAR NOT NULL,
            version INTEGER,
            detail JSON
        )""")
    con.execute("""
        CREATE VIEW latest_adapters AS
        SELECT * FROM adapters
        QUALIFY row_number() OVER (PARTITION BY name ORDER BY version DESC) = 1""")


def leaderboard_view_sql() -> str:
    """The `leaderboard` view: every version ranked within its name by its rank metric (the metric a version is
    ranked by: its gate's, else eval_loss, kept in training_config), best first by :data:`LOWER_IS_BETTER`,
    rejected and archived versions last."""
    lower = ", ".join(f"'{m}'" for m in sorted(LOWER_IS_BETTER))
    return f"""
        CREATE VIEW leaderboard AS
        WITH ranked AS (
            SELECT name, version, status, method, r, lora_alpha, target_modules, trainable_params,
                   coalesce(training_config->>'rank_metric', 'eval_loss') AS rank_metric,
                   training_config->'sweep_point' AS sweep_point,
                   CAST(training_config->>'train_wall_s' AS DOUBLE) AS train_wall_s,
                   CAST(training_config->>'peak_memory_mb' AS DOUBLE) AS peak_memory_mb,
                   metrics, created_at
            FROM adapters)
        SELECT * EXCLUDE (metrics),
               CAST(json_extract(metrics, '$."' || rank_metric || '".adapter') AS DOUBLE) AS metric_value,
               row_number() OVER (
                   PARTITION BY name
                   ORDER BY CASE WHEN status IN ('rejected', 'archived') THEN 1 ELSE 0 END,
                            CASE WHEN rank_metric IN ({lower})
                                 THEN CAST(json_extract(metrics, '$."' || rank_metric || '".adapter') AS DOUBLE)
                                 ELSE -CAST(json_extract(metrics, '$."' || rank_metric || '".adapter') AS DOUBLE)
                            END, version) AS rank
        FROM ranked"""


def _m002_champions_leaderboard(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("""
        CREATE VIEW champions AS
        SELECT * FROM adapters WHERE status = 'champion'""")
    con.execute(leaderboard_view_sql())


def _m003_aliases(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("""
        CREATE TABLE aliases (
            name VARCHAR NOT NULL,
            alias VARCHAR NOT NULL,
            version INTEGER NOT NULL,
            updated_at TIMESTAMP NOT NULL,
            PRIMARY KEY (name, alias)
        )""")
    con.execute("""
        CREATE TABLE alias_history (
            changed_at TIMESTAMP NOT NULL,
            actor VARCHAR NOT NULL,
            name VARCHAR NOT NULL,
            alias VARCHAR NOT NULL,
            version INTEGER,
            previous_version INTEGER
        )""")
    # champions promoted before aliases existed get their `champion` alias
    con.execute("""
        INSERT INTO aliases SELECT name, 'champion', version, now()::TIMESTAMP FROM adapters
        WHERE status = 'champion'""")


def _m004_relative_paths(con: duckdb.DuckDBPyConnection) -> None:
    # adapter paths inside the file's dir become relative to it; a path into another copy of the same layout (a
    # home copied before this migration) is rebased onto this one where the adapter is (the server re-hashes it)
    row = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    if not row or not row[0]:
        return  # an in-memory registry stores nothing
    base = Path(row[0]).resolve().parent
    for name, version, path in con.execute("SELECT name, version, path FROM adapters").fetchall():
        stored = _relocated(Path(path), base)
        if stored != path:
            con.execute("UPDATE adapters SET path = ? WHERE name = ? AND version = ?", [stored, name, version])


#: Numbered migrations, applied in order on open. Append only; never edit a released one.
MIGRATIONS: list[tuple[int, str, Callable[[duckdb.DuckDBPyConnection], None]]] = [
    (1, "initial schema: adapters, events, latest_adapters", _m001_initial),
    (2, "views: champions, leaderboard", _m002_champions_leaderboard),
    (3, "aliases with history", _m003_aliases),
    (4, "adapter paths relative to the registry's dir", _m004_relative_paths),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


class AdapterRecord(BaseModel):
    """One registered adapter version (a row of `adapters`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Adapter name (the name rule, `registry.rules.NAME_RULE`); served under it.")
    version: int = Field(description="1, 2, ... per name, assigned at registration; never reused.")
    status: Status = Field(
        description="candidate (servable), champion (servable, what the plain name serves; at most one per name), "
        "rejected (failed its gate) or archived (retired); never served when rejected or archived."
    )
    base_model: str = Field(description="The base model as given: a local dir, a builtin: name or a hub id.")
    base_model_hash: str | None = Field(
        None, description="Content hash of the base's weights; a server loads only versions trained on its base."
    )
    method: str = Field(description="How it was trained: lora, qlora, dora, ...")
    r: int = Field(description="LoRA rank, from adapter_config.json.")
    lora_alpha: int = Field(description="LoRA alpha, from adapter_config.json.")
    target_modules: list[str] = Field(description="Modules the adapter wraps, sorted, from adapter_config.json.")
    training_config: dict[str, Any] = Field(
        default_factory=dict,
        description="The training settings, plus `rank_metric` (what the leaderboard ranks by), sweep point, "
        "wall time and peak memory when known.",
    )
    dataset: str | None = Field(None, description="The dataset it was trained on (lineage).")
    dataset_fingerprint: str | None = Field(None, description="Fingerprint of the cleaned dataset it was trained on.")
    path: str = Field(description="The adapter dir, absolute (stored relative to the registry's dir when inside it).")
    adapter_sha256: str = Field(description="sha256 over adapter_config.json and adapter_model.safetensors.")
    size_bytes: int = Field(description="Total size of those two files.")
    trainable_params: int | None = Field(None, description="Trainable parameters of the adapter, when known.")
    metrics: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Evaluation per metric: {metric: {base, adapter, gain, ...}}, e.g. eval_loss, exact_match.",
    )
    created_at: datetime = Field(description="When this version was registered (UTC, naive).")
    run_id: str | None = Field(None, description="The Dagster run that registered it, if any.")
    code_version: str | None = Field(None, description="The lorafoundry code version that trained it, if known.")


class NewAdapter(BaseModel):
    """What a caller supplies to register an adapter; version, hash, size and time are assigned here."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Name to register under (the name rule, `registry.rules.NAME_RULE`).")
    path: Path = Field(description="A peft LoRA dir: adapter_config.json and adapter_model.safetensors.")
    status: Literal["candidate", "rejected"] = Field(
        "candidate", description="`rejected` when it failed its quality gate (registered, never served)."
    )
    base_model: str = Field(description="The base model: a local dir, a builtin: name or a hub id.")
    base_model_hash: str | None = Field(
        None, description="Content hash of the base's weights; None when the base is not on this machine."
    )
    method: str = Field("lora", description="How it was trained: lora, qlora, dora, ...")
    training_config: dict[str, Any] = Field(default_factory=dict, description="The training settings (lineage).")
    dataset: str | None = Field(None, description="The dataset it was trained on (lineage).")
    dataset_fingerprint: str | None = Field(None, description="Fingerprint of the cleaned dataset.")
    trainable_params: int | None = Field(None, description="Trainable parameters, when known.")
    metrics: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Evaluation per metric: {metric: {base, adapter, ...}}; empty: not evaluated."
    )
    run_id: str | None = Field(None, description="The Dagster run registering it, if any.")
    code_version: str | None = Field(None, description="The lorafoundry code version that trained it, if known.")
    promote: Literal["if_better", "if_significantly_better", "always", "manual"] = Field(
        "manual",
        description="Make a `candidate` the champion of its name: if it beats the current champion on "
        "`rank_metric`, if `evidence` shows a significant paired win over the current champion, always, or only "
        "by an explicit promote.",
    )
    evidence: dict[str, Any] | None = Field(
        None,
        description="For `if_significantly_better`: the comparison with the champion (lora_assets.evidence.Evidence: "
        "champion_version, significant, the interval, detail); recorded with the promotion or its refusal.",
    )
    rank_metric: str = Field("eval_loss", description="Metric the champion rule compares (adapter value).")


_COLUMNS = list(AdapterRecord.model_fields)


def stored_path(adapter_dir: Path | str, base: Path) -> str:
    """How an adapter dir is stored: relative to ``base`` (the registry file's dir) when inside it, else absolute."""
    p = Path(adapter_dir).resolve()
    return p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p)


def _relocated(path: Path, base: Path) -> str:
    """The stored form of a path written by a registry before migration 4 (see :func:`_m004_relative_paths`)."""
    if not path.is_absolute():
        return path.as_posix()
    if path.resolve().is_relative_to(base):
        return stored_path(path, base)
    parts = path.parts
    for i, part in enumerate(parts):  # .../<old home>/adapters/<rest>: the same <rest> under this home
        if part == "adapters" and (base.joinpath(*parts[i:]) / "adapter_config.json").is_file():
            return Path(*parts[i:]).as_posix()
    return str(path)


class VerifyResult(BaseModel):
    """Whether one registered version's files still hash to the registered sha256."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Adapter name.")
    version: int = Field(description="Adapter version.")
    ok: bool = Field(description="Whether the files hash to the registered sha256.")
    detail: str = Field(description="`ok`, or what differs (the two hashes) or why the files cannot be read.")
    path: str = Field(description="The adapter dir that was hashed.")


def adapter_sha256(adapter_dir: Path) -> tuple[str, int]:
    """sha256 over the adapter's config and weights (file names and bytes), and their total size."""
    h = hashlib.sha256()
    size = 0
    for fname in ADAPTER_FILES:
        f = Path(adapter_dir) / fname
        h.update(fname.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
    return h.hexdigest(), size


@contextmanager
def file_lock(path: Path, wait_s: float, shared: bool = False) -> Iterator[bool]:
    """Hold an OS lock (``flock``) on ``path`` (created if needed), exclusive unless ``shared``; yields whether it
    was taken within ``wait_s`` (0: one try). The kernel drops it when its holder dies, so a held lock always
    belongs to a live process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    held = False
                    break
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.05)
        try:
            yield held
        finally:
            if held:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _file_error(path: Path, e: duckdb.Error) -> RegistryError:
    """The registry error for DuckDB's error on opening or reading ``path``: busy (DuckDB's own lock, held by
    another program), corrupt, or other. DuckDB raises one exception type for all of them, so its message is the
    only thing that tells them apart; this is the one place that reads it."""
    text = str(e)
    if not (isinstance(e, duckdb.IOException) or type(e) is duckdb.Error):  # a query's own error (syntax, types)
        return RegistryError(f"registry {path}: {text}")
    if "Could not set lock" in text:
        return RegistryBusyError(f"registry {path} is locked by another program ({text})")
    if any(m in text for m in ("not a valid DuckDB database", "Could not read enough bytes", "Corrupt database")):
        return RegistryCorruptError(
            f"registry file {path} is not a valid/complete DuckDB database ({text.splitlines()[0]}). Fix: move it "
            "aside and restore the registry: put back a backup copy of the file, or import a `lorafoundry registry "
            "export` dir into the home with `lorafoundry registry import DIR`."
        )
    return RegistryError(f"registry {path}: {text}")


def _read_every_row(con: duckdb.DuckDBPyConnection) -> None:
    """Read every column of every row of the open database's tables (each row cast to text, so no column is
    skipped): raises DuckDB's error on a block that is missing or fails its checksum."""
    tables = con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()
    for (table,) in tables:
        name = table.replace('"', '""')
        con.execute(f'SELECT max(length(CAST("{name}" AS VARCHAR))) FROM "{name}"').fetchall()


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@contextmanager
def _time_limit(con: duckdb.DuckDBPyConnection, timeout_s: float | None) -> Iterator[threading.Event]:
    """Interrupt the statement running on ``con`` once ``timeout_s`` pass (from a timer thread; None: never);
    the event yielded is set when it did, so the caller tells its own interrupt from another."""
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        con.interrupt()

    timer = threading.Timer(timeout_s, stop) if timeout_s is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield stopped
    finally:
        if timer is not None:
            timer.cancel()


def _check_limits(timeout_s: float | None, memory_limit: str | None) -> None:
    """Refuse a time limit that is not a positive number of seconds, and a memory limit that is not a size."""
    if timeout_s is not None and not 0 < timeout_s < math.inf:
        raise RegistryInputError(f"time limit {timeout_s!r} s: not a positive number of seconds. Fix: pass e.g. 30.")
    if memory_limit is not None and not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", memory_limit, re.IGNORECASE):
        raise RegistryInputError(
            f"memory limit {memory_limit[:40]!r}: not a size. Fix: pass a number and a unit, e.g. 512MB or 4GiB."
        )


def _run_limited(
    con: duckdb.DuckDBPyConnection, sql: str, params: list, timeout_s: float | None, memory_limit: str | None
) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` on ``con`` (whose memory limit is set already), stopped after ``timeout_s``; returns (column
    names, rows). A statement stopped by either limit is a :class:`RegistryInputError` naming the limit and how to
    raise it."""
    with _time_limit(con, timeout_s) as stopped:
        try:
            cur = con.execute(sql, params)
            cols = [d[0] for d in cur.description] if cur.description else []
            return cols, cur.fetchall()
        except duckdb.InterruptException:
            if not stopped.is_set():
                raise
            raise RegistryInputError(
                f"query stopped at its time limit of {timeout_s:g} s. Fix: narrow it (a WHERE, a LIMIT), or raise "
                "the limit: `registry sql --timeout SECONDS`."
            ) from None
        except duckdb.OutOfMemoryException:
            if memory_limit is None:
                raise
            raise RegistryInputError(
                f"query stopped at its memory limit of {memory_limit}. Fix: narrow it (fewer rows or columns, a "
                "LIMIT), or raise the limit: `registry sql --memory-limit 4GiB`."
            ) from None


def check_adapter_dir(adapter_dir: Path, base_model: str | None = None) -> dict:
    """Return adapter_config.json of a peft LoRA dir whose safetensors weights fit it (and ``base_model``'s weights,
    when that is a local model dir), or raise :class:`RegistryInputError` with the reason; see
    :func:`registry.adapter_files.check_adapter_files`."""
    return check_adapter_files(Path(adapter_dir), base_model)


class AdapterRegistry:
    """Typed access to the registry file. Every method opens, works in one transaction, and closes.

    Args:
        path: the DuckDB file (created and migrated on first use).
        max_wait_s: how long a writer waits for its turn (another writer, or another program holding the file).
        actor: who is acting, recorded in the events log.
    """

    def __init__(self, path: Path | str, max_wait_s: float = 60.0, actor: str = "lorafoundry") -> None:
        self.path = Path(path)
        self.max_wait_s = max_wait_s
        self.actor = actor

    @property
    def snapshot_path(self) -> Path:
        """The read-only copy readers attach (replaced by rename after every write)."""
        return self.path.with_name(self.path.name + ".snapshot")

    @property
    def base_dir(self) -> Path:
        """The dir that relative adapter paths are stored against: the registry file's (the home, by default)."""
        return self.path.resolve().parent

    def adapter_path(self, stored: str) -> Path:
        """The absolute adapter dir of a stored ``path`` value."""
        p = Path(stored)
        return p if p.is_absolute() else self.base_dir / p

    def stored_path(self, adapter_dir: Path | str) -> str:
        """How ``adapter_dir`` is stored in this registry (relative to :attr:`base_dir` when inside it)."""
        return stored_path(adapter_dir, self.base_dir)

    # -- connection handling ----------------------------------------------------------------------------

    def _write(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run ``fn`` in one read-write transaction on the file, in this writer's turn; then publish the snapshot."""
        with file_lock(self._lock_path, self.max_wait_s) as held:
            if not held:
                raise RegistryBusyError(
                    f"registry {self.path}: another writer kept it for {self.max_wait_s:.0f} s. Fix: retry when "
                    "it is done (a long `registry import`?)."
                )
            # a file that changed since the last snapshot was changed by someone else (or a writer was killed): read
            # it whole before writing to it, so a damaged file is reported rather than written on
            con = self._open_file(self.max_wait_s, validate=not self._snapshot_current())
            try:
                con.execute("BEGIN TRANSACTION")
                try:
                    out = fn(con)
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("CHECKPOINT")  # everything in the file itself, so a plain copy is complete
            except duckdb.Error as e:
                raise _file_error(self.path, e) from None
            finally:
                con.close()
            if not self._snapshot_current():
                self._publish()
            return out

    def _read(self, fn: Callable[[duckdb.DuckDBPyConnection], T], sandbox: dict[str, str] | None = None) -> T:
        """Run ``fn`` on the latest snapshot, attached read-only in a fresh in-memory database; with ``sandbox``
        (settings to take first, such as its memory limit), that database can reach no file, extension or setting
        (for SQL written by users)."""
        for attempt in range(3):
            target = self._read_target()
            con = duckdb.connect(":memory:")
            try:
                if target is None:  # no registry yet: an empty one, read-only like a real one
                    self._attach(con, _empty_registry())
                else:
                    self._attach(con, target)
                    if _check_version(con, self.path) < SCHEMA_VERSION and attempt < 2:
                        self._refresh(force=True)  # a snapshot of an older schema: migrate the file, publish again
                        continue
                if sandbox is not None:
                    for name, value in sandbox.items():
                        con.execute(f"SET {name} = {_sql_string(value)}")
                    con.execute("SET enable_external_access = false")
                    con.execute("SET lock_configuration = true")
                con.execute("BEGIN TRANSACTION")
                return fn(con)
            except duckdb.Error as e:
                problem = _file_error(target or self.path, e)
                if not isinstance(problem, RegistryCorruptError):
                    raise
                if target != self.snapshot_path or attempt == 2:
                    raise problem from None
                self._refresh(force=True)  # a damaged snapshot: copy the file again (an error there is the file's)
            finally:
                con.close()
        raise AssertionError("unreachable")

    @property
    def _lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _read_target(self) -> Path | None:
        """The file a reader attaches: the snapshot, republished first when it is stale and no writer is at work (a
        writer at work publishes when it is done, so its readers read the previous snapshot rather than wait);
        None when there is no registry yet."""
        if not self.path.exists():
            return None
        if self._snapshot_current():
            return self.snapshot_path
        have_snapshot = self.snapshot_path.exists()
        try:
            self._refresh(force=False, wait=not have_snapshot)
        except PermissionError:  # a registry dir this process may not write: read what is there
            return self.snapshot_path if have_snapshot else self.path
        except RegistryBusyError:
            if not have_snapshot:
                raise
        # no snapshot only when another program kept changing the file while it was copied: read the file itself
        return self.snapshot_path if self.snapshot_path.exists() else self.path

    def _refresh(self, force: bool, wait: bool = True) -> None:
        """Open the file (migrating it, replaying a killed writer's log) and publish it, unless the snapshot is
        current (or ``force``); without ``wait``, do nothing when a writer or another program holds the file."""
        with file_lock(self._lock_path, self.max_wait_s if wait else 0.0) as held:
            if not held and wait:
                raise RegistryBusyError(f"registry {self.path}: another writer kept it for {self.max_wait_s:.0f} s.")
            if not held or (not force and self._snapshot_current()):
                return
            con = self._open_file(self.max_wait_s if wait else 0.0, validate=True)
            try:
                con.execute("CHECKPOINT")
            except duckdb.Error as e:
                raise _file_error(self.path, e) from None
            finally:
                con.close()
            self._publish()

    def _snapshot_current(self) -> bool:
        """Whether the snapshot is a copy of the file as it is now: it carries the file's size and modification
        time, and a write-ahead log next to the file means a writer is at work (or was killed)."""
        try:
            file, snap = self.path.stat(), self.snapshot_path.stat()
        except FileNotFoundError:
            return False
        same = (file.st_size, file.st_mtime_ns) == (snap.st_size, snap.st_mtime_ns)
        return same and not self.path.with_name(self.path.name + ".wal").exists()

    def _publish(self) -> None:
        """Copy the closed, checkpointed file to the snapshot by write-then-rename; the caller holds the writer
        lock. The copy takes the file's modification time, which is how readers tell it is current."""
        snap = self.snapshot_path
        for leftover in snap.parent.glob(glob.escape(snap.name) + ".tmp-*"):  # a publisher killed mid-copy
            leftover.unlink(missing_ok=True)
        tmp = snap.with_name(f"{snap.name}.tmp-{os.getpid()}-{random.getrandbits(32):08x}")
        try:
            for _ in range(3):
                before = self.path.stat()
                shutil.copyfile(self.path, tmp)
                os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))
                after = self.path.stat()
                if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
                    os.replace(tmp, snap)
                    return
            # another program kept changing the file while it was copied: readers republish later
        finally:
            tmp.unlink(missing_ok=True)

    def _open_file(self, wait_s: float, validate: bool = False) -> duckdb.DuckDBPyConnection:
        """Open the file read-write, created and migrated; the caller holds the writer lock. Another program holding
        DuckDB's own lock on it (a `duckdb` shell) is waited for, up to ``wait_s``. With ``validate``, every row of
        every table is read first: a truncated file can open and even answer some queries (its catalog intact),
        and fails only on the blocks it lost."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        delay = 0.01
        while True:
            try:
                con = duckdb.connect(str(self.path))
                break
            except duckdb.Error as e:
                problem = _file_error(self.path, e)
                if not isinstance(problem, RegistryBusyError):
                    raise problem from None
                if time.monotonic() >= deadline:
                    raise RegistryBusyError(
                        f"registry {self.path} stayed locked by another program for {wait_s:.0f} s ({e}). Fix: "
                        "close its connection (e.g. a `duckdb` shell on the file) and retry."
                    ) from None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)
        try:
            if validate:
                _read_every_row(con)
            _migrate(con, self.path)
        except duckdb.Error as e:
            con.close()
            raise _file_error(self.path, e) from None
        except BaseException:
            con.close()
            raise
        return con

    def _attach(self, con: duckdb.DuckDBPyConnection, target: Path) -> None:
        """Attach ``target`` read-only as the default catalog `registry`. Only a reader that could not publish a
        snapshot attaches the file itself, and waits for its lock if a writer holds it."""
        deadline = time.monotonic() + self.max_wait_s
        delay = 0.01
        while True:
            try:
                con.execute(f"ATTACH {_sql_string(str(target))} AS registry (READ_ONLY)")
                con.execute("USE registry")
                return
            except duckdb.Error as e:
                if not isinstance(_file_error(target, e), RegistryBusyError) or time.monotonic() >= deadline:
                    raise
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)

    # -- operations --------------------------------------------------------------------------------------

    def register(self, new: NewAdapter) -> AdapterRecord:
        """Register an adapter dir. The same sha256 under the same name is that version again: nothing new is
        written unless its evaluation changed (a new gate, a new eval), which updates its metrics and status."""
        check_name(new.name)
        cfg = check_adapter_dir(new.path, new.base_model)
        sha, size = adapter_sha256(new.path)
        now = datetime.now(UTC).replace(tzinfo=None)
        base = self.base_dir

        def op(con: duckdb.DuckDBPyConnection) -> AdapterRecord:
            # one round trip: the version with these bytes, if any, and the next free version of the name
            same, version = con.execute(
                "SELECT max(version) FILTER (WHERE adapter_sha256 = ?), coalesce(max(version), 0) + 1 "
                "FROM adapters WHERE name = ?",
                [sha, new.name],
            ).fetchone()
            if same is not None:
                return _reevaluate(con, self.actor, new, same, base)
            row = _new_row(new, cfg, version, sha, size, now, stored_path(new.path, base))
            _insert(con, "adapters", row)
            action = "register" if new.status != "rejected" else "reject"
            _event(con, self.actor, action, new.name, version, {"sha256": sha, "status": new.status})
            if new.status == "candidate" and _apply_promote_rule(con, self.actor, new, version):
                row["status"] = "champion"
            return _record(tuple(row[c] for c in _COLUMNS), base)

        return self._write(op)

    def list(
        self,
        name: str | None = None,
        status: str | None = None,
        latest_only: bool = False,
        *,
        base_model: str | None = None,
        dataset: str | None = None,
        min_metric: dict[str, float] | None = None,
        max_metric: dict[str, float] | None = None,
        order_by: str | None = None,
        descending: bool = False,
        limit: int | None = None,
    ) -> list[AdapterRecord]:
        """Registered versions, filtered; oldest first unless ordered by a metric.

        Args:
            name, status, base_model, dataset: equality filters.
            latest_only: only the newest version of each name.
            min_metric / max_metric: ``{metric: bound}`` on the adapter's value of that metric (inclusive).
            order_by: a metric name to order by (the adapter's value), ascending unless ``descending``.
            limit: at most this many rows.
        """
        table = "latest_adapters" if latest_only else "adapters"
        if name is not None:
            check_name(name)
        if status is not None:
            check_status(status)
        where, args = [], []
        for column, value in (("name", name), ("status", status), ("base_model", base_model), ("dataset", dataset)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        for bounds, op in ((min_metric or {}, ">="), (max_metric or {}, "<=")):
            for metric, bound in bounds.items():
                where.append(f"CAST(json_extract(metrics, ?) AS DOUBLE) {op} ?")
                args += [_metric_path(metric), bound]
        sql = f"SELECT {', '.join(_COLUMNS)} FROM {table}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        if order_by:
            sql += f" ORDER BY CAST(json_extract(metrics, ?) AS DOUBLE) {'DESC' if descending else 'ASC'} NULLS LAST"
            args.append(_metric_path(order_by))
            sql += ", name, version"
        else:
            sql += " ORDER BY name, version"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        base = self.base_dir
        return self._read(lambda con: [_record(r, base) for r in con.execute(sql, args).fetchall()])

    def get(self, name: str, version: int | str | None = None) -> AdapterRecord:
        """One version of an adapter: by number, by alias (``"champion"``), or the latest when None.

        ``name`` may also carry the reference itself: ``name@3`` or ``name:champion``.
        """
        name, ref_version, ref_alias = parse_ref(name)
        ref = version if version is not None else (ref_version if ref_version is not None else ref_alias)
        if isinstance(ref, str):
            ref = int(ref) if VERSION_RE.fullmatch(ref) else check_alias(ref)
        base = self.base_dir

        def op(con: duckdb.DuckDBPyConnection) -> AdapterRecord:
            if isinstance(ref, str):
                v = _alias_version(con, name, ref)
                if v is None:
                    raise AdapterNotFoundError(
                        f"adapter {name!r} has no alias {ref!r}. Fix: `lorafoundry registry show "
                        f"{name}` lists its aliases."
                    )
            elif ref is None:
                v = con.execute("SELECT max(version) FROM adapters WHERE name = ?", [name]).fetchone()[0]
            else:
                v = int(ref)
            rec = _find_record(con, name, v, base)
            if rec is None:
                raise AdapterNotFoundError(
                    f"no adapter {name!r}" + (f" version {v}" if v else "") + " in the registry. "
                    "Fix: `lorafoundry registry list` shows what is there."
                )
            return rec

        return self._read(op)

    def aliases(self, name: str) -> dict[str, int]:
        """The aliases of ``name`` and the versions they point to."""
        _, rows = self.query("SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", [name])
        return dict(rows)

    def every_alias(self) -> dict[tuple[str, int], list[str]]:
        """(name, version) -> the aliases pointing at it, in alias order, for every name."""
        _, rows = self.query("SELECT name, alias, version FROM aliases ORDER BY name, alias")
        found: dict[tuple[str, int], list[str]] = {}
        for name, alias, version in rows:
            found.setdefault((name, version), []).append(alias)
        return found

    def alias_history(self, name: str) -> list[dict[str, Any]]:
        """Every change to the aliases of ``name``, oldest first."""
        cols, rows = self.query("SELECT * FROM alias_history WHERE name = ? ORDER BY changed_at, rowid", [name])
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def set_alias(self, name: str, alias: str, version: int | None) -> None:
        """Point ``name:alias`` at ``version`` (None removes the alias). `champion` moves only by promote."""
        check_name(name)
        check_alias(alias)
        if alias == "champion":
            raise RegistryInputError(
                "`champion` is set by promotion. Fix: `lorafoundry registry promote NAME VERSION`."
            )

        def op(con: duckdb.DuckDBPyConnection) -> None:
            if version is not None:
                status = _status(con, name, version)
                if status is None:
                    raise AdapterNotFoundError(f"no adapter {name}@{version}.")
                if status not in SERVABLE_STATUSES:
                    raise RegistryConflictError(
                        f"{name}@{version} is {status}; an alias can only point at a candidate or the champion."
                    )
            _set_alias(con, self.actor, name, alias, version)

        self._write(op)

    def archive(self, name: str, version: int) -> AdapterRecord:
        """Retire ``name@version``: status `archived`, never served; its aliases are removed (with history)."""

        def op(con: duckdb.DuckDBPyConnection) -> AdapterRecord:
            if _status(con, name, version) is None:
                raise AdapterNotFoundError(f"no adapter {name}@{version}.")
            _set_column(con, name, version, status="archived")
            for (alias,) in con.execute(
                "SELECT alias FROM aliases WHERE name = ? AND version = ?", [name, version]
            ).fetchall():
                _set_alias(con, self.actor, name, alias, None)
            _event(con, self.actor, "archive", name, version, {})
            return _fetch_record(con, name, version, self.base_dir)

        return self._write(op)

    def record_event(self, name: str, version: int, action: str, detail: dict[str, Any]) -> None:
        """Record something done with ``name@version`` outside the registry (e.g. ``export_merged``) in its event
        log. ``action``: lower-case words joined by ``_``; ``detail``: a JSON-serializable dict."""
        if not re.fullmatch(r"[a-z]+(_[a-z]+)*", action) or len(action) > 40:
            raise RegistryInputError(f"action {action!r} is not an event name. Fix: lower-case words joined by _.")
        json.dumps(detail)  # fails here, before the write, if it cannot be stored

        def op(con: duckdb.DuckDBPyConnection) -> None:
            if _status(con, name, version) is None:
                raise AdapterNotFoundError(f"no adapter {name}@{version}.")
            _event(con, self.actor, action, name, version, detail)

        self._write(op)

    def events(self, name: str, version: int | None = None) -> list[dict[str, Any]]:
        """The event log of ``name`` (of one version when given), oldest first; ``detail`` decoded."""
        sql = "SELECT occurred_at, actor, action, name, version, detail FROM events WHERE name = ?"
        args: list[Any] = [name]
        if version is not None:
            sql += " AND version = ?"
            args.append(version)
        cols, rows = self.query(sql + " ORDER BY occurred_at, rowid", args)
        out = [dict(zip(cols, r, strict=True)) for r in rows]
        for e in out:
            e["detail"] = json.loads(e["detail"]) if isinstance(e["detail"], str) else e["detail"]
        return out

    def verify(self, name: str | None = None, version: int | None = None) -> list[VerifyResult]:
        """Recompute each adapter's sha256 over its files and compare with the registered one."""
        results = []
        for rec in self.list(name=name):
            if version is not None and rec.version != version:
                continue
            try:
                sha, _ = adapter_sha256(Path(rec.path))
                ok = sha == rec.adapter_sha256
                detail = "ok" if ok else f"sha256 {sha[:16]}… differs from the registered {rec.adapter_sha256[:16]}…"
            except OSError as e:
                ok, detail = False, f"cannot read the adapter files: {e}"
            results.append(VerifyResult(name=rec.name, version=rec.version, ok=ok, detail=detail, path=rec.path))
        return results

    def servable(self, verify: bool = False) -> list[AdapterRecord]:
        """The version served under each name: its champion, else its latest candidate (never a rejected or
        archived one). With ``verify``, a version whose files no longer match its sha256 is left out."""
        chosen: dict[str, AdapterRecord] = {}
        for r in self.list():
            if r.status == "champion" or (r.status == "candidate" and chosen.get(r.name, r).status != "champion"):
                chosen[r.name] = r
        if verify:
            bad = {
                (v.name, v.version): v.detail
                for r in chosen.values()
                for v in self.verify(r.name, r.version)
                if not v.ok
            }
            for (name, version), detail in bad.items():
                log.warning("not serving %s@%s: %s (run `lorafoundry registry verify`)", name, version, detail)
            return [r for r in chosen.values() if (r.name, r.version) not in bad]
        return list(chosen.values())

    def champion(self, name: str) -> AdapterRecord | None:
        """The champion version of ``name``, or None."""
        rows = self.list(name=name, status="champion")
        return rows[-1] if rows else None

    def promote(self, name: str, version: int, reason: str = "manual promote") -> AdapterRecord:
        """Make ``name@version`` the champion (the previous champion becomes a candidate). Rejected and
        archived versions cannot be promoted."""

        def op(con: duckdb.DuckDBPyConnection) -> AdapterRecord:
            status = _status(con, name, version)
            if status is None:
                raise AdapterNotFoundError(
                    f"no adapter {name}@{version}. Fix: `lorafoundry registry list` shows versions."
                )
            if status not in SERVABLE_STATUSES:
                raise RegistryConflictError(
                    f"{name}@{version} is {status} and cannot be promoted; only candidates can."
                )
            _promote(con, self.actor, name, version, reason)
            return _fetch_record(con, name, version, self.base_dir)

        return self._write(op)

    def leaderboard(self, name: str) -> list[dict[str, Any]]:
        """Every version of ``name`` ranked by its rank metric (best first; rejected and archived last), from
        the `leaderboard` view."""
        cols, rows = self.query("SELECT * FROM leaderboard WHERE name = ? ORDER BY rank", [name])
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def query(
        self, sql: str, params: list | None = None, timeout_s: float | None = None, memory_limit: str | None = None
    ) -> tuple[list[str], list[tuple]]:
        """Run a read-only SQL statement; returns (column names, rows).

        It runs on the snapshot, attached read-only, in a database that can reach no file, extension or setting:
        it sees the registry's tables and views and nothing else (`COPY ... TO`, `read_text`, `ATTACH`,
        `INSTALL`/`LOAD` and `SET` are refused), and never spills to disk. Paths in `adapters.path` are as stored:
        relative to the registry's dir when inside it.

        Args:
            sql: one statement; ``?`` marks the ``params``.
            timeout_s: stop the statement after this many seconds (None: no time limit).
            memory_limit: the most memory DuckDB may use for it, e.g. ``"1GiB"`` or ``"512MB"`` (None: DuckDB's).

        Raises:
            RegistryInputError: the statement fails, is refused, or passes a limit.
        """
        _check_limits(timeout_s, memory_limit)
        settings = {"temp_directory": ""} | ({"memory_limit": memory_limit} if memory_limit else {})
        try:
            return self._read(lambda con: _run_limited(con, sql, params or [], timeout_s, memory_limit), settings)
        except duckdb.Error as e:
            raise RegistryInputError(
                f"query failed: {e}\nFix: `registry sql` runs read-only queries on the tables adapters, aliases, "
                "alias_history, events and the views latest_adapters, champions, leaderboard; it cannot write, "
                "read or write files, attach databases, load extensions or change settings."
            ) from None

    def champion_changes(self, after: str | None = None) -> list[tuple[str, str, int]]:
        """Every event that changed the champion of a name (a promotion, or a champion rejected on re-evaluation)
        after the event time ``after`` (every one when None), oldest first, as (time as text, name, version)."""
        sql = (
            "SELECT occurred_at::VARCHAR, name, version FROM events WHERE (action = 'promote' OR (action = "
            "'reevaluate' AND detail->>'previous_status' = 'champion' AND detail->>'status' = 'rejected'))"
        )
        sql += (" AND occurred_at > ?::TIMESTAMP" if after else "") + " ORDER BY 1"
        return self._read(lambda con: con.execute(sql, [after] if after else []).fetchall())

    def export_tables(self, dest: Path) -> tuple[dict[str, int], list[tuple[str, int, Path]]]:
        """Write ``dest/<table>.parquet`` for every table of :data:`TABLES`, all read in one transaction; the
        exported ``path`` column is ``adapters/<name>/v<N>`` (relative to ``dest``). Returns the rows per table and
        (name, version, adapter dir) of every exported version, whose files the caller copies there."""
        counts: dict[str, int] = {}

        def op(con: duckdb.DuckDBPyConnection) -> list[tuple[str, int, Path]]:
            for table in TABLES:
                sql = (
                    f"SELECT * REPLACE ('adapters/' || name || '/v' || version AS path) FROM {table}"
                    if table == "adapters"
                    else f"SELECT * FROM {table}"
                )
                con.execute(f"COPY ({sql}) TO {_sql_string(str(dest / (table + '.parquet')))} (FORMAT parquet)")
                counts[table] = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            rows = con.execute("SELECT name, version, path FROM adapters").fetchall()
            return [(name, version, self.adapter_path(path)) for name, version, path in rows]

        sources = self._read(op)
        return counts, sources

    def import_rows(self, adapters: list[dict[str, Any]], related: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
        """Insert the rows of an export in one transaction: ``adapters``, new versions (their ``path`` already in
        this registry's stored form), and of ``related`` (the export's aliases, alias_history and events rows) those
        about the new versions. This registry's champion and aliases win over imported ones: an imported champion
        comes in as a candidate when its name already has a champion. Returns the rows inserted per table."""
        keys = {(r["name"], r["version"]) for r in adapters}
        names = {name for name, _ in keys}
        imported = dict.fromkeys(TABLES, 0)

        def op(con: duckdb.DuckDBPyConnection) -> None:
            for r in adapters:
                row = dict(r)
                if row["status"] == "champion" and _champion(con, row["name"]) is not None:
                    row["status"] = "candidate"  # this registry's champion stays; promote the import by hand if wanted
                _insert(con, "adapters", row)
            imported["adapters"] = len(adapters)
            for table in ("aliases", "alias_history", "events"):
                for rec in related.get(table, []):
                    ours = rec["name"] in names if table == "alias_history" else (rec["name"], rec["version"]) in keys
                    if not ours or (table == "aliases" and _alias_version(con, rec["name"], rec["alias"]) is not None):
                        continue  # about a version not imported, or an alias this registry already has
                    _insert(con, table, rec)
                    imported[table] += 1

        self._write(op)
        return imported

    def paths_in_use(self) -> set[Path]:
        """Every registered version's adapter dir, read from the file itself in a writer's turn (so a version
        whose writer was killed before publishing the snapshot counts too)."""
        base = self.base_dir
        rows = self._write(lambda con: con.execute("SELECT path FROM adapters").fetchall())
        return {(base / p).resolve() for (p,) in rows}

    def init(self) -> None:
        """Create the file if needed and apply pending migrations."""
        self._write(lambda con: None)

    def schema_version(self) -> int:
        return self._read(lambda con: _current_version(con))


_EMPTY: list[tempfile.TemporaryDirectory] = []  # kept alive for the process; removed at exit


def _empty_registry() -> Path:
    """A registry file with the current schema and no rows, made once per process, for reading a registry that
    does not exist yet: attached read-only like a real one, so `registry sql` refuses writes there too."""
    if not _EMPTY:
        scratch = tempfile.TemporaryDirectory(prefix="lorafoundry-empty-registry-")
        con = duckdb.connect(str(Path(scratch.name) / "empty.duckdb"))
        try:
            _migrate(con, Path(scratch.name) / "empty.duckdb")
        finally:
            con.close()
        _EMPTY.append(scratch)
    return Path(_EMPTY[0].name) / "empty.duckdb"


def _record(row: tuple, base: Path) -> AdapterRecord:
    """A row of `adapters` as a record; a relative ``path`` is resolved against ``base`` (the registry's dir)."""
    data = dict(zip(_COLUMNS, row, strict=True))
    if not Path(data["path"]).is_absolute():
        data["path"] = str(base / data["path"])
    data["training_config"] = json.loads(data["training_config"] or "{}")
    data["metrics"] = json.loads(data["metrics"] or "{}")
    return AdapterRecord.model_validate(data)


def _find_record(con: duckdb.DuckDBPyConnection, name: str, version: int | None, base: Path) -> AdapterRecord | None:
    """``name@version`` as a record, or None when there is no such version."""
    row = con.execute(
        f"SELECT {', '.join(_COLUMNS)} FROM adapters WHERE name = ? AND version = ?", [name, version]
    ).fetchone()
    return None if row is None else _record(row, base)


def _fetch_record(con: duckdb.DuckDBPyConnection, name: str, version: int, base: Path) -> AdapterRecord:
    """``name@version`` as a record; the caller knows it exists (it just wrote or checked it)."""
    rec = _find_record(con, name, version, base)
    assert rec is not None, f"{name}@{version} vanished inside its own transaction"
    return rec


def _new_row(new: NewAdapter, cfg: dict, version: int, sha: str, size: int, now: datetime, path: str) -> dict[str, Any]:
    """The `adapters` row of a new version (JSON columns as text), in column order."""
    row = {
        "name": new.name,
        "version": version,
        "status": new.status,
        "base_model": new.base_model,
        "base_model_hash": new.base_model_hash,
        "method": new.method,
        "r": int(cfg["r"]),
        "lora_alpha": int(cfg["lora_alpha"]),
        "target_modules": sorted(cfg["target_modules"]),
        "training_config": json.dumps({**new.training_config, "rank_metric": new.rank_metric}),
        "dataset": new.dataset,
        "dataset_fingerprint": new.dataset_fingerprint,
        "path": path,
        "adapter_sha256": sha,
        "size_bytes": size,
        "trainable_params": new.trainable_params,
        "metrics": json.dumps(new.metrics),
        "created_at": now,
        "run_id": new.run_id,
        "code_version": new.code_version,
    }
    return {c: row[c] for c in _COLUMNS}


def _insert(con: duckdb.DuckDBPyConnection, table: str, row: dict[str, Any]) -> None:
    """Insert one row given as {column: value} (the table is one of the registry's own)."""
    con.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))


def _status(con: duckdb.DuckDBPyConnection, name: str, version: int) -> str | None:
    """The status of ``name@version``, or None when there is no such version."""
    row = con.execute("SELECT status FROM adapters WHERE name = ? AND version = ?", [name, version]).fetchone()
    return row[0] if row else None


def _set_column(con: duckdb.DuckDBPyConnection, name: str, version: int, **values: Any) -> None:
    """Update columns of ``name@version`` (the column names are this module's own, never a caller's)."""
    sets = ", ".join(f"{column} = ?" for column in values)
    con.execute(f"UPDATE adapters SET {sets} WHERE name = ? AND version = ?", [*values.values(), name, version])


def _reevaluate(con: duckdb.DuckDBPyConnection, actor: str, new: NewAdapter, version: int, base: Path) -> AdapterRecord:
    """The same bytes registered again. Without new metrics: the existing row (plus the base's hash and the new
    path when the row had no hash yet). With new metrics (a new evaluation): the version takes them, and the new
    gate outcome: a rejected version that now passes becomes a candidate (and the champion rule applies); a
    candidate or champion that now fails is rejected (a champion leaves its alias, so the name has no champion
    until another version earns it). Archived stays archived."""
    rec = _fetch_record(con, new.name, version, base)
    # the base's hash and the files' place, when the first registration could not record them (an import
    # before the base was on this machine): registering again with the base present is the fix the CLI names
    if rec.base_model_hash is None and new.base_model_hash is not None:
        _set_column(con, new.name, version, base_model_hash=new.base_model_hash, path=stored_path(new.path, base))
        _event(con, actor, "update", new.name, version, {"base_model_hash": new.base_model_hash})
        rec = _fetch_record(con, new.name, version, base)
    # only a new evaluation (metrics) can change the gate outcome: registering files again with no metrics
    # (e.g. `registry register`) never turns a rejected version into a candidate
    evaluated = bool(new.metrics)
    passes = new.status != "rejected"
    status_changes = evaluated and rec.status != "archived" and passes == (rec.status == "rejected")
    if not evaluated or (new.metrics == rec.metrics and not status_changes):
        return rec
    _set_column(con, new.name, version, metrics=json.dumps(new.metrics))
    status = rec.status
    if status_changes:
        status = "candidate" if passes else "rejected"
        _set_column(con, new.name, version, status=status)
        if rec.status == "champion":
            _set_alias(con, actor, new.name, "champion", None)
    _event(con, actor, "reevaluate", new.name, version, {"previous_status": rec.status, "status": status})
    if status == "candidate" and status_changes:
        _apply_promote_rule(con, actor, new, version)
    return _fetch_record(con, new.name, version, base)


def _apply_promote_rule(con: duckdb.DuckDBPyConnection, actor: str, new: NewAdapter, version: int) -> bool:
    """Make the candidate ``new.name@version`` the champion when ``new.promote`` says so (``if_better``: it beats
    the champion on ``new.rank_metric``; ``always``); returns whether it was promoted."""
    if new.promote == "manual":
        return False
    if new.promote == "if_significantly_better":
        return _promote_on_evidence(con, actor, new, version)
    why = _beats(new.metrics, _champion(con, new.name), new.rank_metric) if new.promote == "if_better" else "always"
    if why:
        _promote(con, actor, new.name, version, why)
    return bool(why)


def _promote_on_evidence(con: duckdb.DuckDBPyConnection, actor: str, new: NewAdapter, version: int) -> bool:
    """``if_significantly_better``: promote only on evidence of a significant win over the champion that is the
    champion now (evidence against an earlier champion decides nothing); a refusal is an event with its reason."""
    champion = _champion(con, new.name)
    if champion is None:
        _promote(con, actor, new.name, version, "first version to pass its gate")
        return True
    if champion[0] == version:
        return False
    evidence = new.evidence or {}
    if evidence.get("champion_version") != champion[0]:
        reason = f"no paired evidence against the current champion v{champion[0]}"
        _event(con, actor, "keep_champion", new.name, version, {"reason": reason, "evidence": new.evidence})
        return False
    if not evidence.get("significant"):
        _event(con, actor, "keep_champion", new.name, version, {"reason": evidence.get("detail"), "evidence": evidence})
        return False
    _promote(con, actor, new.name, version, str(evidence.get("detail")), evidence)
    return True


def _champion(con: duckdb.DuckDBPyConnection, name: str) -> tuple[int, dict] | None:
    row = con.execute("SELECT version, metrics FROM adapters WHERE name = ? AND status = 'champion'", [name]).fetchone()
    return (row[0], json.loads(row[1] or "{}")) if row else None


def _beats(metrics: dict, champion: tuple[int, dict] | None, metric: str) -> str | None:
    """Why a new version beats the champion on ``metric`` (None when it does not)."""
    if champion is None:
        return "first version to pass its gate"
    new, old = metrics.get(metric, {}).get("adapter"), champion[1].get(metric, {}).get("adapter")
    if new is None:
        return None
    if old is None:
        return f"champion v{champion[0]} has no {metric}"
    better = new < old if metric in LOWER_IS_BETTER else new > old
    return f"{metric} {new:.4f} beats champion v{champion[0]}'s {old:.4f}" if better else None


def _promote(
    con: duckdb.DuckDBPyConnection, actor: str, name: str, version: int, reason: str, evidence: dict | None = None
) -> None:
    old = _champion(con, name)
    if old is not None and old[0] == version:
        return
    if old is not None:
        _set_column(con, name, old[0], status="candidate")
    _set_column(con, name, version, status="champion")
    _set_alias(con, actor, name, "champion", version)
    detail = {"reason": reason, "previous_champion": old[0] if old else None}
    _event(con, actor, "promote", name, version, detail | ({"evidence": evidence} if evidence else {}))


def _alias_version(con: duckdb.DuckDBPyConnection, name: str, alias: str) -> int | None:
    """The version ``name:alias`` points at, or None."""
    row = con.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", [name, alias]).fetchone()
    return row[0] if row else None


def _set_alias(con: duckdb.DuckDBPyConnection, actor: str, name: str, alias: str, version: int | None) -> None:
    prev_version = _alias_version(con, name, alias)
    if prev_version == version:
        return
    con.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", [name, alias])
    now = datetime.now(UTC).replace(tzinfo=None)
    if version is not None:
        con.execute("INSERT INTO aliases VALUES (?, ?, ?, ?)", [name, alias, version, now])
    con.execute("INSERT INTO alias_history VALUES (?, ?, ?, ?, ?, ?)", [now, actor, name, alias, version, prev_version])


def _metric_path(metric: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_]+", metric):
        raise RegistryInputError(f"metric {metric!r} is not a metric name. Fix: use e.g. exact_match, eval_loss.")
    return f'$."{metric}".adapter'


def _event(
    con: duckdb.DuckDBPyConnection, actor: str, action: str, name: str, version: int | None, detail: dict
) -> None:
    con.execute(
        "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
        [datetime.now(UTC).replace(tzinfo=None), actor, action, name, version, json.dumps(detail)],
    )


def _current_version(con: duckdb.DuckDBPyConnection) -> int:
    # one query; asking information_schema first cost more than the rest of a read (it lists every catalog)
    try:
        return con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]
    except duckdb.CatalogException:
        return 0


def _check_version(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    current = _current_version(con)
    if current > SCHEMA_VERSION:
        raise RegistrySchemaError(
            f"registry {path} has schema version {current}, newer than this lorafoundry "
            f"understands ({SCHEMA_VERSION}). Fix: upgrade lorafoundry; do not write to this file "
            "with an older version."
        )
    return current


def _migrate(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Apply pending migrations in order, each in its own transaction."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)"
    )
    current = _check_version(con, path)
    for number, name, fn in MIGRATIONS:
        if number <= current:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            fn(con)
            con.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, ?)", [number, name, datetime.now(UTC).replace(tzinfo=None)]
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
