"""Moving adapters in and out of a registry: export (rows as parquet plus the adapter dirs) and import on another
machine; registering an adapter dir from anywhere by copying its files into the home; removing what a killed
register or import left half-copied there."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import duckdb

from registry.store import (
    AdapterRecord,
    AdapterRegistry,
    NewAdapter,
    RegistryBusyError,
    RegistryError,
    adapter_sha256,
    check_name,
    file_lock,
)

TABLES = ("adapters", "aliases", "alias_history", "events")


def export_registry(reg: AdapterRegistry, out: Path) -> dict[str, int]:
    """Write ``out/<table>.parquet`` for every table and copy each adapter dir to ``out/adapters/<name>/v<N>``;
    the exported ``path`` column is relative to ``out``. Returns rows per table.

    The tables are read in one transaction and exactly the adapters in that snapshot are copied, so a version
    registered meanwhile is either fully in the export or not at all; the export is built next to ``out`` and
    renamed into place, so a failure leaves no half-written export.
    """
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise RegistryError(f"{out} is not empty. Fix: export into a new dir.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    counts: dict[str, int] = {}
    sources: list[tuple[str, int, str]] = []

    def op(con: duckdb.DuckDBPyConnection) -> None:
        sources.clear()  # a retried attempt starts over
        for table in TABLES:
            sql = (
                f"SELECT * REPLACE ('adapters/' || name || '/v' || version AS path) FROM {table}"
                if table == "adapters"
                else f"SELECT * FROM {table}"
            )
            con.execute(f"COPY ({sql}) TO '{tmp / (table + '.parquet')}' (FORMAT parquet)")
            counts[table] = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        sources.extend(con.execute("SELECT name, version, path FROM adapters").fetchall())

    try:
        reg._read(op)
        for name, version, path in sources:
            shutil.copytree(reg.adapter_path(path), tmp / "adapters" / name / f"v{version}")
        if out.exists():  # empty (checked above), maybe someone's working dir: keep it, move the entries in
            for entry in tmp.iterdir():
                entry.rename(out / entry.name)
            tmp.rmdir()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def import_registry(reg: AdapterRegistry, src: Path, adapters_root: Path) -> dict[str, int]:
    """Bring an exported registry in: adapter dirs are copied under ``adapters_root/imported/<name>/v<N>`` and
    checked against their sha256; rows keep their versions. A version already present with the same sha256 is
    skipped; one present with another sha256 is a conflict, and conflicts stop the import before anything is
    written. Returns rows imported per table."""
    src = Path(src)
    missing = [t for t in TABLES if not (src / f"{t}.parquet").exists()]
    if missing:
        raise RegistryError(f"{src} is not a lorafoundry export: no {', '.join(missing)}.parquet.")
    mem = duckdb.connect(":memory:")
    cols = [d[0] for d in mem.execute(f"SELECT * FROM '{src / 'adapters.parquet'}' LIMIT 0").description]
    rows = [
        dict(zip(cols, r, strict=True)) for r in mem.execute(f"SELECT * FROM '{src / 'adapters.parquet'}'").fetchall()
    ]
    problems = []
    for r in rows:  # nothing in the files is trusted: names, versions and paths are checked first
        source = (src / str(r["path"])).resolve()
        if (
            not _valid_name(str(r["name"]))
            or ".." in str(r["name"])
            or not isinstance(r["version"], int)
            or not source.is_relative_to(src.resolve())
        ):
            raise RegistryError(
                f"import refused, nothing written: row {r['name']!r}@{r['version']!r} has an "
                f"invalid name, version or path ({r['path']!r})."
            )
        try:
            sha, _ = adapter_sha256(source)
        except OSError as e:
            problems.append(f"{r['name']}@{r['version']}: exported files missing ({e})")
            continue
        if sha != r["adapter_sha256"]:
            problems.append(f"{r['name']}@{r['version']}: exported files do not match their sha256")
    existing = {(r.name, r.version): r.adapter_sha256 for r in reg.list()}
    new_rows = []
    for r in rows:
        have = existing.get((r["name"], r["version"]))
        if have is None:
            new_rows.append(r)
        elif have != r["adapter_sha256"]:
            problems.append(f"{r['name']}@{r['version']} exists here with another sha256")
    if problems:
        raise RegistryError("import refused, nothing written: " + "; ".join(problems))
    imported = {t: 0 for t in TABLES}
    keys = {(r["name"], r["version"]) for r in new_rows}

    def op(con: duckdb.DuckDBPyConnection) -> None:
        for r in new_rows:
            if (
                r["status"] == "champion"
                and con.execute("SELECT 1 FROM adapters WHERE name = ? AND status = 'champion'", [r["name"]]).fetchone()
            ):
                r["status"] = "candidate"  # this registry's champion stays; promote the import by hand if wanted
            con.execute(f"INSERT INTO adapters ({', '.join(r)}) VALUES ({', '.join('?' * len(r))})", list(r.values()))
        imported["adapters"] = len(new_rows)
        for table in ("aliases", "alias_history", "events"):
            data = mem.execute(f"SELECT * FROM '{src / (table + '.parquet')}'").fetchall()
            names = [d[0] for d in mem.description]
            for row in data:
                rec = dict(zip(names, row, strict=True))
                if (rec["name"], rec["version"]) not in keys and table != "alias_history":
                    continue
                if table == "alias_history" and rec["name"] not in {k[0] for k in keys}:
                    continue
                if (
                    table == "aliases"
                    and con.execute(
                        "SELECT 1 FROM aliases WHERE name = ? AND alias = ?", [rec["name"], rec["alias"]]
                    ).fetchone()
                ):
                    continue  # this registry's own alias wins
                con.execute(
                    f"INSERT INTO {table} ({', '.join(rec)}) VALUES ({', '.join('?' * len(rec))})", list(rec.values())
                )
                imported[table] += 1

    remove_orphans(reg, adapters_root)
    with _importing(reg, adapters_root) as held:  # the copies are not orphans until the rows are in
        if not held:
            raise RegistryBusyError(f"{adapters_root}/imported stayed locked for {reg.max_wait_s:.0f} s. Fix: retry.")
        for r in new_rows:
            dest = Path(adapters_root) / "imported" / r["name"] / f"v{r['version']}"
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(src / r["path"], dest)
            r["path"] = reg.stored_path(dest)
        reg._write(op)
    return imported


#: What registering and importing create under ``<adapters root>/imported/<name>/``: a copy in progress, a
#: registered copy named by its sha256 prefix, an imported version.
_IMPORTED_DIR_RE = re.compile(r"\.import-.*|[0-9a-f]{16}|v[0-9]+")


def _valid_name(name: str) -> bool:
    try:
        check_name(name)
    except RegistryError:
        return False
    return True


def _importing(reg: AdapterRegistry, adapters_root: Path):
    """Held (shared) by every register and import while it copies files under ``imported/`` until its rows are
    in; while anyone holds it, nothing there is removed as an orphan."""
    return file_lock(Path(adapters_root) / "imported" / ".lock", reg.max_wait_s, shared=True)


def register_copy(reg: AdapterRegistry, new: NewAdapter, adapters_root: Path) -> AdapterRecord:
    """Register an adapter dir from anywhere: its own files (not checkpoints or other dirs) are first copied to
    ``adapters_root/imported/<name>/<sha256[:16]>`` (a server reads adapters only from under its root); a dir
    already under the root is registered where it is. Leftovers of registers killed mid-copy are removed first.

    Args:
        reg: the registry.
        new: what to register; ``new.path`` is the dir to copy.
        adapters_root: the home's adapters dir.
    """
    check_name(new.name)  # it names a dir
    root = Path(adapters_root).resolve()
    src = Path(new.path).resolve()
    if src.is_relative_to(root):
        return reg.register(new)
    remove_orphans(reg, root)
    with _importing(reg, root) as held:
        if not held:
            raise RegistryBusyError(f"{root / 'imported'} stayed locked for {reg.max_wait_s:.0f} s. Fix: retry.")
        dest = root / "imported" / new.name / adapter_sha256(src)[0][:16]
        created = False
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=dest.parent))
            try:
                for f in src.iterdir():
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
                tmp.rename(dest)
                created = True
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not dest.exists():  # not another register of the same files getting there first
                    raise
        try:
            return reg.register(new.model_copy(update={"path": dest}))
        except BaseException:
            if created:
                shutil.rmtree(dest, ignore_errors=True)
            raise


def remove_orphans(reg: AdapterRegistry, adapters_root: Path) -> list[Path]:
    """Remove what registers and imports killed mid-way left under ``adapters_root/imported``: copies in progress
    and copies no registered version points at. Only when no register or import is at work (the lock they hold
    while copying is free), which is what proves a dir an orphan; otherwise nothing is removed this time.
    Returns the dirs removed."""
    imported = Path(adapters_root).resolve() / "imported"
    if not imported.is_dir():
        return []
    with file_lock(imported / ".lock", 0.0) as held:
        if not held:
            return []
        ours = [d for d in imported.glob("*/*") if d.is_dir() and _IMPORTED_DIR_RE.fullmatch(d.name)]
        if not ours:
            return []
        listed = {Path(r.path).resolve() for r in reg.list()}  # the snapshot: cheap, and enough to spare most
        maybe = [d for d in ours if d.resolve() not in listed]
        if not maybe:
            return []
        in_use = reg.paths_in_use()  # the file itself: a version whose writer died before publishing counts
        orphans = [d for d in maybe if d.resolve() not in in_use]
        for d in orphans:
            shutil.rmtree(d, ignore_errors=True)
        for parent in {d.parent for d in orphans}:
            try:
                parent.rmdir()  # empty now
            except OSError:
                pass
        return orphans
