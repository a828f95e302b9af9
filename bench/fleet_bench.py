"""The fleet (`serve --replicas 2`) on the real model, against one server, in one run (issue 28 item 6).

    lorafoundry run examples/demo.yaml --no-deploy --home /tmp/demo-home      # once: the two demo adapters
    python bench/fleet_bench.py --home /tmp/demo-home

Every server is started with the `lorafoundry serve` command line a user runs, on the same home, one after the
other. The client is the `openai` package (AsyncOpenAI, bench/serve_compare.py's `run_load`): closed-loop clients,
64-token greedy chat completions (`ignore_eos`), the demo's prompts. Measured:

1. **2 replicas x 1 CPU against 1 server on 2 CPUs**: mixed load (half base, half the two adapters), tokens/s and
   p50/p99 latency, windows interleaved between the two is not possible (one machine), so each runs --reps windows.
2. **The router's cost**: base-only load (one routing key, so one replica gets it all), sent to that replica's own
   port against the fleet's public port (guard + router + the same replica), windows interleaved; goal >= 0.95x.
3. **Adapter affinity against round robin**: --versions (default 6) versions registered for the bench (copies of
   the categories adapter with one weight changed, so distinct sha256s; archived at the end), more than a
   replica's `--max-loras` / `--max-cpu-loras` (4): the same load over them on a fleet with
   `router_policy: consistent_hash` and one with `round_robin`; adapter loads per 1,000 requests, counted from the
   replicas' logs (the plugin logs every load: at start, on first use and after an eviction), and how many of the
   versions each replica loaded, and the same window's weight loads and evictions as the replicas' workers counted
   them in the public port's `/metrics` (two counts of one thing: they must agree). `--only affinity` runs this part
   alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_compare import load_models, prompts, run_load  # noqa: E402 (after the path is set)
from lora_assets import envs  # noqa: E402

ADMIN = "fleet-bench-admin"
LOADED = b"lorafoundry: loading adapter"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def write_spec(spec, path: Path, port: int, replicas: int, policy: str) -> Path:
    raw = spec.model_dump(mode="json")
    raw["serving"].update(port=port, replicas=replicas, router_policy=policy)
    for name in raw["datasets"]:
        raw["datasets"][name]["path"] = str(spec.dataset_path(name))
    raw.pop("spec_dir", None)
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


class Serve:
    """`lorafoundry serve SPEC --home HOME` as a subprocess, stopped with SIGTERM."""

    def __init__(self, spec_file: Path, home: Path, port: int) -> None:
        cli = Path(sys.executable).parent / "lorafoundry"
        env = {**os.environ, envs.ADMIN_KEY.name: ADMIN, "COLUMNS": "300"}
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [str(cli), "serve", str(spec_file), "--home", str(home)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        t0 = time.monotonic()
        while True:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                sys.exit(f"serve exited with {self.proc.returncode}")
            if line.startswith("serving "):
                break
        self.up_s = time.monotonic() - t0

    def replicas(self) -> list[str]:
        """Each vLLM process's URL (one for a single server)."""
        urls = []
        for p in psutil.Process(self.proc.pid).children():
            cmd = p.cmdline()
            if "vllm.entrypoints.openai.api_server" in " ".join(cmd):
                urls.append(f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}")
        return sorted(urls)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def warm(url: str, models: list[str], msgs) -> None:
    for m in models:
        r = httpx.post(
            f"{url}/v1/chat/completions", json={"model": m, "messages": msgs[0], "max_tokens": 4}, timeout=600
        )
        if r.status_code != 200:
            sys.exit(f"{m}: {r.status_code} {r.text}")


def window(url: str, models: list[str], clients: int, seconds: float, msgs) -> dict:
    return asyncio.run(run_load(url, models, clients, seconds, 64, msgs))


def successes(url: str) -> float:
    """vllm:request_success_total summed, from a replica's own /metrics."""
    text = httpx.get(f"{url}/metrics", headers={"X-Admin-Key": ADMIN}, timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_success_total")
    )


def bench_copies(home: Path, spec, n: int) -> list[str]:
    """n versions of `fleetbench` on the demo base, each the categories champion with one weight changed."""
    from safetensors.torch import load_file, save_file

    from lora_assets.home import Home
    from registry.records import NewAdapter

    reg = Home.at(home).open_registry()
    src = reg.champion("categories")
    refs = []
    for i in range(n):
        d = home / "adapters" / "bench-copies" / f"fleetbench-{time.time_ns()}-{i}"
        d.mkdir(parents=True)
        tensors = load_file(str(Path(src.path) / "adapter_model.safetensors"))
        first = sorted(tensors)[0]
        tensors[first] = tensors[first].clone()
        flat = tensors[first].view(-1)
        k = random.randrange(flat.numel())  # a weight no earlier run changed (register dedupes equal bytes)
        flat[k] = flat[k] * 1.5 + 0.01  # a change bf16 keeps
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text((Path(src.path) / "adapter_config.json").read_text())
        rec = reg.register(
            NewAdapter(
                name="fleetbench", path=d, base_model=src.base_model, base_model_hash=src.base_model_hash,
                promote="manual",
            )
        )  # fmt: skip
        refs.append(f"fleetbench@{rec.version}")
    assert len(set(refs)) == n, refs
    return refs


def log_sizes(home: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in (home / "logs").glob("vllm-replica-*.log")}


def loads_since(sizes: dict[Path, int]) -> tuple[int, list[int]]:
    """Adapter loads logged since ``sizes``, and how many distinct bench versions each replica loaded."""
    count, spread = 0, []
    for path, size in sorted(sizes.items()):
        with path.open("rb") as f:
            f.seek(size)
            lines = [line for line in f.read().splitlines() if LOADED in line]
        count += len(lines)
        spread.append(len({line.split(b"'")[1] for line in lines if b"'fleetbench@" in line}))
    return count, spread


def cache_counters(url: str) -> dict[str, float]:
    """The fleet's adapter weight loads and evictions (by cache) summed over its replicas, from the public port's
    ``/metrics`` (serving/observe.py: counted in each replica's vLLM worker)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers={"X-Admin-Key": ADMIN}, timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("lorafoundry_adapter_weight_loads", "lorafoundry_adapter_evictions"):
            for s in family.samples:
                if s.name.endswith("_total"):
                    key = "loads" if "loads" in family.name else f"evictions ({s.labels['cache']})"
                    out[key] = out.get(key, 0) + s.value
    return out


def summary(rs: list[dict]) -> str:
    tok = statistics.median(r["tok_s"] for r in rs)
    return (
        f"{tok:6.1f} tok/s, p50 {statistics.median(r['p50'] for r in rs):.2f} s, "
        f"p99 {statistics.median(r['p99'] for r in rs):.2f} s ({sum(r['requests'] for r in rs)} requests)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=ROOT / "examples" / "demo.yaml")
    ap.add_argument("--home", type=Path, default=Path("/tmp/demo-home"))
    ap.add_argument("--seconds", type=float, default=20, help="length of one load window")
    ap.add_argument("--reps", type=int, default=2, help="windows per measurement")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--port", type=int, default=8781)
    ap.add_argument("--versions", type=int, default=6, help="bench versions for the affinity part")
    ap.add_argument("--only", choices=["affinity"], help="run one part alone")
    args = ap.parse_args()

    from lora_assets.spec import load_spec

    spec = load_spec(args.spec)
    names = list(spec.adapters)
    msgs = prompts(args.spec.parent)
    scratch = args.home / "bench-specs"
    scratch.mkdir(exist_ok=True)
    print(
        f"{cpu_name()}, {os.cpu_count()} CPUs; base {spec.base_model}, adapters {names}; {args.clients} clients, "
        f"64-token greedy chat completions, {args.seconds:.0f} s windows x {args.reps}",
        flush=True,
    )

    tok = lambda rs: statistics.median(r["tok_s"] for r in rs)  # noqa: E731
    if args.only != "affinity":
        single, two, direct, routed = throughput(args, spec, msgs, scratch)
    affinity = adapter_affinity(args, spec, msgs, scratch)
    print("\nratios (same run, same machine)")
    if args.only != "affinity":
        print(f"  2 replicas x 1 CPU / 1 server x 2 CPUs, mixed: {tok(two) / tok(single):.2f}x tokens/s")
        ratio = tok(routed) / tok(direct)
        print(f"  through the router / straight to the replica, base-only: {ratio:.2f}x (goal >= 0.95)")
    print(
        f"  adapter loads per 1,000 requests over {args.versions} versions: consistent_hash "
        f"{affinity['consistent_hash']:.0f}, round_robin {affinity['round_robin']:.0f}"
    )


def throughput(args, spec, msgs, scratch: Path) -> tuple[list, list, list, list]:
    """Parts 1 and 2: one server against the fleet on mixed load, and the router's cost on base-only load."""
    base, names = spec.served_base_name, list(spec.adapters)
    mixed = load_models("mixed", base, names)
    one = Serve(write_spec(spec, scratch / "one.yaml", args.port, 1, "consistent_hash"), args.home, args.port)
    print(f"\n1 server x 2 CPUs: up in {one.up_s:.0f} s", flush=True)
    try:
        warm(one.url, [base, *names], msgs)
        single = [window(one.url, mixed, args.clients, args.seconds, msgs) for _ in range(args.reps)]
        print(f"  mixed: {summary(single)}", flush=True)
    finally:
        one.stop()
    fleet = Serve(write_spec(spec, scratch / "fleet.yaml", args.port, 2, "consistent_hash"), args.home, args.port)
    print(f"\n2 replicas x 1 CPU behind vllm-router: up in {fleet.up_s:.0f} s", flush=True)
    try:
        warm(fleet.url, [base, *names], msgs)
        two = [window(fleet.url, mixed, args.clients, args.seconds, msgs) for _ in range(args.reps)]
        print(f"  mixed: {summary(two)}", flush=True)
        before = {u: successes(u) for u in fleet.replicas()}
        warm(fleet.url, [base], msgs)
        (replica,) = [u for u in fleet.replicas() if successes(u) > before[u]]  # where the base's key goes
        direct, routed = [], []
        for _ in range(args.reps):
            direct.append(window(replica, [base], args.clients, args.seconds, msgs))
            routed.append(window(fleet.url, [base], args.clients, args.seconds, msgs))
        print(f"  base-only, straight to that replica: {summary(direct)}", flush=True)
        print(f"  base-only, through guard + router:   {summary(routed)}", flush=True)
    finally:
        fleet.stop()
    return single, two, direct, routed


def adapter_affinity(args, spec, msgs, scratch: Path) -> dict[str, float]:
    """Part 3: adapter loads per 1,000 requests over more versions than a replica's LoRA cache, by policy."""
    from lora_assets.home import Home

    refs = bench_copies(args.home, spec, args.versions)
    loads = {}
    try:
        for policy in ("consistent_hash", "round_robin"):
            serve = Serve(write_spec(spec, scratch / f"{policy}.yaml", args.port, 2, policy), args.home, args.port)
            try:
                warm(serve.url, refs, msgs)
                sizes, before = log_sizes(args.home), cache_counters(serve.url)
                rs = [window(serve.url, refs, args.clients, args.seconds, msgs) for _ in range(args.reps)]
                count, spread = loads_since(sizes)
                after = cache_counters(serve.url)
                counted = {k: int(v - before.get(k, 0)) for k, v in sorted(after.items())}
                loads[policy] = 1000 * count / sum(r["requests"] for r in rs)
                print(
                    f"\n{policy}: {len(refs)} versions, {loads[policy]:.0f} adapter loads per 1,000 requests "
                    f"(distinct versions loaded per replica: {spread}); {summary(rs)}\n"
                    f"  logged loads {count}; the replicas' /metrics counted {counted}",
                    flush=True,
                )
            finally:
                serve.stop()
    finally:
        reg = Home.at(args.home).open_registry()
        for ref in refs:
            reg.archive("fleetbench", int(ref.split("@")[1]))
    return loads


if __name__ == "__main__":
    main()
