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
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import duckdb
from pydantic import BaseModel, ConfigDict, Field

from lora_assets.spec import NAME_PATTERN

log = logging.getLogger(__name__)

Status = Literal["candidate", "champion", "rejected", "archived"]
SERVABLE_STATUSES = ("candidate", "champion")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

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


def _m002_champions_leaderboard(con: duckdb.DuckDBPyConnection) -> None:
    # rank_metric: the metric a version is ranked by (its gate's, else eval_loss), kept in training_config
    con.execute("""
        CREATE VIEW champions AS
        SELECT * FROM adapters WHERE status = 'champion'""")
    con.execute("""
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
                            CASE WHEN rank_metric IN ('eval_loss', 'perplexity')
                                 THEN CAST(json_extract(metrics, '$."' || rank_metric || '".adapter') AS DOUBLE)
                                 ELSE -CAST(json_extract(metrics, '$."' || rank_metric || '".adapter') AS DOUBLE)
                            END, version) AS rank
        FROM ranked""")


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
LOWER_IS_BETTER = {"eval_loss", "perplexity"}
SCHEMA_VERSION = MIGRATIONS[-1][0]


class RegistryError(RuntimeError):
    """A registry operation that cannot succeed (newer schema, bad adapter dir); the base of the types below."""


class RegistryInputError(RegistryError):
    """A name, alias, version, status or SQL statement that the registry refuses."""


class AdapterNotFoundError(RegistryError):
    """No such adapter name, version or alias."""


class RegistryBusyError(RegistryError):
    """The registry stayed locked by another writer or program for longer than the wait allowed."""


class RegistryCorruptError(RegistryError):
    """The registry file is not a valid or complete DuckDB database."""


class AdapterRecord(BaseModel):
    """One registered adapter version (a row of `adapters`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: int
    status: Status
    base_model: str
    base_model_hash: str | None = None
    method: str
    r: int
    lora_alpha: int
    target_modules: list[str]
    training_config: dict[str, Any] = Field(default_factory=dict)
    dataset: str | None = None
    dataset_fingerprint: str | None = None
    path: str
    adapter_sha256: str
    size_bytes: int
    trainable_params: int | None = None
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    created_at: datetime
    run_id: str | None = None
    code_version: str | None = None


class NewAdapter(BaseModel):
    """What a caller supplies to register an adapter; version, hash, size and time are assigned here."""

    model_config = ConfigDict(extra="forbid")

    name: str
    path: Path
    status: Literal["candidate", "rejected"] = "candidate"
    base_model: str
    base_model_hash: str | None = None
    method: str = "lora"
    training_config: dict[str, Any] = Field(default_factory=dict)
    dataset: str | None = None
    dataset_fingerprint: str | None = None
    trainable_params: int | None = None
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    run_id: str | None = None
    code_version: str | None = None
    promote: Literal["if_better", "always", "manual"] = Field(
        "manual",
        description="Make a `candidate` the champion of its name: if it beats the current champion on "
        "`rank_metric`, always, or only by an explicit promote.",
    )
    rank_metric: str = Field("eval_loss", description="Metric the champion rule compares (adapter value).")


_COLUMNS = list(AdapterRecord.model_fields)
#: Adapter names and aliases follow the spec's name rule: 1-64 ASCII letters, digits, '.', '_', '-', starting
#: with a letter or digit. Versions are 1-9 ASCII digits (``str.isdigit`` would take '²' or '٣').
NAME_RE = re.compile(NAME_PATTERN.strip("^$"))
VERSION_RE = re.compile(r"[0-9]{1,9}")
STATUSES: tuple[str, ...] = get_args(Status)


def _shown(value: str) -> str:
    """``value`` for an error message: quoted, and cut when long (names are client-chosen)."""
    return repr(value) if len(value) <= 80 else f"{value[:40]!r}… ({len(value)} characters)"


def check_name(name: str) -> str:
    """``name`` if it is a valid adapter name, else raise with the rule."""
    if not NAME_RE.fullmatch(name):
        raise RegistryInputError(
            f"name {_shown(name)} is not valid. Fix: use 1-64 characters from ASCII letters, digits, '.', '_', '-', "
            "starting with a letter or digit (e.g. sentiment, qa-v2)."
        )
    return name


def check_alias(alias: str) -> str:
    """``alias`` if it is a valid alias (the name rule, and not only digits, which would read as a version)."""
    if not NAME_RE.fullmatch(alias) or alias.isdigit():
        raise RegistryInputError(
            f"alias {_shown(alias)} is not valid. Fix: use 1-64 characters from ASCII letters, digits, '.', '_', "
            "'-', starting with a letter or digit and not only digits (e.g. prod, staging)."
        )
    return alias


def check_status(status: str) -> str:
    """``status`` if it is one of the registry's statuses."""
    if status not in STATUSES:
        raise RegistryInputError(f"status {_shown(status)} is not a status. Fix: use one of {', '.join(STATUSES)}.")
    return status


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

    name: str
    version: int
    ok: bool
    detail: str
    path: str


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


def check_adapter_dir(adapter_dir: Path) -> dict:
    """Return adapter_config.json of a peft LoRA dir with safetensors weights, or raise with the reason."""
    d = Path(adapter_dir)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.exists():
        raise RegistryError(f"{d} is not a peft adapter dir: no adapter_config.json.")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise RegistryError(f"{d}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be registered.")
    if not (d / "adapter_model.safetensors").exists():
        pickled = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt")]
        why = f" (found pickled weights {pickled}, which are refused)" if pickled else ""
        raise RegistryError(f"{d}: no adapter_model.safetensors{why}. Fix: save with safe_serialization=True.")
    return cfg


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

    def _read(self, fn: Callable[[duckdb.DuckDBPyConnection], T], sandbox: bool = False) -> T:
        """Run ``fn`` on the latest snapshot, attached read-only in a fresh in-memory database; with ``sandbox``,
        that database can reach no file, extension or setting (for SQL written by users)."""
        for attempt in range(3):
            target = self._read_target()
            con = duckdb.connect(":memory:")
            try:
                if target is None:  # no registry yet: an empty one, in memory
                    _migrate(con, self.path)
                else:
                    self._attach(con, target)
                    if _check_version(con, self.path) < SCHEMA_VERSION and attempt < 2:
                        self._refresh(force=True)  # a snapshot of an older schema: migrate the file, publish again
                        continue
                if sandbox:
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
        cfg = check_adapter_dir(new.path)
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
                "path": stored_path(new.path, base),
                "adapter_sha256": sha,
                "size_bytes": size,
                "trainable_params": new.trainable_params,
                "metrics": json.dumps(new.metrics),
                "created_at": now,
                "run_id": new.run_id,
                "code_version": new.code_version,
            }
            con.execute(
                f"INSERT INTO adapters ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values())
            )
            _event(
                con,
                self.actor,
                "register" if new.status != "rejected" else "reject",
                new.name,
                version,
                {"sha256": sha, "status": new.status},
            )
            if new.status == "candidate" and new.promote != "manual":
                champion = _champion(con, new.name)
                why = _beats(new.metrics, champion, new.rank_metric) if new.promote == "if_better" else "always"
                if why:
                    _promote(con, self.actor, new.name, version, why)
                    row["status"] = "champion"
            return AdapterRecord.model_validate(
                {
                    **row,
                    "path": str(self.adapter_path(row["path"])),
                    "training_config": json.loads(row["training_config"]),
                    "metrics": new.metrics,
                }
            )

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
                row = con.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", [name, ref]).fetchone()
                if row is None:
                    raise AdapterNotFoundError(
                        f"adapter {name!r} has no alias {ref!r}. Fix: `lorafoundry registry show "
                        f"{name}` lists its aliases."
                    )
                v = row[0]
            elif ref is None:
                v = con.execute("SELECT max(version) FROM adapters WHERE name = ?", [name]).fetchone()[0]
            else:
                v = int(ref)
            row = con.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM adapters WHERE name = ? AND version = ?", [name, v]
            ).fetchone()
            if row is None:
                raise AdapterNotFoundError(
                    f"no adapter {name!r}" + (f" version {v}" if v else "") + " in the registry. "
                    "Fix: `lorafoundry registry list` shows what is there."
                )
            return _record(row, base)

        return self._read(op)

    def aliases(self, name: str) -> dict[str, int]:
        """The aliases of ``name`` and the versions they point to."""
        _, rows = self.query("SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", [name])
        return dict(rows)

    def alias_history(self, name: str) -> list[dict[str, Any]]:
        """Every change to the aliases of ``name``, oldest first."""
        cols, rows = self.query("SELECT * FROM alias_history WHERE name = ? ORDER BY changed_at, rowid", [name])
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def set_alias(self, name: str, alias: str, version: int | None) -> None:
        """Point ``name:alias`` at ``version`` (None removes the alias). `champion` moves only by promote."""
        check_name(name)
        check_alias(alias)
        if alias == "champion":
            raise RegistryError("`champion` is set by promotion. Fix: `lorafoundry registry promote NAME VERSION`.")

        def op(con: duckdb.DuckDBPyConnection) -> None:
            if version is not None:
                status = con.execute(
                    "SELECT status FROM adapters WHERE name = ? AND version = ?", [name, version]
                ).fetchone()
                if status is None:
                    raise AdapterNotFoundError(f"no adapter {name}@{version}.")
                if status[0] not in SERVABLE_STATUSES:
                    raise RegistryError(
                        f"{name}@{version} is {status[0]}; an alias can only point at a candidate or the champion."
                    )
            _set_alias(con, self.actor, name, alias, version)

        self._write(op)

    def archive(self, name: str, version: int) -> AdapterRecord:
        """Retire ``name@version``: status `archived`, never served; its aliases are removed (with history)."""

        def op(con: duckdb.DuckDBPyConnection) -> AdapterRecord:
            if con.execute("SELECT 1 FROM adapters WHERE name = ? AND version = ?", [name, version]).fetchone() is None:
                raise AdapterNotFoundError(f"no adapter {name}@{version}.")
            con.execute("UPDATE adapters SET status = 'archived' WHERE name = ? AND version = ?", [name, version])
            for (alias,) in con.execute(
                "SELECT alias FROM aliases WHERE name = ? AND version = ?", [name, version]
            ).fetchall():
                _set_alias(con, self.actor, name, alias, None)
            _event(con, self.actor, "archive", name, version, {})
            return _fetch_record(con, name, version, self.base_dir)

        return self._write(op)

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
            row = con.execute("SELECT status FROM adapters WHERE name = ? AND version = ?", [name, version]).fetchone()
            if row is None:
                raise AdapterNotFoundError(
                    f"no adapter {name}@{version}. Fix: `lorafoundry registry list` shows versions."
                )
            if row[0] not in SERVABLE_STATUSES:
                raise RegistryError(f"{name}@{version} is {row[0]} and cannot be promoted; only candidates can.")
            _promote(con, self.actor, name, version, reason)
            return _fetch_record(con, name, version, self.base_dir)

        return self._write(op)

    def leaderboard(self, name: str) -> list[dict[str, Any]]:
        """Every version of ``name`` ranked by its rank metric (best first; rejected and archived last), from
        the `leaderboard` view."""
        cols, rows = self.query("SELECT * FROM leaderboard WHERE name = ? ORDER BY rank", [name])
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def query(self, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
        """Run a read-only SQL statement; returns (column names, rows).

        It runs on the snapshot, attached read-only, in a database that can reach no file, extension or setting:
        it sees the registry's tables and views and nothing else (`COPY ... TO`, `read_text`, `ATTACH`,
        `INSTALL`/`LOAD` and `SET` are refused). Paths in `adapters.path` are as stored: relative to the
        registry's dir when inside it.
        """

        def op(con: duckdb.DuckDBPyConnection) -> tuple[list[str], list[tuple]]:
            cur = con.execute(sql, params or [])
            cols = [d[0] for d in cur.description] if cur.description else []
            return cols, cur.fetchall()

        try:
            return self._read(op, sandbox=True)
        except duckdb.Error as e:
            raise RegistryInputError(
                f"query failed: {e}\nFix: `registry sql` runs read-only queries on the tables adapters, aliases, "
                "alias_history, events and the views latest_adapters, champions, leaderboard; it cannot write, "
                "read or write files, attach databases, load extensions or change settings."
            ) from None

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


def _record(row: tuple, base: Path) -> AdapterRecord:
    """A row of `adapters` as a record; a relative ``path`` is resolved against ``base`` (the registry's dir)."""
    data = dict(zip(_COLUMNS, row, strict=True))
    if not Path(data["path"]).is_absolute():
        data["path"] = str(base / data["path"])
    data["training_config"] = json.loads(data["training_config"] or "{}")
    data["metrics"] = json.loads(data["metrics"] or "{}")
    return AdapterRecord.model_validate(data)


def _fetch_record(con: duckdb.DuckDBPyConnection, name: str, version: int, base: Path) -> AdapterRecord:
    row = con.execute(
        f"SELECT {', '.join(_COLUMNS)} FROM adapters WHERE name = ? AND version = ?", [name, version]
    ).fetchone()
    return _record(row, base)


def _reevaluate(con: duckdb.DuckDBPyConnection, actor: str, new: NewAdapter, version: int, base: Path) -> AdapterRecord:
    """The same bytes registered again. Without new metrics: the existing row (plus the base's hash and the new
    path when the row had no hash yet). With new metrics (a new evaluation): the version takes them, and the new
    gate outcome: a rejected version that now passes becomes a candidate (and the champion rule applies); a
    candidate or champion that now fails is rejected (a champion leaves its alias, so the name has no champion
    until another version earns it). Archived stays archived."""

    def current() -> AdapterRecord:
        return _fetch_record(con, new.name, version, base)

    rec = current()
    # the base's hash and the files' place, when the first registration could not record them (an import
    # before the base was on this machine): registering again with the base present is the fix the CLI names
    if rec.base_model_hash is None and new.base_model_hash is not None:
        con.execute(
            "UPDATE adapters SET base_model_hash = ?, path = ? WHERE name = ? AND version = ?",
            [new.base_model_hash, stored_path(new.path, base), new.name, version],
        )
        _event(con, actor, "update", new.name, version, {"base_model_hash": new.base_model_hash})
        rec = current()
    # only a new evaluation (metrics) can change the gate outcome: registering files again with no metrics
    # (e.g. `registry register`) never turns a rejected version into a candidate
    evaluated = bool(new.metrics)
    passes = new.status != "rejected"
    status_changes = evaluated and rec.status != "archived" and passes == (rec.status == "rejected")
    if not evaluated or (new.metrics == rec.metrics and not status_changes):
        return rec
    con.execute(
        "UPDATE adapters SET metrics = ? WHERE name = ? AND version = ?", [json.dumps(new.metrics), new.name, version]
    )
    status = rec.status
    if status_changes:
        status = "candidate" if passes else "rejected"
        con.execute("UPDATE adapters SET status = ? WHERE name = ? AND version = ?", [status, new.name, version])
        if rec.status == "champion":
            _set_alias(con, actor, new.name, "champion", None)
    _event(con, actor, "reevaluate", new.name, version, {"previous_status": rec.status, "status": status})
    if status == "candidate" and status_changes and new.promote != "manual":
        why = _beats(new.metrics, _champion(con, new.name), new.rank_metric) if new.promote == "if_better" else "always"
        if why:
            _promote(con, actor, new.name, version, why)
    return current()


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


def _promote(con: duckdb.DuckDBPyConnection, actor: str, name: str, version: int, reason: str) -> None:
    old = _champion(con, name)
    if old is not None and old[0] == version:
        return
    if old is not None:
        con.execute("UPDATE adapters SET status = 'candidate' WHERE name = ? AND version = ?", [name, old[0]])
    con.execute("UPDATE adapters SET status = 'champion' WHERE name = ? AND version = ?", [name, version])
    _set_alias(con, actor, name, "champion", version)
    _event(con, actor, "promote", name, version, {"reason": reason, "previous_champion": old[0] if old else None})


def _set_alias(con: duckdb.DuckDBPyConnection, actor: str, name: str, alias: str, version: int | None) -> None:
    prev = con.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", [name, alias]).fetchone()
    prev_version = prev[0] if prev else None
    if prev_version == version:
        return
    con.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", [name, alias])
    now = datetime.now(UTC).replace(tzinfo=None)
    if version is not None:
        con.execute("INSERT INTO aliases VALUES (?, ?, ?, ?)", [name, alias, version, now])
    con.execute("INSERT INTO alias_history VALUES (?, ?, ?, ?, ?, ?)", [now, actor, name, alias, version, prev_version])


def _metric_path(metric: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_]+", metric):
        raise RegistryError(f"metric {metric!r} is not a metric name. Fix: use e.g. exact_match, eval_loss.")
    return f'$."{metric}".adapter'


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """Split ``name``, ``name@VERSION`` or ``name:ALIAS`` into (name, version, alias)."""
    if "@" in ref:
        name, _, v = ref.partition("@")
        if not VERSION_RE.fullmatch(v):
            raise RegistryInputError(
                f"{_shown(ref)}: the version after '@' must be a number of 1-9 ASCII digits (0-9), e.g. {name[:64]}@2."
            )
        return check_name(name), int(v), None
    if ":" in ref:
        name, _, alias = ref.partition(":")
        return check_name(name), None, check_alias(alias)
    return check_name(ref), None, None


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
        raise RegistryError(
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
