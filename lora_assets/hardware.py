"""Which number format is fast on this machine: one rule for training, evaluation and serving.

bf16 halves weight memory, but it is only fast where the hardware computes in it: CUDA GPUs from Ampere on, and
CPUs whose oneDNN has native bf16 kernels (AVX-512 with BF16, AMX). Elsewhere, e.g. on an AVX2-only x86 CPU,
PyTorch falls back to a plain C++ loop for bf16 matrix products: measured on a 2-core AVX2 EPYC, a
424x576 @ 576x1536 product takes 12 ms in fp32 and 620 ms in bf16, and one SmolLM2-135M LoRA training step
5 s in fp32 against 100 s with the bf16 base. So `auto` means bf16 where it is native and fp32 otherwise.

``LORAFOUNDRY_DTYPE`` (``float32`` or ``bfloat16``; unset: the rule above) pins what `auto` means, for training,
evaluation and serving alike: to compare runs across machines of different kinds, or for a test whose truth depends
on the number format (e.g. that data-parallel training equals one process to fp32 rounding).

:func:`compute_record` says what a run computed in and on (format, device, CPU model and features, GPU), for the
training manifest and the registry.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from lora_assets import envs

DTYPE_ENV = envs.DTYPE.name
AUTO_DTYPES = ("bfloat16", "float32")  # what `auto` may mean, and what DTYPE_ENV may pin it to


class DtypeSettingError(ValueError):
    """LORAFOUNDRY_DTYPE names a number format `auto` cannot mean."""


@cache
def native_bf16() -> bool:
    """True where bf16 matrix products run on native hardware paths: CUDA with bf16; on an x86 CPU, AVX-512-BF16
    (AMX CPUs have it too); on another CPU, what oneDNN says. Not torch's oneDNN check alone on x86: it says yes on
    any AVX-512 CPU (Skylake to Ice Lake included), where oneDNN emulates bf16 in fp32, slower than fp32 itself,
    and where its bf16 products round differently with the inner dimension's length (docs/testing.md)."""
    import platform

    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
            return bool(torch.cpu._is_avx512_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or unusual build: assume the slow path
        return False


def resolve_dtype(name: str) -> str:
    """The dtype a setting means here: `auto` is LORAFOUNDRY_DTYPE when set, else `bfloat16` where bf16 is native,
    else `float32`."""
    if name != "auto":
        return name
    pinned = envs.DTYPE.get() or ""
    if not pinned:
        return "bfloat16" if native_bf16() else "float32"
    if pinned not in AUTO_DTYPES:
        raise DtypeSettingError(
            f"{DTYPE_ENV}={pinned!r} is not a format `auto` can mean. Fix: set it to {' or '.join(AUTO_DTYPES)}, "
            "or unset it to use bf16 where the hardware computes in it and fp32 elsewhere."
        )
    return pinned


def torch_dtype(name: str):
    """The torch dtype for a setting (`auto` resolved as in :func:`resolve_dtype`)."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[resolve_dtype(name)]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's cpuset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def limit_torch_threads(concurrent_steps: int) -> int:
    """Give this step's torch an equal share of the usable CPUs when ``concurrent_steps`` model steps may run at
    once, and return that share.

    Each torch process otherwise starts one compute thread per core, so two steps on a 2-core machine run four
    spinning OpenMP threads on two cores; measured in docs/benchmarks.md ("Thread oversubscription").
    """
    import torch

    threads = max(1, usable_cpus() // max(1, concurrent_steps))
    torch.set_num_threads(threads)
    return threads


#: The CPU features that decide how fast matrix products run in each number format (x86: AVX2/FMA for fp32,
#: AVX-512-BF16 and AMX for native bf16; Arm: SVE, BF16, I8MM): what a compute record keeps of the CPU's flags.
RELEVANT_CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)


def cpu_identity(cpuinfo: str) -> tuple[str | None, list[str]]:
    """The CPU's model name and its :data:`RELEVANT_CPU_FLAGS`, from the text of ``/proc/cpuinfo`` (x86's
    ``model name`` and ``flags``, Arm's ``Features``; the first processor's)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    present = set((fields.get("flags") or fields.get("features") or "").split())
    return fields.get("model name") or None, [f for f in RELEVANT_CPU_FLAGS if f in present]


def compute_record(setting: str = "auto") -> dict:
    """What a run computes in and on: the number format ``setting`` resolves to here and why, the device, the
    CPU's model and relevant features, and the GPU (None on CPU). Recorded in the training manifest and the
    registry, so a run's numbers can be told apart from another machine's (bf16 and fp32 differ in the last bits).
    """
    import platform

    import torch

    try:
        cpu, flags = cpu_identity(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:  # not Linux
        cpu, flags = None, []
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    pinned = envs.DTYPE.get() or ""
    if setting != "auto":
        why = "set explicitly"
    elif pinned:
        why = f"auto, pinned by {DTYPE_ENV}"
    else:
        why = "auto: bf16 is native here" if native_bf16() else "auto: bf16 is not native here"
    return {
        "dtype": resolve_dtype(setting),
        "dtype_reason": why,
        "device": "cuda" if gpu else "cpu",
        "gpu": gpu,
        "cpu": cpu or platform.processor() or platform.machine(),
        "cpu_flags": flags,
    }
