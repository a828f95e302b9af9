"""Moving adapters in and out of a registry: export (rows as parquet plus the adapter dirs) and import on another
machine; registering an adapter dir from anywhere by copying its files into the home; removing what a killed
register or import left half-copied there.

Registering and importing bring files home by one code path (:func:`_copy_home`) into one layout,
``<imported>/<name>/<sha256[:16]>``, where ``<imported>`` is the home's dir for adapters brought in (the caller
passes it: the home's layout is ``lora_assets.home.Home``'s): content-addressed, so the same files are one dir
however often and by whichever path they arrive. Imports before this layout wrote ``<imported>/<name>/v<N>``; such
dirs stay readable where a row points at them and are removed as orphans where none does.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from registry.dbfile import file_lock
from registry.errors import RegistryBusyError, RegistryConflictError, RegistryInputError
from registry.records import AdapterRecord, NewAdapter, adapter_sha256
from registry.rules import SERVABLE_STATUSES, check_name, is_valid_name
from registry.schema import TABLES
from registry.store import AdapterRegistry, check_adapter_dir

#: What registering and importing create under ``<imported>/<name>/``: a copy in progress, a copy
#: named by its sha256 prefix, and (from imports before the one layout) an imported version.
_IMPORTED_DIR_RE = re.compile(r"\.import-.*|[0-9a-f]{16}|v[0-9]+")


def export_registry(reg: AdapterRegistry, out: Path) -> dict[str, int]:
    """Write ``out/<table>.parquet`` for every table and copy each adapter dir to ``out/adapters/<name>/v<N>``;
    the exported ``path`` column is relative to ``out``. Returns rows per table.

    The tables are read in one transaction and exactly the adapters in that snapshot are copied, so a version
    registered meanwhile is either fully in the export or not at all; the export is built next to ``out`` and
    renamed into place, so a failure leaves no half-written export.
    """
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise RegistryInputError(f"{out} is not empty. Fix: export into a new dir.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        counts, sources = reg.export_tables(tmp)
        for name, version, adapter_dir in sources:
            shutil.copytree(adapter_dir, tmp / "adapters" / name / f"v{version}")
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


def import_registry(reg: AdapterRegistry, src: Path, imported: Path) -> dict[str, int]:
    """Bring an exported registry in: adapter dirs are copied under ``imported/<name>/<sha256[:16]>`` (``imported``:
    the home's dir for adapters brought in) and checked against their sha256; rows keep their versions. A version
    already present with the same sha256 is skipped; one present with another sha256 is a conflict, and conflicts
    stop the import before anything is written; so do adapter files that registering would refuse
    (:func:`registry.store.check_adapter_dir`). Returns rows imported per table."""
    src = Path(src)
    rows, related = _read_export(src)
    new_rows = _new_versions(reg, src, rows)
    if reg.store is not None:
        return _import_to_store(reg, src, new_rows, related)
    imported = Path(imported).resolve()
    remove_orphans(reg, imported)
    with _importing(reg, imported):  # the copies are not orphans until the rows are in
        created: list[Path] = []
        try:
            for r in new_rows:
                dest, made = _copy_home(src / r["path"], imported, r["name"], r["adapter_sha256"])
                created += [dest] if made else []
                r["path"] = reg.stored_path(dest)
            return reg.import_rows(new_rows, related)
        except BaseException:
            for dest in created:
                shutil.rmtree(dest, ignore_errors=True)
            raise


def _import_to_store(
    reg: AdapterRegistry, src: Path, new_rows: list[dict[str, Any]], related: dict[str, list[dict[str, Any]]]
) -> dict[str, int]:
    """Import into a registry with an adapter store (registry/objects.py): every new version's files are put in the
    store first, whole, and the rows that point at them are inserted after, in one transaction; the upload markers
    are removed only once the rows are in (kept after a failure, so the next writer removes what was put)."""
    reg.remove_store_orphans()
    markers = []
    for r in new_rows:
        markers.append(reg.store.begin_upload(src / str(r["path"]), r["adapter_sha256"]))
        r["path"] = reg.store.object_url(r["adapter_sha256"])
    counts = reg.import_rows(new_rows, related)
    for marker in markers:
        reg.store.end_upload(marker)
    return counts


def migrate_registry(src: AdapterRegistry, dest: AdapterRegistry) -> dict[str, int]:
    """Copy the registry ``src`` (a home's file) into ``dest`` (a shared registry with an adapter store): every
    version with its aliases, their history and its events, its weights put in ``dest``'s store; then every
    migrated version's sha256 is checked in ``dest``, reading its objects back in full. What ``dest`` already holds
    with the same sha256 is skipped, so migrating twice adds nothing. Returns the rows added per table and the
    number of versions verified (``verified``)."""
    if not dest.shared or dest.store is None:
        raise RegistryInputError(
            f"migrate copies into a shared registry with an adapter store, not {dest.shown} "
            f"({'no adapter store' if dest.shared else 'a local file'}). Fix: --to postgresql://USER@HOST:PORT/DB "
            "and --artifacts s3://BUCKET/PREFIX (or LORAFOUNDRY_ARTIFACTS)."
        )
    with tempfile.TemporaryDirectory(prefix="lorafoundry-migrate-") as tmp:
        export_registry(src, Path(tmp) / "export")
        counts = import_registry(dest, Path(tmp) / "export", Path(tmp) / "unused")
    wanted = {(r.name, r.version): r.adapter_sha256 for r in src.list()}
    have = {(r.name, r.version): r for r in dest.list()}
    problems = [f"{n}@{v}: missing" for (n, v) in wanted if (n, v) not in have]
    problems += [
        f"{n}@{v}: another sha256"
        for (n, v), sha in wanted.items()
        if (n, v) in have and have[n, v].adapter_sha256 != sha
    ]
    problems += [
        f"{v.name}@{v.version}: {v.detail}" for v in dest.verify() if (v.name, v.version) in wanted and not v.ok
    ]
    if problems:
        raise RegistryConflictError(f"migrated to {dest.shown}, but: " + "; ".join(problems))
    return {**counts, "verified": len(wanted)}


def _read_export(src: Path) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """The rows of an export dir: its adapters, and per other table its rows (as {column: value})."""
    missing = [t for t in TABLES if not (src / f"{t}.parquet").exists()]
    if missing:
        raise RegistryInputError(f"{src} is not a lorafoundry export: no {', '.join(missing)}.parquet.")
    mem = duckdb.connect(":memory:")
    try:
        tables = {}
        for table in TABLES:
            cur = mem.execute("SELECT * FROM read_parquet(?)", [str(src / f"{table}.parquet")])
            cols = [d[0] for d in cur.description]
            tables[table] = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    finally:
        mem.close()
    return tables.pop("adapters"), tables


def _new_versions(reg: AdapterRegistry, src: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The exported versions this registry lacks, after checking every row: a name outside the name rule, a version
    that is not a number or a path outside ``src`` refuses the import; exported files that are missing or do not
    match their sha256, or a version present here with another sha256, are conflicts, all reported at once; then new
    versions whose files registering would refuse are refused, all at once."""
    problems = []
    for r in rows:  # nothing in the files is trusted: names, versions and paths are checked first
        source = (src / str(r["path"])).resolve()
        if (
            not is_valid_name(str(r["name"]))
            or not isinstance(r["version"], int)
            or not source.is_relative_to(src.resolve())
        ):
            raise RegistryInputError(
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
        raise RegistryConflictError("import refused, nothing written: " + "; ".join(problems))
    refused = []
    for r in new_rows:  # what registering checks: files a server could not start with never become a version
        try:
            check_adapter_dir(src / str(r["path"]), r["base_model"], values=r["status"] in SERVABLE_STATUSES)
        except RegistryInputError as e:
            refused.append(f"{r['name']}@{r['version']}: {e}")
    if refused:
        raise RegistryInputError("import refused, nothing written: " + "; ".join(refused))
    return new_rows


@contextmanager
def _importing(reg: AdapterRegistry, imported: Path) -> Iterator[None]:
    """Held (shared) by every register and import while it copies files under ``imported`` until its rows are
    in; while anyone holds it, nothing there is removed as an orphan."""
    with file_lock(imported / ".lock", reg.max_wait_s, shared=True) as held:
        if not held:
            raise RegistryBusyError(f"{imported} stayed locked for {reg.max_wait_s:.0f} s. Fix: retry.")
        yield


def _copy_home(src: Path, imported: Path, name: str, sha: str) -> tuple[Path, bool]:
    """Copy the files of the adapter dir ``src`` (its own files, not checkpoints or other dirs) to
    ``imported/<name>/<sha[:16]>``, through a ``.import-`` dir renamed into place; the caller holds
    :func:`_importing`. Returns the dir and whether this call created it (False: the same files were there, or
    another register of them got there first)."""
    dest = imported / check_name(name) / sha[:16]
    if dest.exists():
        return dest, False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=dest.parent))
    try:
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        tmp.rename(dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.exists():  # not another register of the same files getting there first
            raise
        return dest, False
    return dest, True


def register_copy(reg: AdapterRegistry, new: NewAdapter, adapters_root: Path, imported: Path) -> AdapterRecord:
    """Register an adapter dir from anywhere: its own files (not checkpoints or other dirs) are first copied to
    ``imported/<name>/<sha256[:16]>`` (a server reads adapters only from under its root); a dir already under the
    root is registered where it is. Leftovers of registers killed mid-copy are removed first.

    Args:
        reg: the registry.
        new: what to register; ``new.path`` is the dir to copy.
        adapters_root: the home's adapters dir.
        imported: the home's dir for adapters brought in (under ``adapters_root``).
    """
    check_name(new.name)  # it names a dir
    src = Path(new.path).resolve()
    if src.is_relative_to(Path(adapters_root).resolve()):
        return reg.register(new)
    imported = Path(imported).resolve()
    remove_orphans(reg, imported)
    with _importing(reg, imported):
        dest, created = _copy_home(src, imported, new.name, adapter_sha256(src)[0])
        try:
            return reg.register(new.model_copy(update={"path": dest}))
        except BaseException:
            if created:
                shutil.rmtree(dest, ignore_errors=True)
            raise


def external_adapter(
    adapter_dir: Path, name: str, base_model: str | None = None, dataset: str | None = None
) -> NewAdapter:
    """What to register for an adapter dir trained elsewhere (``registry register``): its name checked, the dir
    checked as a peft LoRA dir, the base model from ``base_model`` or else adapter_config.json, and lineage (where
    it came from, its LoRA settings). The base's hash is not known here: the caller adds it when the base is on
    this machine (:func:`register_copy` then brings the files home).

    Args:
        adapter_dir: a peft LoRA dir (adapter_config.json + adapter_model.safetensors).
        name: the name to register it under.
        base_model: the base model; default: ``base_model_name_or_path`` in adapter_config.json.
        dataset: the dataset it was trained on (lineage).
    """
    check_name(name)
    cfg = check_adapter_dir(adapter_dir, base_model)
    base = base_model or cfg.get("base_model_name_or_path")
    if not base:
        raise RegistryInputError(
            f"{adapter_dir}: adapter_config.json names no base_model_name_or_path. Fix: pass --base-model."
        )
    src = Path(adapter_dir).resolve()
    settings = {k: cfg.get(k) for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora")}
    return NewAdapter(
        name=name,
        path=src,
        base_model=base,
        method="lora",
        dataset=dataset,
        training_config={"imported_from": str(src), **settings},
    )


def _ours(d: Path) -> bool:
    """Whether ``d`` (a dir ``<imported>/<name>/<entry>``) is one that registering or importing creates."""
    return d.is_dir() and is_valid_name(d.parent.name) and _IMPORTED_DIR_RE.fullmatch(d.name) is not None


def remove_orphans(reg: AdapterRegistry, imported: Path) -> list[Path]:
    """Remove what registers and imports killed mid-way left under ``imported`` (the home's dir for adapters
    brought in): copies in progress and copies no registered version points at. Only when no register or import is
    at work (the lock they hold while copying is free), which is what proves a dir an orphan; otherwise nothing is
    removed this time. Never for a shared registry: whether a dir of this home is in use is its own file's business
    (after `registry migrate` it still points at them). Returns the dirs removed."""
    imported = Path(imported).resolve()
    if reg.shared or not imported.is_dir():
        return []  # a shared registry's rows are not this home's business: its file may still point at these dirs
    with file_lock(imported / ".lock", 0.0) as held:
        if not held:
            return []
        ours = [d for d in imported.glob("*/*") if _ours(d)]
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
