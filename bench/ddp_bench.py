"""Data-parallel training against one process: wall time for the same epoch.

    python bench/ddp_bench.py [--processes 2] [--size 4m] [--rows 1200] [--batch-size 8] [--repeats 2]
                              [--one-process-threads 0]

Each run trains one epoch of the same data with the same settings (random Llama from bench/_common.py, chat rows of
varied length, r=16, all seven projections, packing), once with `processes: 1` (in-process training, run in a
fresh child process so both start from nothing) and once with `processes: N` (torchrun, `lora_assets.distributed`,
gloo on CPU, nccl on GPUs: one process per GPU). Runs alternate, each in a home of its own (nothing reused). Reported
per run: the whole wall time (process start to published adapter, start-up and model loading included) and the
epoch (the Trainer's fit, from the manifest); the ratios are one process over N, so above 1 means N is faster.

On a CPU machine the N processes share its cores: each gets cores / N torch threads, so the arithmetic is the same
and data parallelism adds work (a gradient all-reduce per step over gloo, every process loading the model and its
own Python and torch start-up). Expect no gain on CPUs; the bench is for GPU boxes, where each process brings a
device of its own. `--one-process-threads 1` gives the one-process run a single thread, like each of the N: on a
busy machine a 2-thread process can be many times slower than two 1-thread ones (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _spec(base: Path, data: Path, processes: int, batch_size: int):
    from bench._common import bench_spec

    return bench_spec(str(base), data, processes=processes, batch_size=batch_size, max_seq_len=512, seed=1)


def child(home: Path, base: Path, data: Path, batch_size: int, threads: int) -> None:
    """The one-process run, in its own process: the train stage as the train asset runs it (all usable CPUs'
    threads, unless ``threads`` says otherwise)."""
    import torch

    from lora_assets.hardware import limit_torch_threads
    from lora_assets.pipeline import Pipeline

    if threads:
        torch.set_num_threads(threads)
    else:
        limit_torch_threads(1)
    Pipeline(_spec(base, data, 1, batch_size), home).train("bench")


def one_run(work: Path, base: Path, data: Path, processes: int, args, i: int) -> dict:
    from lora_assets.pipeline import Pipeline

    home = work / f"run{i}-p{processes}-t{args.one_process_threads}"
    pipe = Pipeline(_spec(base, data, processes, args.batch_size), home)
    pipe.clean("bench")
    t0 = time.perf_counter()
    if processes == 1:
        cmd = [sys.executable, __file__, "--child", str(home), str(base), str(data), str(args.batch_size)]
        cmd.append(str(args.one_process_threads))
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        result = json.loads((pipe.adapter_dir("bench") / "training_manifest.json").read_text())["result"]
    else:
        result = pipe.train("bench").model_dump()
    wall = time.perf_counter() - t0
    return {"processes": processes, "wall_s": round(wall, 1), "epoch_s": result["wall_s"], "steps": result["steps"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2, help="data-parallel processes to compare with one")
    p.add_argument("--size", default="4m", help="random Llama size from bench/_common.py")
    p.add_argument("--rows", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=8, help="global batch: each of N processes takes 1/N")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/ddp-bench"))
    p.add_argument(
        "--one-process-threads",
        type=int,
        default=0,
        help="torch threads of the one-process run; 0: all usable CPUs, as the train asset gives it",
    )
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        home, base, data, batch, threads = args.child
        child(Path(home), Path(base), Path(data), int(batch), int(threads))
        return

    from bench._common import mixed_length_rows, random_llama, write_jsonl

    base = random_llama(args.work / "models" / args.size, args.size)
    data = write_jsonl(mixed_length_rows(args.rows), args.work / "data.jsonl")
    runs = []
    for i in range(args.repeats):
        order = (1, args.processes) if i % 2 == 0 else (args.processes, 1)
        for n in order:
            runs.append(one_run(args.work, base, data, n, args, i))
            print(json.dumps(runs[-1]), flush=True)
    one = [r for r in runs if r["processes"] == 1]
    many = [r for r in runs if r["processes"] == args.processes]
    for key in ("wall_s", "epoch_s"):
        a, b = min(r[key] for r in one), min(r[key] for r in many)
        print(f"{key}: 1 process {a:.1f} s, {args.processes} processes {b:.1f} s, ratio {a / b:.2f}x (best of each)")
    print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
