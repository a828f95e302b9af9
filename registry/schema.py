"""The registry file's schema: its tables and views, created by numbered migrations that run when the file is opened
(as in simonw/llm's ``migrations.py``), so a new file and an old one take one path; and how adapter paths are stored.

Append only: a released migration is never edited, reordered or removed; a change is a new migration at the end.
A file whose recorded version is newer than :data:`SCHEMA_VERSION` was written by a newer lorafoundry and is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from registry.errors import RegistrySchemaError
from registry.metrics import DEFAULT_RANK_METRIC
from registry.rules import LOWER_IS_BETTER

#: The registry's tables: what `registry export` writes and `registry import` reads, one parquet file each.
TABLES = ("adapters", "aliases", "alias_history", "events")


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
                   coalesce(training_config->>'rank_metric', '{DEFAULT_RANK_METRIC}') AS rank_metric,
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


def stored_path(adapter_dir: Path | str, base: Path | None) -> str:
    """How an adapter dir is stored: relative to ``base`` (the registry file's dir) when inside it, else absolute
    (always, for a shared registry, which has no dir: ``base`` None)."""
    p = Path(adapter_dir).resolve()
    return p.relative_to(base).as_posix() if base is not None and p.is_relative_to(base) else str(p)


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


def current_version(con: duckdb.DuckDBPyConnection) -> int:
    """The schema version the open database records (0: none yet)."""
    # one query; asking information_schema first cost more than the rest of a read (it lists every catalog)
    try:
        return con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]
    except duckdb.CatalogException:
        return 0


def check_version(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """The open database's schema version; :class:`RegistrySchemaError` when a newer lorafoundry wrote it."""
    current = current_version(con)
    if current > SCHEMA_VERSION:
        raise RegistrySchemaError(
            f"registry {path} has schema version {current}, newer than this lorafoundry "
            f"understands ({SCHEMA_VERSION}). Fix: upgrade lorafoundry; do not write to this file "
            "with an older version."
        )
    return current


def migrate(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Apply pending migrations in order, each in its own transaction."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)"
    )
    current = check_version(con, path)
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
