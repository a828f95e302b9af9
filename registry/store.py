"""The adapter registry's repository: :class:`AdapterRegistry`, typed operations on the registry file (register,
list, get, aliases, promote, archive, events, read-only SQL, export and import rows), each in one transaction.

Who opens the file when is :mod:`registry.dbfile`'s; the tables are :mod:`registry.schema`'s; when a version becomes
the champion is :mod:`registry.promotion`'s; the records are :mod:`registry.records`'. Adapter paths inside the
registry file's dir (the home) are stored relative to it, so a home can be moved, copied or restored and keep
serving; records always carry the absolute path.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from registry.adapter_files import check_adapter_files
from registry.dbfile import RegistryFile, sql_string
from registry.errors import AdapterNotFoundError, RegistryConflictError, RegistryInputError
from registry.location import is_object_url, is_shared, mask_url
from registry.objects import AdapterStore
from registry.promotion import (
    Champion,
    KeepChampion,
    Promote,
    decide_promotion,
    served_versions,
    status_after_evaluation,
)
from registry.records import (
    COLUMNS,
    AdapterRecord,
    NewAdapter,
    VerifyResult,
    adapter_sha256,
    new_row,
    to_record,
)
from registry.rules import SERVABLE_STATUSES, VERSION_RE, check_alias, check_name, check_status, parse_ref
from registry.schema import TABLES, current_version, stored_path
from registry.shared import SharedRegistry

log = logging.getLogger(__name__)


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


def check_adapter_dir(adapter_dir: Path, base_model: str | None = None, values: bool = True) -> dict:
    """Return adapter_config.json of a peft LoRA dir whose safetensors weights fit it (and ``base_model``'s weights,
    when that is a local model dir) and, unless ``values`` is False, hold no NaN or infinity; or raise
    :class:`RegistryInputError` with the reason; see :func:`registry.adapter_files.check_adapter_files`."""
    return check_adapter_files(Path(adapter_dir), base_model, values=values)


class AdapterRegistry:
    """Typed access to the registry: a local file, or a Postgres database that several machines share. Every
    method opens, works in one transaction, and closes.

    Args:
        path: the DuckDB file (created and migrated on first use), or a shared registry's
            ``postgresql://USER@HOST:PORT/DATABASE`` URL (:mod:`registry.shared`; its tables made on first write).
        max_wait_s: how long a writer waits for its turn (another writer, or another program holding the file).
        actor: who is acting, recorded in the events log.
        store: the adapter store, ``s3://BUCKET/PREFIX`` (:mod:`registry.objects`): registering puts the adapter's
            files there, by sha256, before its row commits, and the row points at them. None: rows point at the
            adapter dir on this machine (or a filesystem every machine mounts).
    """

    def __init__(
        self, path: Path | str, max_wait_s: float = 60.0, actor: str = "lorafoundry", store: str | None = None
    ) -> None:
        self.shared = is_shared(path)
        self.path: Path | str = path if self.shared else Path(path)
        self.max_wait_s = max_wait_s
        self.actor = actor
        self.store = AdapterStore(store) if store else None

    @property
    def file(self) -> RegistryFile | SharedRegistry:
        """Where the rows live and how writers take turns: the file, its snapshot and its writer lock
        (:mod:`registry.dbfile`), or the shared database (:mod:`registry.shared`)."""
        if isinstance(self.path, str):
            return SharedRegistry(self.path, self.max_wait_s)
        return RegistryFile(self.path, self.max_wait_s)

    @property
    def shown(self) -> str:
        """The registry as messages name it: the file, or the URL with its password masked."""
        return mask_url(self.path) if isinstance(self.path, str) else str(self.path)

    @property
    def base_dir(self) -> Path | None:
        """The dir that relative adapter paths are stored against: the registry file's (the home, by default);
        None for a shared registry, which stores absolute paths only."""
        return None if isinstance(self.path, str) else self.path.resolve().parent

    def adapter_path(self, stored: str) -> Path:
        """The absolute adapter dir of a stored ``path`` value."""
        p = Path(stored)
        return p if p.is_absolute() or self.base_dir is None else self.base_dir / p

    def stored_path(self, adapter_dir: Path | str) -> str:
        """How ``adapter_dir`` is stored in this registry (relative to :attr:`base_dir` when inside it)."""
        return stored_path(adapter_dir, self.base_dir)

    # -- operations --------------------------------------------------------------------------------------

    def register(self, new: NewAdapter) -> AdapterRecord:
        """Register an adapter dir. The same sha256 under the same name is that version again: nothing new is
        written unless its evaluation changed (a new gate, a new eval), which updates its metrics and status.
        Files vLLM could not serve are refused (:func:`check_adapter_dir`), and NaN or infinite weights unless the
        version is registered ``rejected``."""
        check_name(new.name)
        # a version that failed its gate is kept for its lineage whatever its values (a diverged run's usual fate);
        # one that may be served must hold no NaN or infinity
        cfg = check_adapter_dir(new.path, new.base_model, values=new.status != "rejected")
        sha, size = adapter_sha256(new.path)
        now = datetime.now(UTC).replace(tzinfo=None)
        base = self.base_dir
        marker = None
        if self.store is not None:  # the files first, whole; the row that points at them after
            self.remove_store_orphans()
            marker = self.store.begin_upload(new.path, sha)
            where = self.store.object_url(sha)
        else:
            where = stored_path(new.path, base)

        def op(con: duckdb.DuckDBPyConnection) -> AdapterRecord:
            # one round trip: the version with these bytes, if any, and the next free version of the name
            same, version = con.execute(
                "SELECT max(version) FILTER (WHERE adapter_sha256 = ?), coalesce(max(version), 0) + 1 "
                "FROM adapters WHERE name = ?",
                [sha, new.name],
            ).fetchone()
            if same is not None:
                return _reevaluate(con, self.actor, new, same, base, where)
            row = new_row(new, cfg, version, sha, size, now, where)
            _insert(con, "adapters", row)
            action = "register" if new.status != "rejected" else "reject"
            _event(con, self.actor, action, new.name, version, {"sha256": sha, "status": new.status})
            if new.status == "candidate" and _apply_promote_rule(con, self.actor, new, version):
                row["status"] = "champion"
            return to_record(tuple(row[c] for c in COLUMNS), base)

        record = self.file.write(op)
        if marker is not None:  # kept when the write failed: the next writer removes what it put
            self.store.end_upload(marker)
        return record

    def remove_store_orphans(self) -> None:
        """Remove the store's objects of uploads interrupted before their row committed (registry/objects.py);
        the registry is read only when a stale upload marker exists."""
        if self.store is not None and self.store.stale_uploads():
            _, rows = self.query("SELECT DISTINCT adapter_sha256 FROM adapters")
            removed = self.store.remove_orphans({sha for (sha,) in rows})
            if removed:
                log.warning("removed the objects of %d interrupted upload(s) from %s", len(removed), self.store.url)

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
            name, status, base_model: equality filters.
            dataset: the dataset it was trained on, alone or as one source of a mixture (``a+b``).
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
        for column, value in (("name", name), ("status", status), ("base_model", base_model)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if dataset is not None:  # a mixture is recorded as its sources joined by '+', which no dataset name holds
            where.append("position(? IN '+' || dataset || '+') > 0")
            args.append(f"+{dataset}+")
        for bounds, op in ((min_metric or {}, ">="), (max_metric or {}, "<=")):
            for metric, bound in bounds.items():
                where.append(f"CAST(json_extract(metrics, ?) AS DOUBLE) {op} ?")
                args += [_metric_path(metric), bound]
        sql = f"SELECT {', '.join(COLUMNS)} FROM {table}"
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
        return self.file.read(lambda con: [to_record(r, base) for r in con.execute(sql, args).fetchall()])

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

        return self.file.read(op)

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

        self.file.write(op)

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

        return self.file.write(op)

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

        self.file.write(op)

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
                if is_object_url(rec.path):
                    problem = self._object_store(rec.path).check(rec.path, rec.adapter_sha256)
                    ok, detail = problem is None, problem or "ok"
                else:
                    sha, _ = adapter_sha256(Path(rec.path))
                    ok = sha == rec.adapter_sha256
                    detail = (
                        "ok" if ok else f"sha256 {sha[:16]}… differs from the registered {rec.adapter_sha256[:16]}…"
                    )
            except OSError as e:
                ok, detail = False, f"cannot read the adapter files: {e}"
            results.append(VerifyResult(name=rec.name, version=rec.version, ok=ok, detail=detail, path=rec.path))
        return results

    def servable(self, verify: bool = False) -> list[AdapterRecord]:
        """The version served under each name: its champion, else its latest candidate (never a rejected or
        archived one). With ``verify``, a version whose files no longer match its sha256 is left out."""
        chosen = served_versions(self.list())
        if verify:
            bad = {(v.name, v.version): v.detail for r in chosen for v in self.verify(r.name, r.version) if not v.ok}
            for (name, version), detail in bad.items():
                log.warning("not serving %s@%s: %s (run `lorafoundry registry verify`)", name, version, detail)
            return [r for r in chosen if (r.name, r.version) not in bad]
        return chosen

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

        return self.file.write(op)

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
            return self.file.read(lambda con: _run_limited(con, sql, params or [], timeout_s, memory_limit), settings)
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
        return self.file.read(lambda con: con.execute(sql, [after] if after else []).fetchall())

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
                con.execute(f"COPY ({sql}) TO {sql_string(str(dest / (table + '.parquet')))} (FORMAT parquet)")
                counts[table] = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            rows = con.execute("SELECT name, version, path FROM adapters").fetchall()
            return [(name, version, self.adapter_path(path)) for name, version, path in rows]

        sources = self.file.read(op)
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

        self.file.write(op)
        return imported

    def paths_in_use(self) -> set[Path]:
        """Every registered version's adapter dir, read from the file itself in a writer's turn (so a version
        whose writer was killed before publishing the snapshot counts too)."""
        rows = self.file.write(lambda con: con.execute("SELECT path FROM adapters").fetchall())
        return {self.adapter_path(p).resolve() for (p,) in rows if not is_object_url(p)}

    def _object_store(self, url: str) -> AdapterStore:
        """The store holding the object ``url``: this registry's, or (reading a row another machine wrote with
        another prefix) one for that URL's bucket and prefix."""
        if self.store is not None and url.rsplit("/", 1)[0] == self.store.object_url(""):
            return self.store
        return AdapterStore(url.rsplit("/", 1)[0])

    def init(self) -> None:
        """Create the file if needed and apply pending migrations."""
        self.file.write(lambda con: None)

    def schema_version(self) -> int:
        return self.file.read(current_version)


def _find_record(
    con: duckdb.DuckDBPyConnection, name: str, version: int | None, base: Path | None
) -> AdapterRecord | None:
    """``name@version`` as a record, or None when there is no such version."""
    row = con.execute(
        f"SELECT {', '.join(COLUMNS)} FROM adapters WHERE name = ? AND version = ?", [name, version]
    ).fetchone()
    return None if row is None else to_record(row, base)


def _fetch_record(con: duckdb.DuckDBPyConnection, name: str, version: int, base: Path | None) -> AdapterRecord:
    """``name@version`` as a record; the caller knows it exists (it just wrote or checked it)."""
    rec = _find_record(con, name, version, base)
    assert rec is not None, f"{name}@{version} vanished inside its own transaction"
    return rec


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


def _reevaluate(
    con: duckdb.DuckDBPyConnection, actor: str, new: NewAdapter, version: int, base: Path | None, where: str
) -> AdapterRecord:
    """The same bytes registered again. Without new metrics: the existing row (plus the base's hash and the new
    path when the row had no hash yet). With new metrics (a new evaluation): the version takes them, and the status
    of the new gate outcome (:func:`registry.promotion.status_after_evaluation`)."""
    rec = _fetch_record(con, new.name, version, base)
    # the base's hash and the files' place, when the first registration could not record them (an import
    # before the base was on this machine): registering again with the base present is the fix the CLI names
    if rec.base_model_hash is None and new.base_model_hash is not None:
        _set_column(con, new.name, version, base_model_hash=new.base_model_hash, path=where)
        _event(con, actor, "update", new.name, version, {"base_model_hash": new.base_model_hash})
        rec = _fetch_record(con, new.name, version, base)
    # only a new evaluation (metrics) can change the gate outcome: registering files again with no metrics
    # (e.g. `registry register`) never turns a rejected version into a candidate
    if not new.metrics:
        return rec
    status = status_after_evaluation(rec.status, passes=new.status != "rejected")
    if new.metrics == rec.metrics and status == rec.status:
        return rec
    _set_column(con, new.name, version, metrics=json.dumps(new.metrics))
    if status != rec.status:
        _set_column(con, new.name, version, status=status)
        if rec.status == "champion":
            _set_alias(con, actor, new.name, "champion", None)
    _event(con, actor, "reevaluate", new.name, version, {"previous_status": rec.status, "status": status})
    if status == "candidate" and status != rec.status:
        _apply_promote_rule(con, actor, new, version)
    return _fetch_record(con, new.name, version, base)


def _apply_promote_rule(con: duckdb.DuckDBPyConnection, actor: str, new: NewAdapter, version: int) -> bool:
    """Make the candidate ``new.name@version`` the champion when ``new.promote`` decides so
    (:func:`registry.promotion.decide_promotion`); a refusal on evidence is an event with its reason. Returns
    whether it was promoted."""
    if new.promote == "manual":  # nothing to decide: spare the champion's lookup
        return False
    champion = _champion(con, new.name)
    decision = decide_promotion(new.promote, version, new.metrics, new.rank_metric, new.evidence, champion)
    if isinstance(decision, KeepChampion):
        detail = {"reason": decision.reason, "evidence": decision.evidence}
        _event(con, actor, "keep_champion", new.name, version, detail)
    elif isinstance(decision, Promote):
        _promote(con, actor, new.name, version, decision.reason, decision.evidence)
    return isinstance(decision, Promote)


def _champion(con: duckdb.DuckDBPyConnection, name: str) -> Champion | None:
    """The champion of ``name``, or None."""
    row = con.execute("SELECT version, metrics FROM adapters WHERE name = ? AND status = 'champion'", [name]).fetchone()
    return Champion(row[0], json.loads(row[1] or "{}")) if row else None


def _promote(
    con: duckdb.DuckDBPyConnection, actor: str, name: str, version: int, reason: str, evidence: dict | None = None
) -> None:
    """Make ``name@version`` the champion: the previous one becomes a candidate; the `champion` alias moves."""
    old = _champion(con, name)
    if old is not None and old.version == version:
        return
    if old is not None:
        _set_column(con, name, old.version, status="candidate")
    _set_column(con, name, version, status="champion")
    _set_alias(con, actor, name, "champion", version)
    detail = {"reason": reason, "previous_champion": old.version if old else None}
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
