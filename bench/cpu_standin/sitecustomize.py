"""Run a benchmark on this CPU as if it were another x86 CPU of this machine kind (a stand-in, not the real thing).

Machines of this kind come as AVX2-only EPYCs, AVX-512-BF16 EPYCs (no AMX) and AMX Xeons; a session gets one. To
measure the code paths the others take, put this directory first on ``PYTHONPATH`` and name the CPU to stand in for
in ``BENCH_CPU_STANDIN``; every Python process of the run (the bench, ``lorafoundry serve``, vLLM's API server and
engine workers, which inherit the environment) then sees only that CPU's instruction sets:

    BENCH_CPU_STANDIN=avx2 PYTHONPATH=bench/cpu_standin python bench/serve_compare.py --home /tmp/demo-home ...

- ``avx512_bf16`` (a Zen 4 EPYC): no AMX. oneDNN is limited to AVX-512 with BF16 (``ONEDNN_MAX_CPU_ISA``), and
  ``torch.cpu``'s AMX checks say no, so vLLM picks what it picks without AMX: its attention kernels' ISA, its
  small-GEMM (sgl) kernel for small layers (AMX only), which otherwise ignores ``ONEDNN_MAX_CPU_ISA``.
- ``avx2``: no AVX-512 either. Also ``ATEN_CPU_CAPABILITY=avx2`` (PyTorch's vectorised kernels and inductor's
  generated code), and ``torch.cpu``'s AVX-512 checks say no, so vLLM loads its AVX2 build of its C++ ops
  (``vllm._C_AVX2``) and lorafoundry's ``dtype: auto`` is float32, as on a real AVX2-only CPU.

The test suite runs under it too (``BENCH_CPU_STANDIN=avx512_bf16 PYTHONPATH=bench/cpu_standin python -m pytest
tests``): limiting oneDNN alone left vLLM's attention on its AMX kernel (docs/testing.md). What it cannot change:
the caches, memory bandwidth and clock of the machine it runs on. Record both the real CPU (``lscpu``) and the
stand-in next to every figure measured this way.
"""

import importlib.abc
import importlib.util
import os
import sys

_ISA = {"avx512_bf16": "AVX512_CORE_BF16", "avx2": "AVX2"}
_NOT_THERE = {
    "avx512_bf16": ("_is_amx_tile_supported", "_is_amx_fp16_supported"),
    "avx2": (
        "_is_amx_tile_supported",
        "_is_amx_fp16_supported",
        "_is_avx512_supported",
        "_is_avx512_bf16_supported",
        "_is_vnni_supported",  # AVX-512 VNNI
    ),
}


def _stand_in(cpu: str) -> None:
    if cpu not in _ISA:  # at start-up an exception would be "Fatal Python error: ..." and a traceback of site.py
        fix = f"Fix: one of {sorted(_ISA)}."
        print(f"BENCH_CPU_STANDIN={cpu!r} is not a CPU this stand-in knows. {fix}", file=sys.stderr)
        os._exit(2)
    # before torch loads oneDNN; children inherit them; a limit already set wins (a test that limits oneDNN further)
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", _ISA[cpu])
    if cpu == "avx2":
        os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    sys.meta_path.insert(0, _AfterTorch(cpu))  # a process that never imports torch does not load it for this


def _patch(torch, cpu: str) -> None:
    if cpu == "avx512_bf16" and not torch.cpu._is_avx512_bf16_supported():
        raise SystemExit(f"BENCH_CPU_STANDIN={cpu!r}: this CPU has no AVX-512-BF16 to stand in with. Fix: run on one.")
    for name in _NOT_THERE[cpu]:
        if hasattr(torch.cpu, name):
            setattr(torch.cpu, name, lambda: False)


class _AfterTorch(importlib.abc.MetaPathFinder):
    """Finds ``torch`` as the other finders do, and patches ``torch.cpu`` once it has been executed."""

    def __init__(self, cpu: str) -> None:
        self.cpu = cpu

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None:
            return spec
        exec_module, cpu = spec.loader.exec_module, self.cpu

        def exec_then_patch(module) -> None:
            exec_module(module)
            _patch(module, cpu)

        spec.loader.exec_module = exec_then_patch
        return spec


if os.environ.get("BENCH_CPU_STANDIN"):
    _stand_in(os.environ["BENCH_CPU_STANDIN"])
