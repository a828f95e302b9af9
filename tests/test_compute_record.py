"""What a run computed in and on (number format, device, CPU model and features, GPU): recorded in the training
manifest and the registry."""

from __future__ import annotations

import json

import pytest

from lora_assets.hardware import DTYPE_ENV, RELEVANT_CPU_FLAGS, compute_record, cpu_identity, resolve_dtype
from lora_assets.pipeline import Pipeline
from lora_assets.spec import validate_spec

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8 sha_ni

processor\t: 1
model name\t: a second processor is not read
"""
ARM_CPUINFO = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd aes sve sve2 bf16 i8mm\nCPU part\t: 0xd4f\n"


def test_cpu_identity_keeps_the_model_and_the_flags_that_decide_speed():
    assert cpu_identity(X86_CPUINFO) == (
        "Intel(R) Xeon(R) Platinum 8480+",
        ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"],
    )
    assert cpu_identity(ARM_CPUINFO) == (None, ["asimd", "sve", "sve2", "bf16", "i8mm"])  # Arm has no model name
    assert cpu_identity("") == (None, [])


def test_compute_record_says_the_format_and_why(monkeypatch):
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    auto = compute_record()
    assert auto["dtype"] == resolve_dtype("auto") and auto["dtype_reason"].startswith("auto: bf16 is")
    assert auto["device"] in ("cpu", "cuda") and (auto["gpu"] is None) == (auto["device"] == "cpu")
    assert auto["cpu"] and set(auto["cpu_flags"]) <= set(RELEVANT_CPU_FLAGS)
    monkeypatch.setenv(DTYPE_ENV, "float32")
    assert compute_record() | {"dtype_reason": ""} == auto | {"dtype": "float32", "dtype_reason": ""}
    assert compute_record()["dtype_reason"] == f"auto, pinned by {DTYPE_ENV}"
    assert compute_record("float16")["dtype"] == "float16"


@pytest.mark.parametrize(("avx512_bf16", "native"), [(True, True), (False, False)])
def test_bf16_is_native_on_x86_only_with_avx512_bf16(monkeypatch, avx512_bf16, native):
    """On x86, `auto` means bf16 only where the CPU has AVX-512-BF16 (AMX CPUs have it too), not wherever torch's
    oneDNN check says bf16 works: that one says yes on every AVX-512 CPU (Skylake to Ice Lake), where bf16 is
    emulated and slower than fp32."""
    import platform

    import torch

    from lora_assets import hardware

    monkeypatch.delenv(DTYPE_ENV, raising=False)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    hardware.native_bf16.cache_clear()
    try:
        assert hardware.native_bf16() is native
        assert resolve_dtype("auto") == ("bfloat16" if native else "float32")
    finally:
        monkeypatch.undo()
        hardware.native_bf16.cache_clear()


@pytest.mark.slow
def test_the_manifest_and_the_registry_record_say_how_a_run_computed(tmp_path, random_base):
    rows = [{"prompt": f"what comes after {i}?", "completion": f"{i + 1}"} for i in range(24)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = validate_spec(
        {
            "base_model": str(random_base),
            "datasets": {"d": {"path": "d.jsonl", "eval_fraction": 0.2}},
            "adapters": {"a": {"dataset": "d", "r": 2, "batch_size": 4, "max_steps": 2, "max_eval_rows": 2}},
        },
        tmp_path,
    )
    pipe = Pipeline(spec, tmp_path / "home")
    pipe.clean("d")
    trained = pipe.train("a")
    manifest = json.loads((pipe.adapter_dir("a") / "training_manifest.json").read_text())
    assert manifest["compute"] == compute_record("auto")
    assert manifest["compute"]["dtype"] in ("bfloat16", "float32") and manifest["compute"]["cpu"]
    pipe.evaluate("a")
    record = pipe.register("a")
    assert record.training_config["compute"] == manifest["compute"], trained.adapter_dir
