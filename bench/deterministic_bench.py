"""What `serving.deterministic: true` costs and what it buys, on the real model, in one run.

    lorafoundry run examples/demo.yaml --no-deploy --home /tmp/demo-home      # once: the two demo adapters
    python bench/deterministic_bench.py --home /tmp/demo-home

`lorafoundry serve` is started twice on the same home, one after the other: with the spec as it is (`dtype: auto`,
bfloat16 on a CPU that computes in bf16, float32 on an AVX2-only one) and with `serving.deterministic: true`
(float32). On each:

1. **Batch invariance**: 12 greedy completions (the base and both adapters, 4 prompts each, 24 tokens, top-2
   log-probabilities) sent one at a time, then `--rounds` times all at once; an answer in a batch whose tokens
   differ from its answer alone is a flip, and the margin at the first differing token is printed.
2. **Cost**: tokens/s and p50/p99 latency of 64-token greedy chat completions at 8 clients, `base` and `mixed`
   loads (bench/serve_compare.py's load generator: the `openai` package, not ours), `--reps` windows each,
   interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_assets import envs  # noqa: E402 (after the path is set)

PROMPTS = ["Tom went to the", "The capital of France is", "Apples, mangoes and pears are all", "I loved this film:"]


def greedy(url: str, model: str, prompt: str) -> tuple[list[str], list[dict[str, float]]]:
    """Tokens of a 24-token greedy completion and the top-2 log-probabilities at each position."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 2}
    headers = {"Authorization": f"Bearer {envs.API_KEY.get() or 'none'}"}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=300)
    r.raise_for_status()
    lp = r.json()["choices"][0]["logprobs"]
    return lp["tokens"], lp["top_logprobs"]


def flips(url: str, models: list[str], rounds: int) -> list[str]:
    """Every answer in a batch that is not token for token the same request's answer alone, with its margin."""
    jobs = [(m, p) for m in models for p in PROMPTS]
    alone = {job: greedy(url, *job) for job in jobs}
    found = []
    for k in range(rounds):
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = dict(zip(jobs, pool.map(lambda job: greedy(url, *job), jobs), strict=True))
        for job in jobs:
            (a, top), (b, _) = alone[job], together[job]
            if a != b:
                i = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                best = sorted(top[i].values(), reverse=True) if i < len(top) else [0.0, 0.0]
                found.append(
                    f"round {k + 1}, {job[0]} / {job[1]!r}: token {i} {a[i : i + 1]} alone, "
                    f"{b[i : i + 1]} in the batch (alone's top two {best[0]:.3f} / {best[-1]:.3f})"
                )
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=ROOT / "examples" / "demo.yaml")
    ap.add_argument("--home", type=Path, default=Path("/tmp/demo-home"))
    ap.add_argument("--seconds", type=float, default=15, help="length of one load window")
    ap.add_argument("--reps", type=int, default=3, help="windows per load, interleaved")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4, help="batches of the 12 requests sent at once")
    ap.add_argument("--port", type=int, default=8773)
    args = ap.parse_args()

    import torch

    from bench.serve_compare import load_models, prompts, run_load
    from lora_assets.hardware import resolve_dtype
    from lora_assets.home import Home
    from lora_assets.pipeline import Pipeline
    from lora_assets.spec import load_spec
    from serving.launch import VLLMServer, plan_server

    spec = load_spec(args.spec)
    names = sorted({r.name for r in Pipeline(spec, args.home).registry.servable()})
    if not names:
        sys.exit(
            f"no servable adapters in {args.home}: run `lorafoundry run {args.spec} --no-deploy --home {args.home}`"
        )
    base, msgs = spec.served_base_name, prompts(args.spec.parent)
    print(
        f"{spec.base_model}, adapters {names}, {os.cpu_count()} cores, cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}; {args.clients} clients, 64-token greedy chat completions, "
        f"{args.seconds:.0f} s windows x {args.reps}",
        flush=True,
    )
    results: dict[str, dict[str, list[dict]]] = {}
    for deterministic in (False, True):
        served = spec.model_copy(update={"serving": spec.serving.model_copy(update={"deterministic": deterministic})})
        label = (
            f"deterministic ({resolve_dtype(served.serving.compute_dtype)})"
            if deterministic
            else (f"default ({resolve_dtype(served.serving.compute_dtype)})")
        )
        cmd, env, url, *_ = plan_server(served, args.home, args.port)
        log = Home.at(args.home).logs / f"deterministic-bench-{deterministic}.log"
        with VLLMServer(cmd, env, log, url).start() as server:
            server.wait_ready(600)
            found = flips(url, [base, *names], args.rounds)
            print(f"\n{label}: {len(found)} flips in {args.rounds} rounds of {len(PROMPTS) * (1 + len(names))}")
            for line in found:
                print(f"  {line}")
            for rep in range(args.reps):
                for load in ("base", "mixed"):
                    r = asyncio.run(run_load(url, load_models(load, base, names), args.clients, args.seconds, 64, msgs))
                    results.setdefault(label, {}).setdefault(load, []).append(r)
                    print(
                        f"  {load:6s} rep {rep + 1}: {r['tok_s']:6.1f} tok/s, p50 {r['p50']:.2f} s, "
                        f"p99 {r['p99']:.2f} s",
                        flush=True,
                    )
    print(f"\nmedian over {args.reps} windows")
    labels = list(results)
    for label in labels:
        for load, rs in results[label].items():
            print(
                f"  {label:26s} {load:6s} {statistics.median(r['tok_s'] for r in rs):7.1f} tok/s  "
                f"p50 {statistics.median(r['p50'] for r in rs):.2f} s  "
                f"p99 {statistics.median(r['p99'] for r in rs):.2f} s"
            )
    for load in ("base", "mixed"):
        d, n = (statistics.median(r["tok_s"] for r in results[lab][load]) for lab in (labels[1], labels[0]))
        print(f"  {load}: deterministic / default throughput {d / n:.2f}x")


if __name__ == "__main__":
    main()
