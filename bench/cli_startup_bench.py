"""How long the `lorafoundry` CLI takes to answer commands that need no model and no Dagster.

    python bench/cli_startup_bench.py [--runs 5]

Each command runs as the console script does (`python -m orchestration.cli ARGS`, `orchestration.cli:app`) in a
fresh process, `--runs` times, interleaved with a bare `python -c pass`; the median of each and its ratio to the
bare interpreter's median, measured in the same run, are printed with the CPU's model name (goal: <= 0.5 s).
The CPU time (user + sys) of each run is printed too: on a busy machine it moves far less than the wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands(home: Path) -> dict[str, list[str]]:
    """The commands timed, by label: the interpreter alone, then the CLI's light commands."""
    cli = [sys.executable, "-m", "orchestration.cli"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "--help": [*cli, "--help"],
        "registry list": [*cli, "registry", "list", "--home", str(home)],
        "validate examples/tiny.yaml": [*cli, "validate", str(ROOT / "examples" / "tiny.yaml")],
        "stop": [*cli, "stop", "--home", str(home)],
    }


def cpu_model() -> str:
    """The CPU's model name as lscpu prints it, else what the platform module knows."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown")


def time_once(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of one run of ``argv``, start to exit (output discarded; any exit code
    counts)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(Path(tmp) / "home")
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in cmds}
        for _ in range(args.runs):  # interleaved, so a slow moment of the machine hits every command alike
            for label, argv in cmds.items():
                times[label].append(time_once(argv))
    base_wall, base_cpu = (statistics.median(s[i] for s in times["python -c pass"]) for i in (0, 1))
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); {args.runs} runs each, medians")
    print(f"{'command':<30} {'wall':>8} {'ratio':>7} {'cpu':>8} {'ratio':>7}")
    for label, samples in times.items():
        wall, cpu = (statistics.median(s[i] for s in samples) for i in (0, 1))
        print(f"{label:<30} {wall:6.3f} s {wall / base_wall:6.1f}x {cpu:6.3f} s {cpu / base_cpu:6.1f}x")


if __name__ == "__main__":
    main()
