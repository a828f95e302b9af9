"""QLoRA against LoRA on one base: a randomly initialised Llama (default ~150 M parameters) or the real
SmolLM2-135M-Instruct (`--size smollm2`): peak memory and time.

    python bench/qlora_bench.py [--size 150m|smollm2] [--steps 12] [--batch-size 4] [--max-seq-len 256]

Each method trains in its own process through lorafoundry's trainer (`train_adapter`, `max_steps` smoke run,
same data, seed and LoRA config: r=16, alpha=32, all seven projections). LoRA holds the frozen base in the
machine's fast format (bf16 where native, else fp32: lora_assets.hardware); QLoRA in 4-bit NF4 with double
quantization, computing in that same format (bitsandbytes). Reported per method: seconds per
step (training loop only), peak memory during training (CUDA: max allocated; CPU: process RSS sampled every
step), the same minus the process's RSS before the model was loaded (what the model and training state add),
and the process's lifetime max RSS (model loading included).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(method: str, args) -> dict:
    import torch  # noqa: F401  (imported before the baseline RSS is taken)
    import transformers  # noqa: F401

    from bench._common import bench_spec, mixed_length_rows, random_llama, write_jsonl
    from lora_assets.pipeline import Pipeline
    from lora_assets.train import _rss_bytes, train_adapter

    base = (
        "builtin:smollm2-135m-instruct"
        if args.size == "smollm2"
        else random_llama(args.home / "bench-models" / args.size, args.size)
    )
    work = Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    data = write_jsonl(
        mixed_length_rows(args.steps * args.batch_size * 2, max_words=args.max_seq_len // 2), work / "mixed.jsonl"
    )
    spec = bench_spec(
        str(base),
        data,
        method=method,
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        checkpoint_every=10_000,
    )
    pipe = Pipeline(spec, work)
    clean = pipe.clean("bench")
    before = _rss_bytes()
    r = train_adapter("bench", spec.adapters["bench"], pipe.base, clean, pipe.layout, log_every=1000)
    return {
        "method": r.method,
        "params": r.total_params,
        "s_per_step": r.wall_s / r.steps,
        "steps": r.steps,
        "peak": r.peak_memory_bytes,
        "peak_kind": r.peak_memory_kind,
        "added": r.peak_memory_bytes - before,
        "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "train_loss": r.train_loss,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=ROOT / ".lorafoundry")
    ap.add_argument(
        "--size",
        default="150m",
        help="a size from bench/_common.py (4m, 30m, 150m, 1b), or smollm2 for the real SmolLM2-135M-Instruct",
    )
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--child", choices=["lora", "qlora"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return

    from bench._common import random_llama
    from lora_assets.base_model import resolve_base_model

    if args.size == "smollm2":  # built or converted once, outside the timed children
        resolve_base_model("builtin:smollm2-135m-instruct", args.home)
    else:
        random_llama(args.home / "bench-models" / args.size, args.size)
    res = {}
    for method in ("lora", "qlora"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                method,
                "--home",
                str(args.home),
                "--size",
                args.size,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--max-seq-len",
                str(args.max_seq_len),
            ],
            capture_output=True,
            text=True,
        )
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{method} run failed:\n{out.stderr[-3000:]}")
        res[method] = json.loads(line[0][7:])
    lo, q = res["lora"], res["qlora"]
    mb = 2**20
    what = "SmolLM2-135M-Instruct" if args.size == "smollm2" else f"random Llama {args.size}"
    print(
        f"model: {what} ({lo['params'] / 1e6:.0f} M params), {args.steps} steps, batch "
        f"{args.batch_size}, max_seq_len {args.max_seq_len}; peak = {lo['peak_kind']}"
    )
    print("method   s/step   peak MB   added MB   lifetime max RSS MB   train loss")
    for m in (lo, q):
        print(
            f"{m['method']:<7} {m['s_per_step']:7.2f} {m['peak'] / mb:9.0f} {m['added'] / mb:10.0f} "
            f"{m['max_rss'] / mb:21.0f} {m['train_loss']:12.4f}"
        )
    print(
        f"ratio qlora/lora: peak memory {q['peak'] / lo['peak']:.2f}x, added memory {q['added'] / lo['added']:.2f}x"
        f" (goal <= 0.6), time {q['s_per_step'] / lo['s_per_step']:.2f}x (goal <= 1.25)"
    )


if __name__ == "__main__":
    main()
