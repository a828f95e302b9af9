"""Serving on the real model: plain vLLM (LoRA off, LoRA on) against `lorafoundry serve`, one client, one run.

    lorafoundry run examples/demo.yaml --no-deploy --home /tmp/demo-home      # once: the two demo adapters
    python bench/serve_compare.py --home /tmp/demo-home

Servers, started one after the other on the same base model dir and the same registered adapters (--servers):
1. `off`, plain vLLM, LoRA off: `python -m vllm.entrypoints.openai.api_server --model BASE` with
   `VLLM_PLUGINS=none` (lorafoundry's vLLM plugin is not loaded);
2. `on`, plain vLLM, LoRA on: the same plus `--enable-lora --lora-modules NAME=PATH ...` (no plugin, no guard);
3. `lorafoundry`, `lorafoundry serve`: the command and environment `lorafoundry serve` uses (plugin, registry
   resolver, guard), compiled (`serving.compile`, the default);
4. `eager`, the same with `serving.compile: false` (`--enforce-eager`), not run unless asked for.

The client is the `openai` package (AsyncOpenAI), not ours: closed-loop clients, each sending chat completions of
exactly --tokens tokens (`ignore_eos`), greedy, prompts taken from the demo's data, keep-alive connections. Loads:
`base` (every request to the base), `mixed` (half to the base, half to the adapters in equal shares) and
`adapters` (the adapters in equal shares). Each load runs --reps times for --seconds, interleaved with the other
loads on the same server, at each client count of --clients (default 8 and 32). With --curve, instead, each
server's saturating-load curve: clients from 8, doubled until throughput grows by less than 5% (or 256 clients),
base-only on each server and mixed on the two with LoRA on.
Tokens/s counts completion tokens over the window's wall time (in-flight requests are waited for).
With --together, the servers are started one after the other but kept up together, each on its own port, and every
rep runs each server's loads in turn (the servers' order rotated each rep): on a machine whose speed drifts by tens
of percent over half an hour (the AMX Xeon VM of docs/benchmarks.md), ratios between servers mean something only
from windows taken this way.
The first lines printed name the CPU. To measure another CPU of this machine kind's code paths on this one (an
AVX2-only or an AVX-512-BF16 EPYC on an AMX Xeon), run it under bench/cpu_standin:
`BENCH_CPU_STANDIN=avx2 PYTHONPATH=bench/cpu_standin python bench/serve_compare.py ...` (a stand-in: the other
CPU's instruction sets, this machine's caches and memory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_assets import envs  # noqa: E402 (after the path is set)

LOADS = ("base", "mixed", "adapters")


def describe_cpu() -> str:
    """The CPU the figures are of: its model and relevant flags, the number format `auto` means, and the stand-in
    (bench/cpu_standin) when one is set."""
    from lora_assets.hardware import compute_record

    rec = compute_record()
    standin = os.environ.get("BENCH_CPU_STANDIN")
    line = f"CPU: {rec['cpu']} ({', '.join(rec['cpu_flags'])}), computing in {rec['dtype']}"
    return line + (f"; standing in for {standin} (bench/cpu_standin)" if standin else "")


def load_models(load: str, base: str, adapters: list[str]) -> list[str]:
    """The round-robin model list of a load: base only, half base / half adapters, adapters only."""
    if load == "base":
        return [base]
    if load == "adapters":
        return list(adapters)
    return [m for a in adapters for m in (base, a)]


def prompts(spec_dir: Path) -> list[list[dict]]:
    """Chat prompts from the demo's two datasets (user turns only), alternating."""
    rows = []
    for name in ("categories", "sentiment"):
        for line in (spec_dir / "data" / "smollm2" / f"{name}.jsonl").read_text().splitlines()[:8]:
            r = json.loads(line)
            text = r["messages"][0]["content"] if "messages" in r else r["instruction"]
            rows.append([{"role": "user", "content": text}])
    return rows[::2] + rows[1::2]


async def run_load(url: str, models: list[str], clients: int, seconds: float, tokens: int, msgs) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key=envs.API_KEY.get() or "none", timeout=600)
    latencies: list[float] = []
    done_tokens = 0
    deadline = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal done_tokens
        k = i
        while time.monotonic() < deadline:
            model, m = models[k % len(models)], msgs[k % len(msgs)]
            k += 1
            t0 = time.perf_counter()
            r = await client.chat.completions.create(
                model=model,
                messages=m,
                max_tokens=tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            latencies.append(time.perf_counter() - t0)
            done_tokens += r.usage.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return {"tok_s": done_tokens / wall, "p50": statistics.median(latencies), "p99": p99, "requests": len(latencies)}


def saturate(url: str, models: list[str], seconds: float, tokens: int, msgs, growth: float = 1.05) -> list[dict]:
    """Throughput at 8, 16, 32 ... clients, until one doubling adds less than ``growth`` - 1 (or at 256)."""
    rows: list[dict] = []
    clients = 8
    while clients <= 256:
        r = asyncio.run(run_load(url, models, clients, seconds, tokens, msgs)) | {"clients": clients}
        rows.append(r)
        print(
            f"  curve {'+'.join(sorted(set(models)))[:40]:40s} {clients:3d} clients: {r['tok_s']:6.1f} tok/s, "
            f"p50 {r['p50']:.2f} s, p99 {r['p99']:.2f} s",
            flush=True,
        )
        if len(rows) > 1 and r["tok_s"] < growth * rows[-2]["tok_s"]:
            break
        clients *= 2
    return rows


def server_log(home: Path, label: str) -> Path:
    """Where a server's output goes: ``<home>/logs/serve-compare-<last word group of its label>.log``."""
    from lora_assets.home import Home

    return Home.at(home).logs / f"serve-compare-{label.split(',')[-1].strip().replace(' ', '-')}.log"


def warm(url: str, models, msgs) -> None:
    """One short request to each model: every adapter loaded before timing."""
    import httpx

    for m in models:
        httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": m, "messages": msgs[0], "max_tokens": 4},
            timeout=300,
            headers={"Authorization": f"Bearer {envs.API_KEY.get() or 'none'}"},
        ).raise_for_status()


def together(servers: dict, args, base: str, names: list[str], msgs, counts: list[int]) -> dict:
    """--together: every server up at once, each on its own port, loaded one at a time; each rep runs every
    server's loads, the servers' order rotated by one each rep. A machine whose speed drifts over minutes then
    moves every server's windows alike (an idle vLLM server uses ~0.1 s of CPU in a 15 s window)."""
    from contextlib import ExitStack

    from serving.launch import VLLMServer

    results: dict[str, dict] = {}
    with ExitStack() as stack:
        urls = {}
        for label, (cmd, env, loads) in servers.items():  # one start at a time: no overlap
            url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
            log = server_log(args.home, label)
            t0 = time.perf_counter()
            server = stack.enter_context(VLLMServer(cmd, env, log, url).start())
            server.wait_ready(600)
            warm(url, {base, *names} if len(loads) > 1 else {base}, msgs)
            urls[label] = url
            print(f"{label}: up in {time.perf_counter() - t0:.0f} s on {url} ({log.name})", flush=True)
        labels = list(servers)
        for clients in counts:
            for rep in range(args.reps):
                for label in labels[rep % len(labels) :] + labels[: rep % len(labels)]:
                    for load in servers[label][2]:
                        models = load_models(load, base, names)
                        r = asyncio.run(run_load(urls[label], models, clients, args.seconds, args.tokens, msgs))
                        results.setdefault(label, {}).setdefault(f"{load}@{clients}", []).append(r)
                        print(
                            f"  {label:22s} {load:8s} {clients:2d} clients, rep {rep + 1}: {r['tok_s']:6.1f} tok/s, "
                            f"p50 {r['p50']:.2f} s, {r['requests']} requests",
                            flush=True,
                        )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=ROOT / "examples" / "demo.yaml")
    ap.add_argument("--home", type=Path, default=Path("/tmp/demo-home"))
    ap.add_argument("--seconds", type=float, default=15, help="length of one load window")
    ap.add_argument("--reps", type=int, default=3, help="windows per (load, concurrency), interleaved")
    ap.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    ap.add_argument("--port", type=int, default=8771)
    ap.add_argument("--clients", default="8,32", help="comma-separated concurrent client counts")
    ap.add_argument("--curve", action="store_true", help="saturating-load curves instead of the --clients table")
    ap.add_argument(
        "--servers", default="off,on,lorafoundry", help="which servers: off, on, lorafoundry (compiled), eager"
    )
    ap.add_argument("--out", type=Path, help="write the raw results here as JSON")
    ap.add_argument(
        "--together",
        action="store_true",
        help="start the servers at once, each on its own port (--port + 0, 1, 2, 3 for off, on, lorafoundry, "
        "eager), and rotate the windows among them",
    )
    args = ap.parse_args()
    if args.together and args.curve:
        ap.error("--together times the --clients table; run --curve without it")

    from lora_assets.pipeline import Pipeline
    from lora_assets.spec import load_spec
    from serving.launch import VLLMServer, build_vllm_command, plan_server, server_env

    spec = load_spec(args.spec)
    pipe = Pipeline(spec, args.home)
    adapters = [r for r in pipe.registry.servable(verify=True) if r.base_model_hash == pipe.base.content_hash]
    if not adapters:
        sys.exit(
            f"no servable adapters on {spec.base_model} in {args.home}: run `lorafoundry run {args.spec} "
            f"--no-deploy --home {args.home}` first."
        )
    base = spec.served_base_name
    names = [a.name for a in adapters]
    msgs = prompts(args.spec.parent)
    url = f"http://{spec.serving.host}:{args.port}"
    plain_env = server_env(spec.serving) | {"VLLM_PLUGINS": "none"}
    # with --together each server has its own port: off, on, lorafoundry, eager = --port + 0, 1, 2, 3
    p_off, p_on, p_lf, p_eager = (args.port + i * args.together for i in range(4))
    lf_cmd, lf_env, *_ = plan_server(spec, args.home, p_lf)
    eager = spec.model_copy(update={"serving": spec.serving.model_copy(update={"compile": False})})
    eager_cmd, eager_env, *_ = plan_server(eager, args.home, p_eager)
    servers = {
        "plain vLLM, LoRA off": (
            build_vllm_command(pipe.base.path, base, [], spec.serving, port=p_off),
            plain_env,
            ("base",),
        ),
        "plain vLLM, LoRA on": (
            build_vllm_command(pipe.base.path, base, adapters, spec.serving, port=p_on),
            plain_env,
            LOADS,
        ),
        "lorafoundry serve": (lf_cmd, lf_env, LOADS),
        "lorafoundry serve, eager": (eager_cmd, eager_env, LOADS),
    }
    if args.curve:  # one load generator on one address: lift the guard's per-address connection cap (64), as an
        for env in (lf_env, eager_env):  # operator does for a load balancer in front
            env[envs.MAX_CONNECTIONS_PER_CLIENT.name] = "1024"
    wanted = {
        "off": "plain vLLM, LoRA off",
        "on": "plain vLLM, LoRA on",
        "lorafoundry": "lorafoundry serve",
        "eager": "lorafoundry serve, eager",
    }
    servers = {label: v for label, v in servers.items() if label in {wanted[k] for k in args.servers.split(",")}}
    print(
        f"base {spec.base_model} ({pipe.base.path.name}), adapters {names}, {os.cpu_count()} cores, "
        f"{args.tokens}-token greedy chat completions (ignore_eos), {args.seconds:.0f} s windows x {args.reps}",
        flush=True,
    )
    cpu = describe_cpu()
    print(cpu, flush=True)

    results: dict[str, dict] = {}
    counts = [int(c) for c in args.clients.split(",")]
    if args.together:
        results = together(servers, args, base, names, msgs, counts)
    for label, (cmd, env, loads) in servers.items() if not args.together else ():
        log = server_log(args.home, label)
        t0 = time.perf_counter()
        with VLLMServer(cmd, env, log, url).start() as server:
            server.wait_ready(600)
            up = time.perf_counter() - t0
            warm(url, {base, *names} if len(loads) > 1 else {base}, msgs)
            print(f"\n{label}: up in {up:.0f} s ({log.name})", flush=True)
            if args.curve:  # where does throughput stop growing?
                for load in loads[:2]:
                    models = load_models(load, base, names)
                    results.setdefault(label, {})[load] = saturate(url, models, args.seconds, args.tokens, msgs)
                continue
            for clients in counts:
                for rep in range(args.reps):
                    for load in loads:
                        r = asyncio.run(
                            run_load(url, load_models(load, base, names), clients, args.seconds, args.tokens, msgs)
                        )
                        results.setdefault(label, {}).setdefault(f"{load}@{clients}", []).append(r)
                        print(
                            f"  {load:8s} {clients:2d} clients, rep {rep + 1}: {r['tok_s']:6.1f} tok/s, "
                            f"p50 {r['p50']:.2f} s, {r['requests']} requests",
                            flush=True,
                        )

    if args.curve:
        if args.out:
            args.out.write_text(json.dumps({"cpu": cpu, "curve": results}, indent=1))
        return

    def med(label: str, key: str) -> float:
        return statistics.median(r["tok_s"] for r in results[label][key])

    print(f"\nmedian tok/s over {args.reps} windows [min-max]")
    for label, by_key in results.items():
        for key, rs in by_key.items():
            ts = [r["tok_s"] for r in rs]
            print(
                f"  {label:22s} {key:12s} {statistics.median(ts):7.1f} [{min(ts):.1f}-{max(ts):.1f}]  "
                f"p50 latency {statistics.median(r['p50'] for r in rs):.2f} s"
            )
    lf, off, on = "lorafoundry serve", "plain vLLM, LoRA off", "plain vLLM, LoRA on"
    lf_eager = "lorafoundry serve, eager"
    for c in counts if {lf, off} <= set(results) else ():  # the ratios need lorafoundry serve and plain LoRA off
        print(f"\n{c} clients:")
        for label in (x for x in (on, lf_eager, lf) if x in results):
            print(
                f"  {label:22s} mixed / its base-only: {med(label, f'mixed@{c}') / med(label, f'base@{c}'):.2f}x "
                f"(goal >= 0.85); adapters / base-only: "
                f"{med(label, f'adapters@{c}') / med(label, f'base@{c}'):.2f}x"
            )
        print(
            f"  lorafoundry base-only / plain vLLM LoRA off: {med(lf, f'base@{c}') / med(off, f'base@{c}'):.2f}x "
            "(goal >= 0.9)"
        )
        for label in (x for x in (on, lf_eager) if x in results):
            print(f"  {label} base-only / plain LoRA off: {med(label, f'base@{c}') / med(off, f'base@{c}'):.2f}x")
        if lf_eager in results:
            for load in LOADS:
                ratio = med(lf, f"{load}@{c}") / med(lf_eager, f"{load}@{c}")
                print(f"  lorafoundry compiled / eager, {load}: {ratio:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu, "clients": counts, "results": results}, indent=1))


if __name__ == "__main__":
    main()
