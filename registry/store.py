"""The adapter registry: one DuckDB file, numbered migrations, a typed repository class.

DuckDB lets one process at a time open a file read-write, and a second process cannot open it at all while
that lasts. So every operation opens the file, does its work in one transaction and closes it, and a lock
error is retried with backoff and jitter up to a bounded total wait. Never hold a connection open.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import duckdb
from pydantic import BaseModel, ConfigDict, Field

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


#: Numbered migrations, applied in order on open. Append only; never edit a released one.
MIGRATIONS: list[tuple[int, str, Callable[[duckdb.DuckDBPyConnection], None]]] = [
    (1, "initial schema: adapters, events, latest_adapters", _m001_initial),
    (2, "views: champions, leaderboard", _m002_champions_leaderboard),
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
        "manual", description="Make a `candidate` the champion of its name: if it beats the current champion on "
        "`rank_metric`, always, or only by an explicit promote.")
    rank_metric: str = Field("eval_loss", description="Metric the champion rule compares (adapter value).")


_COLUMNS = list(AdapterRecord.model_fields)


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
                else:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    con = duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.IOException as e:
                if "lock" not in str(e).lower() or time.monotonic() >= deadline:
                    raise RegistryError(f"registry {self.path} stayed locked by another process for "
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

    # -- operations --------------------------------------------------------------------------------------

    def register(self, new: NewAdapter) -> AdapterRecord:
        """Register an adapter dir. Idempotent: the same sha256 under the same name returns that version."""
        cfg = check_adapter_dir(new.path)
        sha, size = adapter_sha256(new.path)
        now = datetime.now(UTC).replace(tzinfo=None)

        def op(con: duckdb.DuckDBPyConnection) -> AdapterRecord:
            existing = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM adapters WHERE name = ? AND "
                                   "adapter_sha256 = ?", [new.name, sha]).fetchone()
            if existing:
                return _record(existing)
            version = con.execute("SELECT coalesce(max(version), 0) + 1 FROM adapters WHERE name = ?",
                                  [new.name]).fetchone()[0]
            row = {
                "name": new.name, "version": version, "status": new.status, "base_model": new.base_model,
                "base_model_hash": new.base_model_hash, "method": new.method, "r": int(cfg["r"]),
                "lora_alpha": int(cfg["lora_alpha"]), "target_modules": sorted(cfg["target_modules"]),
                "training_config": json.dumps({**new.training_config, "rank_metric": new.rank_metric}),
                "dataset": new.dataset,
                "dataset_fingerprint": new.dataset_fingerprint, "path": str(Path(new.path).resolve()),
                "adapter_sha256": sha, "size_bytes": size, "trainable_params": new.trainable_params,
                "metrics": json.dumps(new.metrics), "created_at": now, "run_id": new.run_id,
                "code_version": new.code_version,
            }
            con.execute(f"INSERT INTO adapters ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                        list(row.values()))
            _event(con, self.actor, "register" if new.status != "rejected" else "reject", new.name, version,
                   {"sha256": sha, "status": new.status})
            if new.status == "candidate" and new.promote != "manual":
                champion = _champion(con, new.name)
                why = _beats(new.metrics, champion, new.rank_metric) if new.promote == "if_better" else "always"
                if why:
                    _promote(con, self.actor, new.name, version, why)
            return _record(con.execute(f"SELECT {', '.join(_COLUMNS)} FROM adapters WHERE name = ? AND "
                                       "version = ?", [new.name, version]).fetchone())

        return self._with_retry(op)

    def list(self, name: str | None = None, status: str | None = None, latest_only: bool = False
             ) -> list[AdapterRecord]:
        """Registered versions, oldest first, optionally filtered by name and status."""
        table = "latest_adapters" if latest_only else "adapters"
        where, args = [], []
        if name:
            where.append("name = ?")
            args.append(name)
        if status:
            where.append("status = ?")
            args.append(status)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM {table}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY name, version"
        return self._with_retry(lambda con: [_record(r) for r in con.execute(sql, args).fetchall()],
                                read_only=True)

    def get(self, name: str, version: int | None = None) -> AdapterRecord:
        """One version of an adapter (the latest when ``version`` is None)."""
        rows = self.list(name=name)
        if version is not None:
            rows = [r for r in rows if r.version == version]
        if not rows:
            raise RegistryError(f"no adapter {name!r}" + (f" version {version}" if version else "") +
                                " in the registry. Fix: `lorafoundry registry list` shows what is there.")
        return rows[-1]

    def servable(self) -> list[AdapterRecord]:
        """The version served under each name: its champion, else its latest candidate (never a rejected or
        archived one)."""
        chosen: dict[str, AdapterRecord] = {}
        for r in self.list():
            if r.status == "champion" or (r.status == "candidate" and chosen.get(r.name, r).status != "champion"):
                chosen[r.name] = r
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
            return _record(con.execute(f"SELECT {', '.join(_COLUMNS)} FROM adapters WHERE name = ? AND "
                                       "version = ?", [name, version]).fetchone())

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

    def schema_version(self) -> int:
        return self._with_retry(lambda con: _current_version(con), read_only=True)


def _record(row: tuple) -> AdapterRecord:
    data = dict(zip(_COLUMNS, row, strict=True))
    data["training_config"] = json.loads(data["training_config"] or "{}")
    data["metrics"] = json.loads(data["metrics"] or "{}")
    return AdapterRecord.model_validate(data)


def _champion(con: duckdb.DuckDBPyConnection, name: str) -> tuple[int, dict] | None:
    row = con.execute("SELECT version, metrics FROM adapters WHERE name = ? AND status = 'champion'",
                      [name]).fetchone()
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
    _event(con, actor, "promote", name, version, {"reason": reason, "previous_champion": old[0] if old else None})


def _event(con: duckdb.DuckDBPyConnection, actor: str, action: str, name: str, version: int | None,
           detail: dict) -> None:
    con.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
                [datetime.now(UTC).replace(tzinfo=None), actor, action, name, version, json.dumps(detail)])


def _current_version(con: duckdb.DuckDBPyConnection) -> int:
    exists = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = "
                         "'schema_migrations'").fetchone()[0]
    if not exists:
        return 0
    return con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]


def _check_version(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    current = _current_version(con)
    if current > SCHEMA_VERSION:
        raise RegistryError(f"registry {path} has schema version {current}, newer than this lorafoundry "
                            f"understands ({SCHEMA_VERSION}). Fix: upgrade lorafoundry; do not write to this file "
                            "with an older version.")
    return current


def _migrate(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Apply pending migrations in order, each in its own transaction."""
    con.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR, "
                "applied_at TIMESTAMP)")
    current = _check_version(con, path)
    for number, name, fn in MIGRATIONS:
        if number <= current:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            fn(con)
            con.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                        [number, name, datetime.now(UTC).replace(tzinfo=None)])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
