"""Dagster's overhead: the demo graph through `dg.materialize` against the same stage functions in sequence.

    python bench/dagster_overhead_bench.py [--home DIR]

Both start from an empty home that shares only the built base model (`models/`, built once under --home), so
both clean, train, evaluate and register both demo adapters from scratch; the deployment is left out (it is a
vLLM start either way). Each path runs in its own process, in alternating order, twice; the ratio of the
medians is reported (goal <= 1.10x).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_plain(home: Path) -> None:
    from lora_assets.pipeline import Pipeline
    from lora_assets.spec import load_spec

    spec = load_spec(ROOT / "examples" / "tiny.yaml")
    pipe = Pipeline(spec, home)
    for name in spec.datasets:
        pipe.clean(name)
    for key in pipe.jobs:
        pipe.train(key)
        pipe.evaluate(key)
        pipe.register(key)


def run_dagster(home: Path) -> None:
    import dagster as dg

    from lora_assets.spec import load_spec
    from orchestration.assets import build_assets
    from orchestration.resources import resources_from_env

    spec = load_spec(ROOT / "examples" / "tiny.yaml")
    result = dg.materialize(build_assets(spec, deployment=False), resources=resources_from_env(home))
    assert result.success


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=ROOT / ".lorafoundry")
    ap.add_argument("--child", choices=["plain", "dagster"], help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.child:
        {"plain": run_plain, "dagster": run_dagster}[args.child](args.home)
        return

    from lora_assets.base_model import resolve_base_model
    from lora_assets.home import Home

    resolve_base_model("builtin:tiny", args.home)  # build once, outside the timings
    times: dict[str, list[float]] = {"plain": [], "dagster": []}
    for i in range(args.repeats):
        for kind in ("plain", "dagster") if i % 2 == 0 else ("dagster", "plain"):
            home = Path(tempfile.mkdtemp(prefix=f"overhead-{kind}-"))
            Home.at(home).models.symlink_to(Home.at(args.home).models)
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, __file__, "--child", kind, "--home", str(home)],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            times[kind].append(time.perf_counter() - t0)
    plain, dag = statistics.median(times["plain"]), statistics.median(times["dagster"])
    print("demo graph without deployment (clean x2, train/eval/register x2), process start included")
    print(f"  stage functions in sequence: {', '.join(f'{t:.1f}' for t in times['plain'])} s (median {plain:.1f})")
    print(f"  dg.materialize:              {', '.join(f'{t:.1f}' for t in times['dagster'])} s (median {dag:.1f})")
    print(f"  ratio: {dag / plain:.2f}x (goal <= 1.10x)")


if __name__ == "__main__":
    main()
