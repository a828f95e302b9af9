"""The registry file's protocol: who opens the DuckDB file when, so that writers take turns and readers never wait.

DuckDB lets one process at a time open a file read-write, and no other process can open it meanwhile, not even
read-only. So writers and readers never share the file:

- writers take turns on an OS lock (``flock``) on ``<file>.lock``; the holder opens the file read-write, does its
  work in one transaction, checkpoints, closes, and publishes a copy, ``<file>.snapshot``, by write-then-rename;
- readers attach the latest snapshot read-only. It is never written in place (only replaced), so no reader waits
  on a writer and no writer waits on a reader. A snapshot older than the file (a writer killed before publishing,
  the file changed by another program) is republished by the next reader that finds no writer at work.

The file is created and migrated (:mod:`registry.schema`) by whoever opens it first. Never hold a connection open.
"""

from __future__ import annotations

import fcntl
import glob
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import duckdb

from registry.errors import RegistryBusyError, RegistryCorruptError, RegistryError
from registry.schema import SCHEMA_VERSION, check_version, migrate

T = TypeVar("T")


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


def sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class RegistryFile:
    """The registry's DuckDB file, its snapshot and its writer lock.

    Args:
        path: the DuckDB file (created and migrated on first use).
        max_wait_s: how long a writer waits for its turn (another writer, or another program holding the file).
    """

    path: Path
    max_wait_s: float

    @property
    def snapshot_path(self) -> Path:
        """The read-only copy readers attach (replaced by rename after every write)."""
        return self.path.with_name(self.path.name + ".snapshot")

    def write(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
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

    def read(self, fn: Callable[[duckdb.DuckDBPyConnection], T], sandbox: dict[str, str] | None = None) -> T:
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
                    if check_version(con, self.path) < SCHEMA_VERSION and attempt < 2:
                        self._refresh(force=True)  # a snapshot of an older schema: migrate the file, publish again
                        continue
                if sandbox is not None:
                    close_off(con, sandbox)
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
            migrate(con, self.path)
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
                con.execute(f"ATTACH {sql_string(str(target))} AS registry (READ_ONLY)")
                con.execute("USE registry")
                return
            except duckdb.Error as e:
                if not isinstance(_file_error(target, e), RegistryBusyError) or time.monotonic() >= deadline:
                    raise
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)


def close_off(con: duckdb.DuckDBPyConnection, settings: dict[str, str]) -> None:
    """Take ``settings`` (its memory limit, ...), then close the database off: no file, extension or setting can be
    reached from it any more (for SQL written by users, on a registry attached read-only)."""
    for name, value in settings.items():
        con.execute(f"SET {name} = {sql_string(value)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


_EMPTY: list[tempfile.TemporaryDirectory] = []  # kept alive for the process; removed at exit


def _empty_registry() -> Path:
    """A registry file with the current schema and no rows, made once per process, for reading a registry that
    does not exist yet: attached read-only like a real one, so `registry sql` refuses writes there too."""
    if not _EMPTY:
        scratch = tempfile.TemporaryDirectory(prefix="lorafoundry-empty-registry-")
        con = duckdb.connect(str(Path(scratch.name) / "empty.duckdb"))
        try:
            migrate(con, Path(scratch.name) / "empty.duckdb")
        finally:
            con.close()
        _EMPTY.append(scratch)
    return Path(_EMPTY[0].name) / "empty.duckdb"
