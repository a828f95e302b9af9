"""Why did docs/benchmarks.md once report 347 tok/s base-only on builtin:tiny (p50 1.44 s for 64 tokens, 8 clients)
when an independent client measured ~3,000 tok/s (p50 0.21 s) on the same model? Re-run that benchmark's own load
(bench/serve_bench.py: 8 threads, a new connection per request, `min_tokens` 64, base only and base + adapters)
on a `lorafoundry serve` server with `--max-lora-rank 64` (as that home had), once per serving dtype.

    python bench/serve_dtype_check.py --home HOME      # HOME: a home where examples/tiny.yaml has been run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_assets import envs  # noqa: E402 (after the path is set)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--spec", type=Path, default=ROOT / "examples" / "tiny.yaml")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--port", type=int, default=8772)
    args = ap.parse_args()

    import torch

    from bench.serve_bench import load
    from lora_assets.hardware import resolve_dtype
    from lora_assets.home import Home
    from lora_assets.pipeline import Pipeline
    from lora_assets.spec import load_spec
    from serving.launch import VLLMServer, plan_server

    spec = load_spec(args.spec)
    names = [a.name for a in Pipeline(spec, args.home).registry.servable()]
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, serving.dtype auto -> {resolve_dtype('auto')}")
    for dtype in ("float32", "bfloat16"):
        served = spec.model_copy(update={"serving": spec.serving.model_copy(update={"dtype": dtype})})
        cmd, env, url, *_ = plan_server(served, args.home, args.port)
        i = cmd.index("--max-lora-rank")
        cmd[i + 1] = "64"  # the seed-ablation home's rank
        env[envs.MAX_LORA_RANK.name] = "64"
        with VLLMServer(cmd, env, Home.at(args.home).logs / f"dtype-check-{dtype}.log", url).start() as server:
            server.wait_ready(600)
            load(url, [served.served_base_name], 5)  # warm up
            base = load(url, [served.served_base_name], args.seconds)
            mixed = load(url, [served.served_base_name, *names, *names], args.seconds)
        for label, r in (("base only", base), ("20% base + adapters", mixed)):
            print(
                f"{dtype:9s} {label:20s} {r['tok_s']:7.1f} tok/s  p50 {r['p50']:.2f} s  p95 {r['p95']:.2f} s  "
                f"({r['requests']} requests)",
                flush=True,
            )


if __name__ == "__main__":
    main()
