"""Registry latency and contention with many registered versions; and the local file against the shared registry.

    python bench/registry_bench.py [--versions 10000] [--writers 8] [--per-writer 25]
    python bench/registry_bench.py --shared [--repeats 100]

Fills a fresh registry with N versions (spread over 100 names, random metrics) by bulk SQL, then measures:
- `list` with a filter (status, metric threshold) and an order by a metric: median and p95 of 50 calls;
- `register` of a new adapter dir without contention: median and p95 of 50 calls (each opens the file, hashes
  the adapter, assigns a version, inserts, logs the event, closes);
- contended throughput: W processes registering K adapters each at the same moment.
The baseline for the two latencies is the same query or insert on an already-open DuckDB connection, measured
in the same run, so the ratio shows what the open-per-operation design costs.

With ``--shared`` it compares, in one run, the three places a registry can live: the local file (the baseline),
the shared registry on Postgres, and the shared registry with its adapters in an S3-compatible store. It starts a
real Postgres (pgserver's binaries) and SeaweedFS's S3 gateway on 127.0.0.1, as the tests do (tests/servers.py), and
prints p50/p99 of `register` (a new adapter each time), of resolving `name@VERSION` and the plain name in a
registry that has not changed since the last read (what a server does between promotions), and of the first
resolve after a register (a new snapshot of the shared registry is copied then).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def adapter_dir(path: Path, seed: int) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})
    )
    rng = np.random.default_rng(seed)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # a name peft writes: register checks
    save_file({name: rng.standard_normal((8, 256), dtype=np.float32)}, str(path / "adapter_model.safetensors"))
    return path


def fill(reg_path: Path, n: int) -> None:
    """n synthetic rows in one INSERT: the one place outside registry/ that writes a registry table in SQL, because
    registering 100,000 versions one by one would take longer than the benchmark (see docs/architecture.md)."""
    import duckdb

    from registry.store import AdapterRegistry

    AdapterRegistry(reg_path).init()
    con = duckdb.connect(str(reg_path))
    con.execute(f"""
        INSERT INTO adapters
        SELECT 'name' || (i % 100), i // 100 + 1,
               CASE WHEN i % 10 = 0 THEN 'rejected' ELSE 'candidate' END, 'builtin:tiny', 'h', 'lora', 8, 16,
               ['q_proj', 'v_proj'], '{{"rank_metric": "exact_match"}}', 'ds' || (i % 7), 'fp', '/x/' || i,
               md5(i::VARCHAR), 1000, 1000,
               json_object('exact_match', json_object('base', 0.0, 'adapter', random()),
                           'eval_loss', json_object('base', 9.0, 'adapter', 1 + random())),
               now()::TIMESTAMP, 'run', '0.1.0'
        FROM range({n}) t(i)""")
    con.close()


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _writer(args) -> int:
    path, dirs, name = args
    from registry.records import NewAdapter
    from registry.store import AdapterRegistry

    reg = AdapterRegistry(path, max_wait_s=600)
    for d in dirs:
        reg.register(NewAdapter(name=name, path=Path(d), base_model="builtin:tiny"))
    return len(dirs)


def _percentiles(ms: list[float]) -> str:
    ms = sorted(ms)
    return f"p50 {statistics.median(ms):7.1f} ms  p99 {ms[min(len(ms) - 1, int(0.99 * len(ms)))]:7.1f} ms"


def _backend_latencies(reg, work: Path, repeats: int) -> dict[str, list[float]]:
    """register, resolve (unchanged registry) and resolve-after-register latencies of one registry."""
    from registry.records import NewAdapter

    dirs = iter([adapter_dir(work / f"a{i}", i) for i in range(2 * repeats)])
    register = timed(lambda: reg.register(NewAdapter(name="bench", path=next(dirs), base_model="b")), repeats)
    versions = iter(range(1, repeats + 1))
    resolve = timed(lambda: reg.get(f"bench@{next(versions)}"), repeats)
    plain = timed(lambda: next(r for r in reg.servable() if r.name == "bench"), repeats)
    after = []
    for _ in range(repeats // 4):
        reg.register(NewAdapter(name="bench", path=next(dirs), base_model="b"))
        after += timed(lambda: reg.get("bench@1"), 1)
    return {"register": register, "resolve name@V": resolve, "resolve name": plain, "resolve after a write": after}


def compare_shared(repeats: int) -> None:
    """The local file against the shared registry (and its adapter store), on real servers, in one run."""
    import os
    import uuid

    import psycopg

    from lora_assets.hardware import cpu_identity
    from registry.store import AdapterRegistry
    from tests.servers import ObjectStore, Postgres, running

    work = Path(tempfile.mkdtemp(prefix="registry-bench-"))
    results = {}
    with running(Postgres, Postgres.init) as pg, running(ObjectStore, ObjectStore.start) as s3:
        os.environ.update(pg.env() | s3.env())
        with psycopg.connect(pg.admin_url, autocommit=True) as con:
            names = [f"bench_{uuid.uuid4().hex[:8]}" for _ in range(2)]
            for name in names:
                con.execute(f"CREATE DATABASE {name} OWNER lorafoundry")
        urls = [pg.url.rsplit("/", 1)[0] + "/" + name for name in names]
        backends = {
            "local file": AdapterRegistry(work / "registry.duckdb"),
            "shared (Postgres)": AdapterRegistry(urls[0]),
            "shared + store (Postgres, S3)": AdapterRegistry(urls[1], store=f"{s3.url}/bench"),
        }
        for i, (label, reg) in enumerate(backends.items()):
            results[label] = _backend_latencies(reg, work / f"backend{i}", repeats)
    model, flags = cpu_identity(Path("/proc/cpuinfo").read_text())
    cpu = f"CPU {model} ({os.cpu_count()} cores; {' '.join(flags)})"
    print(f"registry: local file against shared, {repeats} calls each; {cpu}")
    base = results["local file"]
    for what in base:
        print(what)
        for label, res in results.items():
            ratio = statistics.median(res[what]) / statistics.median(base[what])
            print(f"  {label:30s} {_percentiles(res[what])}   {ratio:5.1f}x the local file's p50")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", type=int, default=10_000)
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--per-writer", type=int, default=25)
    ap.add_argument("--shared", action="store_true", help="compare the local file with the shared registry")
    ap.add_argument("--repeats", type=int, default=100, help="calls per measurement with --shared")
    args = ap.parse_args()
    if args.shared:
        compare_shared(args.repeats)
        return

    import duckdb

    from registry.records import NewAdapter
    from registry.store import AdapterRegistry

    work = Path(tempfile.mkdtemp(prefix="registry-bench-"))
    path = work / "registry.duckdb"
    fill(path, args.versions)
    reg = AdapterRegistry(path)

    def do_list():
        rows = reg.list(status="candidate", min_metric={"exact_match": 0.5}, order_by="eval_loss", limit=100)
        assert len(rows) == 100

    list_ms = timed(do_list, 50)
    con = duckdb.connect(str(path))
    sql = (
        "SELECT * FROM adapters WHERE status = 'candidate' AND CAST(json_extract(metrics, '$.exact_match.adapter') "
        "AS DOUBLE) >= 0.5 ORDER BY CAST(json_extract(metrics, '$.eval_loss.adapter') AS DOUBLE) LIMIT 100"
    )
    list_base = timed(lambda: con.execute(sql).fetchall(), 50)
    con.close()

    dirs = [adapter_dir(work / "new" / f"a{i}", i) for i in range(50)]
    it = iter(dirs)
    reg_ms = timed(lambda: reg.register(NewAdapter(name="fresh", path=next(it), base_model="builtin:tiny")), 50)
    con = duckdb.connect(str(path))
    k = iter(range(10**6, 10**7))
    insert_sql = "INSERT INTO events VALUES (now()::TIMESTAMP, 'bench', 'register', 'fresh', ?, '{}')"
    reg_base = timed(lambda: con.execute(insert_sql, [next(k)]), 50)
    con.close()

    total = args.writers * args.per_writer
    wdirs = [str(adapter_dir(work / "contended" / f"c{i}", 10_000 + i)) for i in range(total)]
    jobs = [(path, wdirs[i :: args.writers], f"contended{i % 2}") for i in range(args.writers)]
    with mp.get_context("spawn").Pool(args.writers) as pool:
        pool.map(_writer, [(path, [], "warm")] * args.writers)  # start the workers before timing
        t0 = time.perf_counter()
        done = sum(pool.map(_writer, jobs))
        wall = time.perf_counter() - t0
    versions = reg.query(
        "SELECT name, count(*), max(version) FROM adapters WHERE name LIKE 'contended%' GROUP BY 1 ORDER BY 1"
    )[1]
    gapless = all(c == m for _, c, m in versions)

    def stats(ms: list[float]) -> str:
        return f"median {statistics.median(ms):6.1f} ms  p95 {sorted(ms)[int(0.95 * len(ms)) - 1]:6.1f} ms"

    print(f"registry with {args.versions:,} versions (100 names), 2 cores")
    print(f"list (status + metric filter, order by metric, limit 100): {stats(list_ms)}   goal median <= 50 ms")
    print(
        f"  same SQL on an open connection:                          {stats(list_base)}"
        f"   ratio {statistics.median(list_ms) / statistics.median(list_base):.1f}x"
    )
    print(f"register (open, hash, version, insert, event, close):      {stats(reg_ms)}   goal median <= 20 ms")
    print(
        f"  one INSERT on an open connection:                        {stats(reg_base)}"
        f"   ratio {statistics.median(reg_ms) / statistics.median(reg_base):.1f}x"
    )
    print(
        f"contended: {args.writers} processes x {args.per_writer} registers = {done} in {wall:.2f} s = "
        f"{done / wall:.0f} registers/s; versions gapless per name: {gapless}"
    )


if __name__ == "__main__":
    main()
