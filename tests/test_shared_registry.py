"""The registry shared by several machines (registry/shared.py) on a real Postgres started by the test session
(tests/servers.py): two homes stand for two machines and share nothing but the database. Versions stay gapless
under writers on both, readers never wait for writers, `registry sql` is as closed as on the local file, and a
server that goes away mid-write is a clear error that changes nothing. The behaviour every registry has is proven
on both backends by tests/test_registry.py (`registry_location`)."""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from lora_assets import envs
from orchestration.cli import app
from registry.errors import RegistryInputError
from registry.records import NewAdapter
from registry.shared import SharedRegistry
from registry.store import AdapterRegistry
from tests.conftest import ROOT
from tests.test_registry_security import HOSTILE_SQL, cli, make_adapter_dir, refused


def _use(monkeypatch, url: str) -> None:
    """Point this process's registry (and the CLI's) at ``url``, as a machine of the team is configured."""
    monkeypatch.setenv(envs.REGISTRY_URL.name, url)


@pytest.mark.parametrize("sql", HOSTILE_SQL)
def test_sql_on_the_shared_registry_reaches_no_file_or_setting(shared_registry, monkeypatch, tmp_path, sql):
    reg = AdapterRegistry(shared_registry)
    reg.register(NewAdapter(name="a", path=make_adapter_dir(tmp_path / "a1"), base_model="b"))
    _use(monkeypatch, shared_registry)
    out = tmp_path / "outside" / "leak.csv"
    out.parent.mkdir()
    text = refused(cli(tmp_path / "home", "sql", sql.format(out=out)), "query failed")
    assert "read-only" in text
    assert list(out.parent.iterdir()) == []
    assert [(r.name, r.version) for r in reg.list()] == [("a", 1)]  # and the rows are all there


def test_the_cli_reads_and_writes_the_shared_registry(shared_registry, monkeypatch, tmp_path):
    _use(monkeypatch, shared_registry)
    home = tmp_path / "home"
    res = cli(home, "register", str(make_adapter_dir(tmp_path / "ext")), "--name", "a", "--base-model", "b")
    assert res.exit_code == 0, res.output
    assert cli(home, "alias", "a@1", "prod").exit_code == 0
    res = cli(home, "sql", "SELECT name, version, alias FROM aliases")
    assert res.exit_code == 0 and "prod" in res.output, res.output
    assert not (home / "registry.duckdb").exists()  # nothing went to a local file


def test_a_password_in_the_url_is_refused_and_never_shown(postgres, tmp_path, monkeypatch):
    url = postgres.url.replace("lorafoundry@", f"lorafoundry:{postgres.password}@")
    with pytest.raises(RegistryInputError, match="PGPASSWORD") as e:
        AdapterRegistry(url).list()
    assert postgres.password not in str(e.value) and "lorafoundry:***@" in str(e.value)
    _use(monkeypatch, url)  # in the environment: every command refuses to start, exit 2, the value not shown
    monkeypatch.setenv(envs.ARTIFACTS.name, "/not/a/bucket")
    for args in (["registry", "list"], ["validate", str(ROOT / "examples" / "tiny.yaml")], ["stop"]):
        res = CliRunner().invoke(app, args)
        flat = " ".join(res.output.split())
        assert res.exit_code == 2 and "Traceback" not in flat, res.output
        assert f"{envs.REGISTRY_URL.name} (its value not shown)" in flat and "PGPASSWORD" in flat, flat
        assert f"{envs.ARTIFACTS.name}='/not/a/bucket'" in flat and postgres.password not in flat, flat


def test_a_wrong_password_or_no_server_is_a_clear_error(postgres, shared_registry, monkeypatch, tmp_path):
    monkeypatch.setenv("PGPASSWORD", "wrong")
    _use(monkeypatch, shared_registry)
    refused(cli(tmp_path / "home", "list"), "shared registry at postgresql://lorafoundry@127.0.0.1", "unavailable")
    unused = shared_registry.replace(f":{postgres.port}/", ":1/")
    _use(monkeypatch, unused)
    refused(cli(tmp_path / "home", "list"), "unavailable", "Connection refused")


def test_readers_never_wait_for_a_writer_mid_transaction(postgres, shared_registry, tmp_path):
    """A writer holds its turn (the advisory lock, inside an open transaction): lists, lookups and SQL on another
    connection answer at once, and another writer waits for its turn and then succeeds."""
    from registry.shared import _WRITER_LOCK

    reg = AdapterRegistry(shared_registry, max_wait_s=30)
    reg.register(NewAdapter(name="a", path=make_adapter_dir(tmp_path / "a1"), base_model="b"))
    with psycopg.connect(shared_registry, password=postgres.password) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", [_WRITER_LOCK])
        holder.execute("UPDATE catalog_state SET generation = generation")  # a write in progress
        t0 = time.perf_counter()
        assert reg.get("a").version == 1
        assert [r.version for r in reg.list()] == [1]
        assert reg.query("SELECT count(*) FROM events")[1] == [(1,)]
        assert time.perf_counter() - t0 < 1.0
        busy = AdapterRegistry(shared_registry, max_wait_s=1)
        with pytest.raises(Exception, match="another writer kept it"):
            busy.register(NewAdapter(name="a", path=make_adapter_dir(tmp_path / "a2", seed=2), base_model="b"))
        holder.rollback()
    assert (
        reg.register(NewAdapter(name="a", path=make_adapter_dir(tmp_path / "a2", seed=2), base_model="b")).version == 2
    )


# -- two machines, sixteen writers, one reader -----------------------------------------------------------------


def _writer(args) -> list[int | str]:
    url, password, name, dirs, start_at = args
    os.environ["PGPASSWORD"] = password
    reg = AdapterRegistry(url, max_wait_s=300)
    time.sleep(max(0.0, start_at - time.time()))
    out: list[int | str] = []
    for d in dirs:
        try:
            out.append(reg.register(NewAdapter(name=name, path=Path(d), base_model="b")).version)
        except Exception as e:
            out.append(f"{type(e).__name__}: {e}")
    return out


def _reader(args) -> tuple[list[float], list[str]]:
    url, password, done = args
    os.environ["PGPASSWORD"] = password
    from registry.errors import AdapterNotFoundError

    reg = AdapterRegistry(url, max_wait_s=300)
    calls = (lambda: reg.get("shared"), lambda: reg.list(name="shared"), lambda: reg.servable())
    times: list[float] = []
    failures: list[str] = []
    i = 0
    while not Path(done).exists() and len(times) < 100_000:
        t0 = time.perf_counter()
        try:
            calls[i % len(calls)]()
        except AdapterNotFoundError:
            pass  # before the first version
        except Exception as e:
            failures.append(f"{type(e).__name__}: {e}")
        times.append(time.perf_counter() - t0)
        i += 1
    return times, failures


@pytest.mark.slow
def test_sixteen_writers_on_two_machines_and_a_reader(postgres, shared_registry, tmp_path, capsys):
    """Home A and home B (two machines: each its own adapters dir) run 8 writers each, 10 registrations per writer,
    all under one name at the same moment: 160 versions, 1..160 with no gap or twin, no error; a reader on a third
    home lists and looks up throughout, and no read waits for the writers' queue (each read well under the time
    the 160 writes take together; on an idle 2-core machine reads take 0.1-0.5 s, 17 processes sharing 2 cores)."""
    homes = {m: tmp_path / f"machine-{m}" for m in "AB"}
    dirs = {
        m: [
            str(make_adapter_dir(homes[m] / "adapters" / f"d{i}", seed=i + (0 if m == "A" else 500))) for i in range(80)
        ]
        for m in "AB"
    }
    AdapterRegistry(shared_registry).init()
    done = tmp_path / "done"
    ctx = mp.get_context("spawn")
    with ctx.Pool(17) as pool:
        pool.map(time.sleep, [0.1] * 17)  # every worker up before the clock starts
        start_at = time.time() + 1.0
        reader = pool.map_async(_reader, [(shared_registry, postgres.password, str(done))])
        jobs = [(shared_registry, postgres.password, "shared", dirs[m][i::8], start_at) for m in "AB" for i in range(8)]
        results = pool.map(_writer, jobs)
        wall = time.time() - start_at
        done.touch()
        ((times, failures),) = reader.get(120)
        pool.close()
        pool.join()
    got = [v for r in results for v in r]
    failures += [v for v in got if isinstance(v, str)]
    assert failures == []
    assert sorted(got) == list(range(1, 161))
    reg = AdapterRegistry(shared_registry)
    assert [r.version for r in reg.list(name="shared")] == list(range(1, 161))
    times.sort()
    p50, p99 = statistics.median(times), times[int(0.99 * len(times))]
    with capsys.disabled():
        print(
            f"\n16 writers x 10 registers on 2 homes: {wall:.1f} s; reader: {len(times)} reads, p50 {p50 * 1000:.0f} "
            f"ms, p99 {p99 * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms"
        )
    assert times[-1] < max(1.0, wall / 3)  # queued behind the writers, a read would wait about the whole wall


def test_the_server_stopped_mid_register_changes_nothing(postgres, shared_registry, monkeypatch, tmp_path):
    """`registry register` in its own process, inside its transaction (waiting for its turn, which the test holds),
    when Postgres stops: exit 1, a message naming the service with no password, and afterwards the registry holds
    exactly what it held: same versions, aliases and events, and the next register takes the next version."""
    from registry.shared import _WRITER_LOCK

    reg = AdapterRegistry(shared_registry)
    reg.register(NewAdapter(name="a", path=make_adapter_dir(tmp_path / "a1"), base_model="b"))
    reg.set_alias("a", "prod", 1)
    before = (reg.list(), reg.aliases("a"), reg.events("a"))
    env = {**os.environ, envs.REGISTRY_URL.name: shared_registry, "PGPASSWORD": postgres.password}
    args = [
        sys.executable,
        "-m",
        "orchestration.cli",
        "registry",
        "register",
        str(make_adapter_dir(tmp_path / "a2", seed=2)),
    ]
    args += ["--name", "a", "--base-model", "b", "--home", str(tmp_path / "home")]
    holder = psycopg.connect(shared_registry, password=postgres.password)
    try:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", [_WRITER_LOCK])
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the register waits for its turn inside its transaction
            waiting = holder.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()[0]
            if waiting:
                break
            time.sleep(0.05)
        assert waiting, "the register never reached its transaction"
        postgres.stop()
        out, _ = proc.communicate(timeout=60)
    finally:
        holder.close()
        postgres.start()
    assert proc.returncode == 1, out
    assert "Traceback" not in out and postgres.password not in out
    assert "shared registry at postgresql://lorafoundry@127.0.0.1" in " ".join(out.split()), out
    assert (reg.list(), reg.aliases("a"), reg.events("a")) == before
    assert (
        reg.register(NewAdapter(name="a", path=make_adapter_dir(tmp_path / "a3", seed=3), base_model="b")).version == 2
    )


def test_a_snapshot_dir_others_may_write_is_refused(shared_registry, tmp_path):
    """This machine's snapshots are read as the registry: a dir another user could write to is not used."""
    folder = tmp_path / "snapshots"
    shared = SharedRegistry(shared_registry, 10, snapshots=folder)
    shared.snapshot()
    shared.snapshot_dir.chmod(0o777)
    with pytest.raises(Exception, match="others may write"):
        shared.snapshot()


def test_a_writer_killed_inside_its_transaction_leaves_nothing_and_frees_the_turn(postgres, shared_registry, tmp_path):
    """SIGKILL of a writer that holds the writers' turn with a row inserted: Postgres rolls its transaction back when
    the connection drops, the row is gone, and the next writer gets the turn at once and the next version."""
    reg = AdapterRegistry(shared_registry)
    reg.register(NewAdapter(name="a", path=make_adapter_dir(tmp_path / "a1"), base_model="b"))
    script = (
        "import sys, time\n"
        "from registry.shared import SharedRegistry\n"
        "def op(con):\n"
        "    con.execute(\"INSERT INTO events VALUES (now(), 'killed', 'register', 'a', 2, '{}')\")\n"
        "    print('inside', flush=True)\n"
        "    time.sleep(600)\n"
        "SharedRegistry(sys.argv[1], 60).write(op)\n"
    )
    env = {**os.environ, "PGPASSWORD": postgres.password}
    proc = subprocess.Popen([sys.executable, "-c", script, shared_registry], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "inside"
        proc.kill()
        proc.wait(10)
    finally:
        proc.kill()
    started = time.monotonic()
    rec = reg.register(NewAdapter(name="a", path=make_adapter_dir(tmp_path / "a2", seed=2), base_model="b"))
    assert rec.version == 2 and time.monotonic() - started < 5
    assert "killed" not in {e["actor"] for e in reg.events("a")}
