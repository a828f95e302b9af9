"""The registry on Postgres, shared by several machines: the same tables, the same typed operations, and DuckDB SQL
for every read, with the guarantees of the local file (:mod:`registry.dbfile`) held by Postgres instead of a file
lock.

- Writers take turns on a transaction-scoped advisory lock (the counterpart of the file's ``flock``): each write is
  one Postgres transaction that takes the lock first, so versions stay gapless across machines and a promotion moves
  its alias and history atomically. A writer that dies mid-transaction (or whose connection drops) is rolled back
  by Postgres: the registry holds what it held before.
- Every write also bumps ``catalog_state.generation``. Readers never wait for writers (Postgres' MVCC): a reader
  asks for the generation and, when its machine has no snapshot of that generation yet, copies the tables in one
  read-only, repeatable-read transaction into a local DuckDB file, published by write-then-rename. Reads then
  attach that file read-only, exactly as they attach the local registry's snapshot: the views, the record
  decoding and the sandbox of `registry sql` are the same code, tested with the same hostile statements.
- The tables are the local schema's (:mod:`registry.schema`), translated column by column, so the two never
  disagree; Postgres keeps an insertion order (``seq``) for the two history tables, which DuckDB reads in order.

The URL names the server (``postgresql://USER@HOST:PORT/DB``); the password comes from ``PGPASSWORD`` or
``PGPASSFILE`` as for every libpq client, or from the URL, and no message ever shows it (:func:`mask_url`).
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from registry.dbfile import close_off, sql_string
from registry.errors import RegistryBusyError, RegistryInputError, RegistrySchemaError, RegistryUnavailableError
from registry.location import mask_url
from registry.schema import MIGRATIONS, SCHEMA_VERSION, TABLES, migrate

T = TypeVar("T")

#: The advisory lock writers take turns on (any constant: the registry's database holds nothing else).
_WRITER_LOCK = 0x10AF0DB

#: DuckDB column types -> Postgres. JSON is kept as text, as DuckDB hands it out, so records decode the same way.
_PG_TYPES = {"VARCHAR": "TEXT", "JSON": "TEXT", "VARCHAR[]": "TEXT[]", "INTEGER": "INTEGER", "BIGINT": "BIGINT"}
_PG_TYPES |= {"TIMESTAMP": "TIMESTAMP", "DOUBLE": "DOUBLE PRECISION", "BOOLEAN": "BOOLEAN"}

#: Tables whose rows are read in the order they were written (events and histories have no key).
_ORDERED = ("events", "alias_history")


def _schema(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[str, str, bool]]]:
    """The local schema's tables: table -> [(column, DuckDB type, not null)] in column order."""
    rows = con.execute(
        "SELECT table_name, column_name, data_type, NOT is_nullable FROM duckdb_columns() "
        "WHERE table_name IN (SELECT unnest(?::VARCHAR[])) AND NOT internal ORDER BY table_name, column_index",
        [list(TABLES)],
    ).fetchall()
    out: dict[str, list[tuple[str, str, bool]]] = {t: [] for t in TABLES}
    for table, column, dtype, not_null in rows:
        out[table].append((column, dtype, not_null))
    return out


def _primary_keys(con: duckdb.DuckDBPyConnection) -> dict[str, list[str]]:
    rows = con.execute(
        "SELECT table_name, constraint_column_names FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY'"
    ).fetchall()
    return {table: list(columns) for table, columns in rows if table in TABLES}


def postgres_ddl() -> list[str]:
    """CREATE TABLE statements for Postgres, translated from the local schema at :data:`SCHEMA_VERSION`."""
    con = duckdb.connect(":memory:")
    try:
        migrate(con, Path(":memory:"))
        tables, keys = _schema(con), _primary_keys(con)
    finally:
        con.close()
    ddl = []
    for table, columns in tables.items():
        cols = [f"{name} {_PG_TYPES[dtype]}{' NOT NULL' if not_null else ''}" for name, dtype, not_null in columns]
        if table in _ORDERED:
            cols.append("seq BIGSERIAL")  # last, so the registry's positional INSERTs leave it to its default
        if table in keys:
            cols.append(f"PRIMARY KEY ({', '.join(keys[table])})")
        ddl.append(f"CREATE TABLE {table} ({', '.join(cols)})")
    return ddl


class _Connection:
    """A psycopg connection that takes the registry's DuckDB-style calls: ``execute(sql, params)`` with ``?``
    placeholders, returning a cursor with ``fetchone``/``fetchall``/``description``."""

    def __init__(self, con: Any) -> None:
        self._con = con

    def execute(self, sql: str, params: list | tuple | None = None) -> Any:
        return self._con.execute(sql.replace("%", "%%").replace("?", "%s"), params or None)


@dataclass(frozen=True)
class SharedRegistry:
    """A registry in a Postgres database, with :class:`registry.dbfile.RegistryFile`'s ``write``/``read``.

    Args:
        url: ``postgresql://USER@HOST:PORT/DATABASE``.
        max_wait_s: how long a writer waits for its turn; also how long a connection attempt may take.
        snapshots: the local dir of this machine's snapshots (default: a per-user dir under the temp dir).
    """

    url: str
    max_wait_s: float
    snapshots: Path | None = None

    def __post_init__(self) -> None:
        if mask_url(self.url) != self.url:
            raise RegistryInputError(
                f"the registry URL {mask_url(self.url)} carries a password. Fix: leave it out of the URL and put it "
                "in PGPASSWORD or a PGPASSFILE (~/.pgpass), where libpq reads it: a URL shows in logs, process lists "
                "and Dagster's UI."
            )

    @property
    def shown(self) -> str:
        return mask_url(self.url)

    # -- writes ---------------------------------------------------------------------------------------------

    def write(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn`` in one Postgres transaction, in this writer's turn (the advisory lock), and bump the
        generation; an error anywhere rolls the whole transaction back."""
        import psycopg

        with self._connect() as con:
            try:
                con.execute(f"SET lock_timeout = '{int(self.max_wait_s * 1000)}ms'")
                con.execute("SELECT pg_advisory_xact_lock(%s)", [_WRITER_LOCK])
                self._ensure_schema(con)
                out = fn(_Connection(con))
                con.execute("UPDATE catalog_state SET generation = generation + 1")
                con.commit()
                return out
            except psycopg.errors.LockNotAvailable:
                raise RegistryBusyError(
                    f"registry {self.shown}: another writer kept it for {self.max_wait_s:.0f} s. Fix: retry when it "
                    "is done (a long `registry import`?)."
                ) from None
            except psycopg.OperationalError as e:
                raise self._unavailable(e) from None

    def _ensure_schema(self, con: Any) -> None:
        """Create the tables on first use (in the writer's turn); refuse a schema this lorafoundry does not know."""
        exists = con.execute("SELECT to_regclass('catalog_state') IS NOT NULL").fetchone()[0]
        if not exists:
            for statement in postgres_ddl():
                con.execute(statement)
            con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT, applied_at TIMESTAMP)")
            for number, name, _ in MIGRATIONS:
                con.execute("INSERT INTO schema_migrations VALUES (%s, %s, now())", [number, name])
            con.execute("CREATE TABLE catalog_state (generation BIGINT NOT NULL)")
            con.execute("INSERT INTO catalog_state VALUES (0)")
            return
        version = con.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
        if version != SCHEMA_VERSION:
            newer = version > SCHEMA_VERSION
            raise RegistrySchemaError(
                f"registry {self.shown} has schema version {version}; this lorafoundry writes version "
                f"{SCHEMA_VERSION}. Fix: "
                + ("upgrade lorafoundry on this machine." if newer else "upgrade the machine that created it first.")
            )

    # -- reads ----------------------------------------------------------------------------------------------

    def read(self, fn: Callable[[duckdb.DuckDBPyConnection], T], sandbox: dict[str, str] | None = None) -> T:
        """Run ``fn`` on this machine's snapshot of the current generation, attached read-only in a fresh
        in-memory database (closed off for SQL written by users when ``sandbox`` is given)."""
        target = self.snapshot()
        con = duckdb.connect(":memory:")
        try:
            con.execute(f"ATTACH {sql_string(str(target))} AS registry (READ_ONLY)")
            con.execute("USE registry")
            if sandbox is not None:
                close_off(con, sandbox)
            con.execute("BEGIN TRANSACTION")
            return fn(con)
        finally:
            con.close()

    def snapshot(self) -> Path:
        """The local DuckDB copy of the registry as it is now: the one already made for the current generation,
        else a new one copied in one read-only transaction and published by rename."""
        import psycopg

        folder = self.snapshot_dir
        try:
            with self._connect() as con:
                con.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                exists = con.execute("SELECT to_regclass('catalog_state') IS NOT NULL").fetchone()[0]
                generation = con.execute("SELECT generation FROM catalog_state").fetchone()[0] if exists else -1
                path = folder / f"generation-{generation}.duckdb"
                if not path.exists():
                    self._copy(con if exists else None, path)
                    self._forget_older(folder, generation)
                return path
        except psycopg.OperationalError as e:
            raise self._unavailable(e) from None

    def _copy(self, con: Any, dest: Path) -> None:
        """Write the tables read on ``con`` (None: an empty registry) into a new DuckDB file at ``dest``."""
        tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{random.getrandbits(32):08x}")
        out = duckdb.connect(str(tmp))
        try:
            migrate(out, tmp)
            if con is not None:
                for table, columns in _schema(out).items():
                    names = [c for c, _, _ in columns]
                    order = "seq" if table in _ORDERED else ", ".join(names[:2])
                    rows = con.execute(f"SELECT {', '.join(names)} FROM {table} ORDER BY {order}").fetchall()
                    _insert_rows(out, table, names, rows)
            out.execute("CHECKPOINT")
            out.close()
            os.replace(tmp, dest)
        finally:
            out.close()
            tmp.unlink(missing_ok=True)
            tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)

    @staticmethod
    def _forget_older(folder: Path, generation: int) -> None:
        """Remove snapshots two or more generations old (a reader may still have the previous one attached; on
        POSIX an unlinked file stays readable by whoever has it open)."""
        for old in folder.glob("generation-*.duckdb"):
            number = old.name.removeprefix("generation-").removesuffix(".duckdb")
            if number.lstrip("-").isdigit() and int(number) < generation - 1:
                old.unlink(missing_ok=True)

    @property
    def snapshot_dir(self) -> Path:
        """This machine's snapshots of this registry: one dir per URL (its password left out), only this user's."""
        key = hashlib.sha256(self.shown.encode()).hexdigest()[:16]
        root = self.snapshots or Path(tempfile.gettempdir()) / f"lorafoundry-{os.geteuid()}" / "registries"
        folder = root / key
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = folder.stat()
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise RegistryUnavailableError(
                f"the snapshot dir {folder} of registry {self.shown} belongs to another user or others may write "
                "to it. Fix: remove it (it is a cache), or pass another dir."
            )
        return folder

    # -- connections ----------------------------------------------------------------------------------------

    @contextmanager
    def _connect(self) -> Iterator[Any]:
        import psycopg

        try:
            con = psycopg.connect(self.url, connect_timeout=max(1, int(self.max_wait_s)))
        except psycopg.OperationalError as e:
            raise self._unavailable(e) from None
        try:
            yield con
        finally:
            con.close()

    def _unavailable(self, error: Exception) -> RegistryUnavailableError:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if self.url != self.shown:
            detail = detail.replace(self.url, self.shown)
        return RegistryUnavailableError(
            f"the shared registry at {self.shown} is unavailable: {detail}. Fix: check that the server is up and "
            "that this machine may reach it (the URL, PGPASSWORD or PGPASSFILE); nothing was changed."
        )


def _insert_rows(con: duckdb.DuckDBPyConnection, table: str, names: list[str], rows: list[tuple]) -> None:
    """Insert ``rows`` into ``table`` in statements of up to 200 rows (one statement per row is far slower)."""
    one = "(" + ", ".join("?" * len(names)) + ")"
    for start in range(0, len(rows), 200):
        chunk = rows[start : start + 200]
        values = [v for row in chunk for v in row]
        con.execute(f"INSERT INTO {table} ({', '.join(names)}) VALUES {', '.join([one] * len(chunk))}", values)
