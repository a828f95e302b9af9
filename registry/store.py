"""The adapter registry: one DuckDB file, numbered migrations, a typed repository class.

DuckDB lets one process at a time open a file read-write, and a second process cannot open it at all while
that lasts. So every operation opens the file, does its work in one transaction and closes it, and a lock
error is retried with backoff and jitter up to a bounded total wait. Never hold a connection open.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import duckdb
from pydantic import BaseModel, ConfigDict, Field

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


#: Numbered migrations, applied in order on open. Append only; never edit a released one.
MIGRATIONS: list[tuple[int, str, Callable[[duckdb.DuckDBPyConnection], None]]] = [
    (1, "initial schema: adapters, events, latest_adapters", _m001_initial),
    (2, "views: champions, leaderboard", _m002_champions_leaderboard),
    (3, "aliases with history", _m003_aliases),
]
LOWER_IS_BETTER = {"eval_loss", "perplexity"}
SCHEMA_VERSION = MIGRATIONS[-1][0]


class RegistryError(RuntimeError):
    """A registry operation that cannot succeed (newer schema, lock wait exhausted, bad adapter dir)."""


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
ALIAS_RE = re.compile(r"[A-Za-z0-9._-]+")


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
        max_wait_s: total time to keep retrying when another process holds the file's lock.
        actor: who is acting, recorded in the events log.
    """

    def __init__(self, path: Path | str, max_wait_s: float = 60.0, actor: str = "lorafoundry") -> None:
        self.path = Path(path)
        self.max_wait_s = max_wait_s
        self.actor = actor
        self._migrated = False

    # -- connection handling ----------------------------------------------------------------------------

    def _with_retry(self, fn: Callable[[duckdb.DuckDBPyConnection], T], read_only: bool = False) -> T:
        deadline = time.monotonic() + self.max_wait_s
        delay = 0.01
        while True:
            try:
                if read_only and not self.path.exists():
                    con = duckdb.connect(":memory:")
                    _migrate(con, self.path)
                elif not self.path.exists():
                    con = self._create()
                else:
                    con = duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.IOException as e:
                if "lock" not in str(e).lower() or time.monotonic() >= deadline:
                    raise RegistryError(
                        f"registry {self.path} stayed locked by another process for "
                        f"{self.max_wait_s:.0f} s ({e}). Fix: retry when the other writer is done."
                    ) from e
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)
                continue
            try:
                if not read_only and not self._migrated:
                    _migrate(con, self.path)
                    self._migrated = True
                elif read_only and _check_version(con, self.path) < SCHEMA_VERSION:
                    con.close()
                    self._with_retry(lambda c: None)  # an older file: migrate it once, read-write
                    return self._with_retry(fn, read_only=True)
                con.execute("BEGIN TRANSACTION")
                try:
                    out = fn(con)
                    con.execute("COMMIT")
                    return out
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
            finally:
                con.close()

    def _create(self) -> duckdb.DuckDBPyConnection:
        """Open a file that may not exist yet. Two processes creating the same new file at the same moment
        can each get a database of their own (DuckDB's lock is taken after the file is created), so creation
        is serialized with an OS lock on a sidecar file."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".create-lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return duckdb.connect(str(self.path))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- operations --------------------------------------------------------------------------------------

    def register(self, new: NewAdapter) -> AdapterRecord:
        """Register an adapter dir. The same sha256 under the same name is that version again: nothing new is
        written unless its evaluation changed (a new gate, a new eval), which updates its metrics and status."""
        cfg = check_adapter_dir(new.path)
        sha, size = adapter_sha256(new.path)
        now = datetime.now(UTC).replace(tzinfo=None)

        def op(con: duckdb.DuckDBPyConnection) -> AdapterRecord:
            # one round trip: the version with these bytes, if any, and the next free version of the name
            same, version = con.execute(
                "SELECT max(version) FILTER (WHERE adapter_sha256 = ?), coalesce(max(version), 0) + 1 "
                "FROM adapters WHERE name = ?",
                [sha, new.name],
            ).fetchone()
            if same is not None:
                return _reevaluate(con, self.actor, new, same)
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
                "path": str(Path(new.path).resolve()),
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
                {**row, "training_config": json.loads(row["training_config"]), "metrics": new.metrics}
            )

        return self._with_retry(op)

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
        return self._with_retry(lambda con: [_record(r) for r in con.execute(sql, args).fetchall()], read_only=True)

    def get(self, name: str, version: int | str | None = None) -> AdapterRecord:
        """One version of an adapter: by number, by alias (``"champion"``), or the latest when None.

        ``name`` may also carry the reference itself: ``name@3`` or ``name:champion``.
        """
        name, ref_version, ref_alias = parse_ref(name)
        ref = version if version is not None else (ref_version if ref_version is not None else ref_alias)

        def op(con: duckdb.DuckDBPyConnection) -> AdapterRecord:
            if isinstance(ref, str) and not ref.isdigit():
                row = con.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", [name, ref]).fetchone()
                if row is None:
                    raise RegistryError(
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
                raise RegistryError(
                    f"no adapter {name!r}" + (f" version {v}" if v else "") + " in the registry. "
                    "Fix: `lorafoundry registry list` shows what is there."
                )
            return _record(row)

        return self._with_retry(op, read_only=True)

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
        if not ALIAS_RE.fullmatch(alias) or alias.isdigit():
            raise RegistryError(
                f"alias {alias!r} is not valid. Fix: use letters, digits, '.', '_' or '-', not "
                "only digits (e.g. prod, staging)."
            )
        if alias == "champion":
            raise RegistryError("`champion` is set by promotion. Fix: `lorafoundry registry promote NAME VERSION`.")

        def op(con: duckdb.DuckDBPyConnection) -> None:
            if version is not None:
                status = con.execute(
                    "SELECT status FROM adapters WHERE name = ? AND version = ?", [name, version]
                ).fetchone()
                if status is None:
                    raise RegistryError(f"no adapter {name}@{version}.")
                if status[0] not in SERVABLE_STATUSES:
                    raise RegistryError(
                        f"{name}@{version} is {status[0]}; an alias can only point at a candidate or the champion."
                    )
            _set_alias(con, self.actor, name, alias, version)

        self._with_retry(op)

    def archive(self, name: str, version: int) -> AdapterRecord:
        """Retire ``name@version``: status `archived`, never served; its aliases are removed (with history)."""

        def op(con: duckdb.DuckDBPyConnection) -> AdapterRecord:
            if con.execute("SELECT 1 FROM adapters WHERE name = ? AND version = ?", [name, version]).fetchone() is None:
                raise RegistryError(f"no adapter {name}@{version}.")
            con.execute("UPDATE adapters SET status = 'archived' WHERE name = ? AND version = ?", [name, version])
            for (alias,) in con.execute(
                "SELECT alias FROM aliases WHERE name = ? AND version = ?", [name, version]
            ).fetchall():
                _set_alias(con, self.actor, name, alias, None)
            _event(con, self.actor, "archive", name, version, {})
            return _record(
                con.execute(
                    f"SELECT {', '.join(_COLUMNS)} FROM adapters WHERE name = ? AND version = ?", [name, version]
                ).fetchone()
            )

        return self._with_retry(op)

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
                raise RegistryError(f"no adapter {name}@{version}. Fix: `lorafoundry registry list` shows versions.")
            if row[0] not in SERVABLE_STATUSES:
                raise RegistryError(f"{name}@{version} is {row[0]} and cannot be promoted; only candidates can.")
            _promote(con, self.actor, name, version, reason)
            return _record(
                con.execute(
                    f"SELECT {', '.join(_COLUMNS)} FROM adapters WHERE name = ? AND version = ?", [name, version]
                ).fetchone()
            )

        return self._with_retry(op)

    def leaderboard(self, name: str) -> list[dict[str, Any]]:
        """Every version of ``name`` ranked by its rank metric (best first; rejected and archived last), from
        the `leaderboard` view."""
        cols, rows = self.query("SELECT * FROM leaderboard WHERE name = ? ORDER BY rank", [name])
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def query(self, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
        """Run a read-only SQL statement; returns (column names, rows)."""

        def op(con: duckdb.DuckDBPyConnection) -> tuple[list[str], list[tuple]]:
            cur = con.execute(sql, params or [])
            cols = [d[0] for d in cur.description] if cur.description else []
            return cols, cur.fetchall()

        return self._with_retry(op, read_only=True)

    def init(self) -> None:
        """Create the file if needed and apply pending migrations."""
        self._with_retry(lambda con: None)

    def schema_version(self) -> int:
        return self._with_retry(lambda con: _current_version(con), read_only=True)


def _record(row: tuple) -> AdapterRecord:
    data = dict(zip(_COLUMNS, row, strict=True))
    data["training_config"] = json.loads(data["training_config"] or "{}")
    data["metrics"] = json.loads(data["metrics"] or "{}")
    return AdapterRecord.model_validate(data)


def _reevaluate(con: duckdb.DuckDBPyConnection, actor: str, new: NewAdapter, version: int) -> AdapterRecord:
    """The same bytes registered again. Without new metrics: the existing row (plus the base's hash and the new
    path when the row had no hash yet). With new metrics (a new evaluation): the version takes them, and the new
    gate outcome: a rejected version that now passes becomes a candidate (and the champion rule applies); a
    candidate or champion that now fails is rejected (a champion leaves its alias, so the name has no champion
    until another version earns it). Archived stays archived."""

    def current() -> AdapterRecord:
        return _record(
            con.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM adapters WHERE name = ? AND version = ?", [new.name, version]
            ).fetchone()
        )

    rec = current()
    # the base's hash and the files' place, when the first registration could not record them (an import
    # before the base was on this machine): registering again with the base present is the fix the CLI names
    if rec.base_model_hash is None and new.base_model_hash is not None:
        con.execute(
            "UPDATE adapters SET base_model_hash = ?, path = ? WHERE name = ? AND version = ?",
            [new.base_model_hash, str(Path(new.path).resolve()), new.name, version],
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
        if not v.isdigit():
            raise RegistryError(f"{ref!r}: the version after '@' must be a number, e.g. {name}@2.")
        return name, int(v), None
    if ":" in ref:
        name, _, alias = ref.partition(":")
        return name, None, alias
    return ref, None, None


def _event(
    con: duckdb.DuckDBPyConnection, actor: str, action: str, name: str, version: int | None, detail: dict
) -> None:
    con.execute(
        "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
        [datetime.now(UTC).replace(tzinfo=None), actor, action, name, version, json.dumps(detail)],
    )


def _current_version(con: duckdb.DuckDBPyConnection) -> int:
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations'"
    ).fetchone()[0]
    if not exists:
        return 0
    return con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]


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
