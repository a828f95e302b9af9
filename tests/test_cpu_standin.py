"""bench/cpu_standin: a benchmark process (and every process it starts) sees only the stand-in CPU's instruction sets,
whatever this machine's are, so what docs/benchmarks.md records under a stand-in is of that CPU's code paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import json, os, subprocess, sys, torch
from lora_assets.hardware import resolve_dtype
from serving.cpu_lora_fix import _onednn_ops
child = subprocess.run([sys.executable, "-c", "import torch; print(torch.cpu._is_amx_tile_supported())"],
                       capture_output=True, text=True, check=True).stdout.strip()
print(json.dumps({
    "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    "aten": torch.backends.cpu.get_cpu_capability(),
    "amx": torch.cpu._is_amx_tile_supported(),
    "avx512": torch.cpu._is_avx512_supported(),
    "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
    "dtype": resolve_dtype("auto"),
    "one_product": _onednn_ops() is not None,
    "child_amx": child,
}))
"""


def standin_env(cpu: str) -> dict[str, str]:
    env = {**os.environ, "BENCH_CPU_STANDIN": cpu, "PYTHONPATH": str(ROOT / "bench" / "cpu_standin")}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    env.pop("ATEN_CPU_CAPABILITY", None)
    return env


def probe(cpu: str) -> subprocess.CompletedProcess:
    env = standin_env(cpu)
    return subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_an_avx2_stand_in_computes_in_float32_without_avx512_in_its_children_too():
    run = probe("avx2")
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["onednn_isa"] == "AVX2" and seen["aten"] == "AVX2"
    assert not (seen["amx"] or seen["avx512"] or seen["avx512_bf16"])
    assert seen["dtype"] == "float32" and not seen["one_product"]
    assert seen["child_amx"] == "False"


def test_an_avx512_bf16_stand_in_keeps_bf16_without_amx():
    run = probe("avx512_bf16")
    plain = {k: v for k, v in os.environ.items() if k not in ("BENCH_CPU_STANDIN", "PYTHONPATH")}
    here = subprocess.run(  # this CPU's own answer, also where the suite itself runs under a stand-in
        [sys.executable, "-c", "import torch; print(torch.cpu._is_avx512_bf16_supported())"],
        env=plain,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if here != "True":  # a stand-in only takes instruction sets away
        assert run.returncode != 0 and "has no AVX-512-BF16 to stand in with" in run.stderr
        return
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["onednn_isa"] == "AVX512_CORE_BF16" and not seen["amx"] and seen["child_amx"] == "False"
    assert seen["avx512_bf16"] and seen["dtype"] == "bfloat16" and seen["one_product"]


def test_an_unknown_stand_in_is_refused_with_the_fix():
    run = probe("zen9")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "BENCH_CPU_STANDIN='zen9'" in run.stderr and "avx2" in run.stderr and "avx512_bf16" in run.stderr


def test_a_process_that_never_imports_torch_does_not_load_it_under_a_stand_in():
    env = standin_env("avx2")
    code = "import sys; print('torch' in sys.modules, 'sitecustomize' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == ["False", "True"], run.stdout + run.stderr  # the CLI's light commands stay light
