"""Why two trainings at once on one CPU thrash: torch's threads per process against the cores.

    python bench/thread_oversubscription_bench.py [--size 4m] [--steps 30]

Trains LoRA (r=16, all seven projections, batch 4 x 128 tokens) on a random Llama (bench/_common.py) for --steps
steps in child processes, three ways: one process alone with torch's default thread count; two processes at once
with the default (each starts one thread per core); two at once with each given its share of the usable CPUs
(`lora_assets.hardware.limit_torch_threads(2)`, what the model steps do when two may run at once). Prints each
process's tokens/s and the wall time of the pair; the pair run one after the other takes twice the single time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(model_dir: Path, steps: int, share: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_assets.hardware import limit_torch_threads

    if share:
        limit_torch_threads(share)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = torch.randint(0, model.config.vocab_size, (4, 128))
    model(input_ids=batch, labels=batch).loss.backward()  # warm-up, outside the timing
    opt.zero_grad()
    t0 = time.perf_counter()
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    wall = time.perf_counter() - t0
    print(f"{torch.get_num_threads()} {steps * batch.numel() / wall:.0f}")


def run(model_dir: Path, steps: int, processes: int, share: int) -> tuple[float, list[str]]:
    cmd = [sys.executable, __file__, "--child", str(model_dir), "--steps", str(steps), "--share", str(share)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    outs = [p.communicate()[0].split() for p in procs]
    wall = time.perf_counter() - t0
    assert all(p.returncode == 0 for p in procs)
    return wall, [f"{tps} tok/s with {threads} threads" for threads, tps in outs]


def main() -> None:
    import os

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4m")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--share", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps, args.share)
        return
    from bench._common import random_llama

    model_dir = random_llama(Path(tempfile.gettempdir()) / f"lorafoundry-bench-llama-{args.size}", args.size)
    print(f"load before: {os.getloadavg()[0]:.2f}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}")
    for label, processes, share in [
        ("one process alone, default threads", 1, 0),
        ("two at once, default threads", 2, 0),
        ("two at once, a share of the CPUs each", 2, 2),
    ]:
        wall, each = run(model_dir, args.steps, processes, share)
        print(f"{label}: {wall:.1f} s wall (model load included); " + "; ".join(each), flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
