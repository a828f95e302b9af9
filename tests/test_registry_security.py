"""The registry under hostile input, damaged files, moved homes, killed writers and many concurrent writers and
readers: every failure is a clear message and exit 1, never a traceback, a hang or a lost version."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from registry.dbfile import file_lock
from registry.errors import RegistryCorruptError, RegistryInputError
from registry.portable import register_copy, remove_orphans
from registry.records import NewAdapter
from registry.schema import _m001_initial, _m002_champions_leaderboard, _m003_aliases
from registry.store import AdapterRegistry

HASH = "h" * 64


def make_adapter_dir(path: Path, seed: int = 0) -> Path:
    # imported here, not at the top: the spawned workers below import this module and need no torch
    from tests.test_registry import make_adapter_dir

    return make_adapter_dir(path, seed=seed)


def cli(home: Path, *args: str):
    from orchestration.cli import app

    return CliRunner().invoke(app, ["registry", *args, "--home", str(home)])


def refused(res, *needles: str) -> str:
    """The command failed cleanly: exit 1, a message, no traceback; returns the output, unwrapped."""
    assert res.exit_code == 1, res.output
    assert not isinstance(res.exception, Exception), repr(res.exception)  # typer.Exit is a SystemExit
    assert "Traceback" not in res.output
    flat = " ".join(res.output.split())
    for needle in needles:
        assert needle in flat, res.output
    return flat


@pytest.fixture
def home(tmp_path) -> Path:
    """A home with a@1 (alias prod) and a@2, registered under its adapters dir."""
    h = tmp_path / "home"
    reg = AdapterRegistry(h / "registry.duckdb")
    for i in (1, 2):
        reg.register(
            NewAdapter(
                name="a", path=make_adapter_dir(h / "adapters" / f"a{i}", seed=i), base_model="b", base_model_hash=HASH
            )
        )
    reg.set_alias("a", "prod", 1)
    return h


# -- 9. `registry sql` sees the registry and nothing else ------------------------------------------------------


#: Statements `registry sql` must refuse without touching anything outside the registry ({out}: a path outside it).
HOSTILE_SQL = [
    "COPY (SELECT * FROM adapters) TO '{out}'",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT content FROM read_blob('/etc/hostname')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "ATTACH '{out}' AS other",
    "SET enable_external_access = true",
    "RESET lock_configuration",
    "SET allowed_directories = ['/']",
    "INSTALL httpfs",
    "LOAD httpfs",
    "EXPORT DATABASE '{out}'",
    "DELETE FROM adapters",
    "SELECT 1; COPY (SELECT 1) TO '{out}'",
]


@pytest.mark.parametrize("sql", HOSTILE_SQL)
def test_sql_cannot_reach_files_or_settings(home, tmp_path, sql):
    out = tmp_path / "outside" / "leak.csv"
    out.parent.mkdir()
    text = refused(cli(home, "sql", sql.format(out=out)), "query failed")
    assert "read-only" in text
    assert list(out.parent.iterdir()) == []  # nothing written outside the home


@pytest.mark.parametrize("sql", ["DELETE FROM adapters", "CREATE TABLE t AS SELECT 1", "ATTACH '{out}' AS other"])
def test_sql_on_a_home_without_a_registry_is_read_only_too(tmp_path, sql):
    """Before the first registration there is no file; `registry sql` reads an empty registry, still read-only."""
    out = tmp_path / "outside" / "leak.duckdb"
    out.parent.mkdir()
    empty = tmp_path / "empty-home"
    text = refused(cli(empty, "sql", sql.format(out=out)), "query failed")
    assert "read-only" in text
    assert list(out.parent.iterdir()) == [] and not (empty / "registry.duckdb").exists()
    assert cli(empty, "sql", "SELECT count(*) FROM adapters").exit_code == 0


def test_sql_still_reads_every_table_and_view(home):
    for table in ("adapters", "aliases", "alias_history", "events", "latest_adapters", "champions", "leaderboard"):
        res = cli(home, "sql", f"SELECT count(*) AS n FROM {table}", "--json")
        assert res.exit_code == 0, res.output
    res = cli(home, "sql", "SELECT name, version, path FROM adapters ORDER BY version", "--json")
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["name"], r["version"], r["path"]) for r in rows] == [("a", 1, "adapters/a1"), ("a", 2, "adapters/a2")]


# -- 10. names, versions, aliases and statuses follow the rule -------------------------------------------------


@pytest.mark.parametrize(
    ("args", "rule"),
    [
        (["show", "a@²"], "ASCII digits"),
        (["show", "a@٣"], "ASCII digits"),  # int('٣') is 3: it must not resolve to a@3
        (["show", "a@1" + "0" * 20], "ASCII digits"),
        (["show", "a:" + "p" * 5000], "1-64 characters"),
        (["show", "b" * 5000], "1-64 characters"),
        (["alias", "a@1", "x" * 5000], "1-64 characters"),
        (["alias", "a@1", "prod/../x"], "1-64 characters"),
        (["archive", "a@٢"], "ASCII digits"),
        (["verify", "a@²"], "ASCII digits"),
        (["list", "--status", "bogus"], "candidate, champion, rejected, archived"),
        (["list", "--name", "n" * 5000], "1-64 characters"),
    ],
)
def test_refs_outside_the_rule_are_refused(home, args, rule):
    text = refused(cli(home, *args), rule)
    assert len(text) < 2000  # a 5,000-character value is not echoed back whole


def test_register_refuses_a_name_outside_the_rule(home, tmp_path):
    d = make_adapter_dir(tmp_path / "ext")
    refused(cli(home, "register", str(d), "--name", "n" * 65), "1-64 characters")
    refused(cli(home, "register", str(d), "--name", "../up"), "1-64 characters")
    refused(cli(home, "register", str(d), "--name", ".hidden"), "1-64 characters")  # the spec refuses it too
    assert not (home / "adapters" / "imported").exists()
    with pytest.raises(RegistryInputError):
        AdapterRegistry(home / "registry.duckdb").register(NewAdapter(name="x" * 65, path=d, base_model="b"))


@pytest.mark.parametrize("name", [".hidden", "n" * 65, "é", "a/b", "a\n", "-x", ""])
def test_the_spec_and_the_registry_share_one_name_rule(name):
    from lora_assets import spec
    from registry.rules import check_name, is_valid_name

    assert spec.is_valid_name is is_valid_name  # the spec checks names by the registry's rule, not a copy
    with pytest.raises(RegistryInputError, match="1-64 characters"):
        check_name(name)


# -- 8. a damaged registry file: at once, what is wrong and what to do -----------------------------------------


def _damage(path: Path, how: str) -> None:
    if how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(20_000))
    else:  # cut to half, as a copy interrupted half way would leave it
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("how", ["empty", "garbage", "half"])
def test_damaged_file_is_reported_at_once(home, tmp_path, how):
    path = home / "registry.duckdb"
    for i in range(3, 12):  # enough rows that half the file holds some of them
        AdapterRegistry(path).register(
            NewAdapter(name=f"n{i}", path=make_adapter_dir(tmp_path / f"d{i}", seed=i), base_model="b")
        )
    _damage(path, how)
    ext = make_adapter_dir(tmp_path / "ext", seed=99)
    for args in (["list"], ["show", "a@1"], ["sql", "SELECT 1"], ["verify"], ["register", str(ext), "--name", "z"]):
        t0 = time.monotonic()
        text = refused(cli(home, *args), "is not a valid/complete DuckDB database", "registry export")
        assert time.monotonic() - t0 < 10, args
        assert str(path) in text.replace(" ", "")
    with pytest.raises(RegistryCorruptError):
        AdapterRegistry(path).get("a@1")


# -- 11. a home moved, copied or restored keeps serving ---------------------------------------------------------


def _assert_serves_from(home: Path) -> None:
    from serving.resolver import Refusal
    from tests.test_guard import make_resolver

    resolver = make_resolver(home / "registry.duckdb", HASH, home / "adapters", ttl_s=0)
    for ref, version in (("a@1", 1), ("a:prod", 1), ("a", 2), ("a@2", 2)):
        rec = resolver.resolve(ref)
        assert not isinstance(rec, Refusal), (ref, rec)
        assert rec.version == version and Path(rec.path).is_relative_to(home / "adapters"), (ref, rec.path)
    served = [r for r in AdapterRegistry(home / "registry.duckdb").servable() if r.name == "a"]
    assert [r.version for r in served] == [2] and Path(served[0].path).is_relative_to(home / "adapters")


def test_copied_and_moved_homes_serve_their_own_files(home, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(home, copy)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(home, moved)  # the original is gone: nothing may still point there
    _assert_serves_from(copy)
    _assert_serves_from(moved)
    res = cli(moved, "verify", "--json")
    assert res.exit_code == 0 and [json.loads(x)["ok"] for x in res.stdout.splitlines()] == [True, True]


def test_home_restored_from_export_serves(home, tmp_path):
    assert cli(home, "export", str(tmp_path / "backup")).exit_code == 0
    restored = tmp_path / "restored"
    res = cli(restored, "import", str(tmp_path / "backup"))
    assert res.exit_code == 0, res.output
    rows = AdapterRegistry(restored / "registry.duckdb").query(
        "SELECT path, adapter_sha256 FROM adapters ORDER BY version"
    )[1]
    assert len(rows) == 2  # one layout for imports and registers: imported/<name>/<sha256[:16]>
    assert [p for p, _ in rows] == [f"adapters/imported/a/{sha[:16]}" for _, sha in rows]
    shutil.copytree(restored, tmp_path / "restored-copy")
    shutil.rmtree(restored)
    for r in AdapterRegistry(tmp_path / "restored-copy" / "registry.duckdb").list():
        assert (Path(r.path) / "adapter_config.json").exists() and "restored-copy" in r.path


def _old_registry(home: Path, adapter_paths: list[Path]) -> Path:
    """A registry as schema 3 wrote it: absolute adapter paths."""
    path = home / "registry.duckdb"
    home.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)")
    for n, fn in enumerate((_m001_initial, _m002_champions_leaderboard, _m003_aliases), 1):
        fn(con)
        con.execute("INSERT INTO schema_migrations VALUES (?, 'old', now())", [n])
    from registry.records import adapter_sha256

    for v, p in enumerate(adapter_paths, 1):
        sha, size = adapter_sha256(p)
        con.execute(
            "INSERT INTO adapters (name, version, status, base_model, base_model_hash, method, r, lora_alpha, "
            "target_modules, path, adapter_sha256, size_bytes, created_at) VALUES "
            "('a', ?, 'candidate', 'b', ?, 'lora', 4, 8, ['q_proj'], ?, ?, ?, now())",
            [v, HASH, str(p.resolve()), sha, size],
        )
    con.execute("INSERT INTO aliases VALUES ('a', 'prod', 1, now())")
    con.close()
    return path


def test_old_absolute_paths_are_migrated_to_relative(tmp_path):
    old = tmp_path / "old"
    _old_registry(old, [make_adapter_dir(old / "adapters" / f"a{i}", seed=i) for i in (1, 2)])
    outside = make_adapter_dir(tmp_path / "outside", seed=7)
    con = duckdb.connect(str(old / "registry.duckdb"))
    con.execute(
        "INSERT INTO adapters SELECT * REPLACE ('b' AS name, ? AS path) FROM adapters WHERE version = 1", [str(outside)]
    )
    con.close()
    reg = AdapterRegistry(old / "registry.duckdb")
    stored = dict(reg.query("SELECT name || '@' || version, path FROM adapters")[1])
    assert stored == {"a@1": "adapters/a1", "a@2": "adapters/a2", "b@1": str(outside.resolve())}
    assert reg.get("a@1").path == str((old / "adapters" / "a1").resolve())
    _assert_serves_from(old)


def test_old_home_copied_before_upgrade_is_rebased(tmp_path):
    """A schema-3 home copied elsewhere (its rows still name the original) and the original removed: the
    migration points the rows at the copy's own adapters."""
    original = tmp_path / "original"
    _old_registry(original, [make_adapter_dir(original / "adapters" / f"a{i}", seed=i) for i in (1, 2)])
    shutil.copytree(original, tmp_path / "copy")
    shutil.rmtree(original)
    _assert_serves_from(tmp_path / "copy")


# -- 12. registers killed mid-copy leave nothing behind ----------------------------------------------------------


def _die_during_copy(home: str, src: str, stage: str) -> None:
    """Register ``src`` into ``home`` and SIGKILL this process in the middle: after the first file is copied, or
    after the copy is renamed into place but before its row is written."""
    import registry.portable as portable

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    portable.remove_orphans = lambda *a: []  # as if the kills happened together: their leftovers pile up

    if stage == "copying":
        real = shutil.copy2
        calls = []

        def copy_then_die(*a, **k):
            calls.append(a)
            if len(calls) == 2:
                die()
            return real(*a, **k)

        portable.shutil.copy2 = copy_then_die
    else:
        AdapterRegistry.register = die
    reg = AdapterRegistry(Path(home) / "registry.duckdb")
    adapters = Path(home) / "adapters"
    register_copy(reg, NewAdapter(name="ext", path=Path(src), base_model="b"), adapters, adapters / "imported")


def _imported_dirs(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "adapters" / "imported").glob("*/*") if p.is_dir())


def test_killed_registers_leave_orphans_that_the_next_register_and_verify_remove(home, tmp_path):
    ctx = mp.get_context("spawn")
    for i, stage in enumerate(["copying", "renamed", "copying", "renamed"]):
        src = make_adapter_dir(tmp_path / f"src{i}", seed=10 + i)
        (src / "notes.txt").write_text("a third file, so that the copy is killed half way")
        p = ctx.Process(target=_die_during_copy, args=(str(home), str(src), stage))
        p.start()
        p.join(60)
        assert p.exitcode == -signal.SIGKILL
    left = _imported_dirs(home)
    assert sum(d.startswith(".import-") for d in left) == 2 and len(left) == 4  # what the kills left
    with file_lock(home / "adapters" / "imported" / ".lock", 0.0, shared=True):  # a register at work elsewhere
        assert remove_orphans(AdapterRegistry(home / "registry.duckdb"), home / "adapters" / "imported") == []
    assert len(_imported_dirs(home)) == 4  # nothing can be proved an orphan meanwhile
    res = cli(home, "verify")
    assert res.exit_code == 0, res.output
    assert res.output.count("left by an interrupted register") == 4
    assert _imported_dirs(home) == []

    # the same after a kill, by the next register instead of verify; the registered copy stays
    p = ctx.Process(target=_die_during_copy, args=(str(home), str(tmp_path / "src0"), "renamed"))
    p.start()
    p.join(60)
    assert len(_imported_dirs(home)) == 1
    res = cli(home, "register", str(tmp_path / "src1"), "--name", "ext", "--base-model", "b", "--json")
    assert res.exit_code == 0, res.output
    kept = Path(json.loads(res.stdout)["path"])
    assert _imported_dirs(home) == [kept.name] and (kept / "adapter_config.json").exists()
    res = cli(home, "verify")
    assert res.exit_code == 0 and "interrupted" not in res.output and _imported_dirs(home) == [kept.name]


def _entries(imported: Path) -> set[Path]:
    """imported/<name>/<dir> as of now; the CLI creates and removes dirs while we look (glob raises then)."""
    while True:
        try:
            return set(imported.glob("*/*"))
        except FileNotFoundError:
            continue


def test_real_sigkills_of_the_cli_leave_no_orphans(home, tmp_path):
    """`lorafoundry registry register` killed with SIGKILL: the moment its copy appears (between the copy and its
    row), or a little later; then `registry verify`. Whatever each kill left, only registered dirs remain."""
    exe = Path(sys.executable).with_name("lorafoundry")
    imported = home / "adapters" / "imported"
    for i in range(6):
        src = make_adapter_dir(tmp_path / f"k{i}", seed=40 + i)
        before = _entries(imported)
        proc = subprocess.Popen(
            [str(exe), "registry", "register", str(src), "--name", "killed", "--base-model", "b", "--home", str(home)],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not _entries(imported) - before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.02 * (i % 3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert cli(home, "verify").exit_code == 0
    reg = AdapterRegistry(home / "registry.duckdb")
    in_use = {Path(r.path).name for r in reg.list(name="killed")}
    assert set(_imported_dirs(home)) == in_use  # only what a row points at
    assert all(v.ok for v in reg.verify())


# -- 7. concurrent writers and readers ---------------------------------------------------------------------------


def _writer(args) -> list[tuple[str, int] | str]:
    path, name, dirs, start_at = args
    reg = AdapterRegistry(path, max_wait_s=300)
    time.sleep(max(0.0, start_at - time.time()))  # every writer starts at the same moment
    out: list[tuple[str, int] | str] = []
    for d in dirs:
        try:
            out.append((name, reg.register(NewAdapter(name=name, path=Path(d), base_model="b")).version))
        except Exception as e:  # counted as a failure by the test
            out.append(f"{type(e).__name__}: {e}")
    return out


def _reader(args) -> tuple[list[float], list[str]]:
    """Read in a loop until the file ``done`` exists, as the server's resolver (``name@V``, the plain name), `list`,
    `show` and `sql` do; returns each call's time and the failures."""
    path, name, done = args
    from registry.errors import AdapterNotFoundError

    reg = AdapterRegistry(path, max_wait_s=300)
    calls = (
        lambda: reg.get(f"{name}@1"),
        lambda: next(r for r in reg.servable() if r.name == name),
        lambda: reg.list(name=name),
        lambda: reg.query("SELECT count(*) FROM adapters"),
    )
    times, failures = [], []
    i = 0
    deadline = time.time() + 600
    while not Path(done).exists() and time.time() < deadline:
        t0 = time.perf_counter()
        try:
            calls[i % len(calls)]()
        except (AdapterNotFoundError, StopIteration):
            pass  # before the first version exists
        except Exception as e:
            failures.append(f"{type(e).__name__}: {e}")
        times.append(time.perf_counter() - t0)
        i += 1
    return times, failures


def _burn(stop_at: float) -> None:
    while time.time() < stop_at:
        sum(i * i for i in range(10_000))


READER_MAX_S = 5.0  # any single read, on 2 busy cores; a reader that waited on writers took 10 s and failed


def test_eight_writers_with_readers_under_cpu_load(tmp_path, capsys):
    rounds, writers, per_writer = 2, 8, 10  # the second round writes into a file that already holds rows
    total = writers * per_writer
    dirs = [str(make_adapter_dir(tmp_path / f"d{i}", seed=1000 + i)) for i in range(total)]
    path = tmp_path / "r.duckdb"
    AdapterRegistry(path).init()
    ctx = mp.get_context("spawn")
    failures: list[str] = []
    read_times: list[float] = []
    walls = []
    burners = [ctx.Process(target=_burn, args=(time.time() + 600,)) for _ in range(2)]
    try:
        for b in burners:
            b.start()
        with ctx.Pool(writers + 2) as pool:
            pool.map(time.sleep, [0.1] * (writers + 2))  # workers up before the clock starts
            for rnd in range(rounds):
                name = f"round{rnd}"
                start_at = time.time() + 1.0
                done = tmp_path / f"{name}.done"
                readers = pool.map_async(_reader, [(path, name, done)] * 2)
                results = pool.map(_writer, [(path, name, dirs[i::writers], start_at) for i in range(writers)])
                walls.append(time.time() - start_at)
                done.touch()
                for times, errs in readers.get(120):
                    read_times += times
                    failures += errs
                got = [r for rs in results for r in rs]
                failures += [r for r in got if isinstance(r, str)]
                assert failures == []
                versions = sorted(r[1] for r in got)
                assert versions == list(range(1, total + 1)), name  # every register answered, no gaps or twins
            # Shut the pool down gracefully: Pool.__exit__ terminates its workers with SIGTERM, which CI may have
            # us ignore (the join then waits forever), or which can kill a worker holding the task queue's lock.
            pool.close()
            pool.join()
    finally:
        for b in burners:
            b.kill()  # SIGKILL: CI may start us with SIGTERM ignored, which a child inherits
            b.join()
    reg = AdapterRegistry(path)
    assert failures == []
    assert len(reg.list()) == rounds * total
    for rnd in range(rounds):
        assert [r.version for r in reg.list(name=f"round{rnd}")] == list(range(1, total + 1))
    read_times.sort()
    p50, p99 = statistics.median(read_times), read_times[int(0.99 * len(read_times))]
    with capsys.disabled():
        print(
            f"\n{rounds} rounds x {writers} writers x {per_writer} registers, 2 readers, 2 CPU burners: "
            f"writes per round {', '.join(f'{w:.1f}' for w in walls)} s; {len(read_times)} reads, "
            f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {read_times[-1] * 1000:.0f} ms"
        )
    assert read_times[-1] < READER_MAX_S


def test_readers_do_not_wait_while_a_writer_holds_the_file(home):
    """A writer mid-transaction (its turn taken, the DuckDB file open read-write): the server's resolver, `show`,
    `list` and `sql` answer at once from the snapshot."""
    from serving.resolver import Refusal
    from tests.test_guard import make_resolver

    path = home / "registry.duckdb"
    with file_lock(path.with_name(path.name + ".lock"), 0.0) as held:
        assert held
        con = duckdb.connect(str(path))  # DuckDB's own lock: no other process could open the file now
        con.execute("BEGIN TRANSACTION")
        con.execute("UPDATE adapters SET status = 'archived' WHERE version = 2")
        t0 = time.monotonic()
        resolver = make_resolver(path, HASH, home / "adapters", ttl_s=0)
        assert not isinstance(resolver.resolve("a@1"), Refusal)
        assert not isinstance(resolver.resolve("a:prod"), Refusal)
        assert cli(home, "show", "a@2", "--json").exit_code == 0
        assert cli(home, "list", "--json").exit_code == 0
        assert cli(home, "sql", "SELECT count(*) FROM adapters").exit_code == 0
        assert time.monotonic() - t0 < 3
        con.execute("COMMIT")
        con.close()
    # the writer's change is seen once it is done (here the next reader publishes it, as no writer is at work)
    assert AdapterRegistry(path).get("a@2").status == "archived"
