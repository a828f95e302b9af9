"""serving/integrity.py on real adapter files: staging publishes only bytes that hash to the registered sha256,
and the worker-side copy refuses paths outside the verified store and bytes that changed there."""

from __future__ import annotations

import os

import pytest

from registry.records import adapter_sha256
from serving.integrity import IntegrityError, multi_lora_problem, restage, stage, staged_intact, verified_copy
from tests.test_registry import make_adapter_dir


def test_stage_publishes_a_read_only_copy_only_when_the_hash_matches(tmp_path):
    src = make_adapter_dir(tmp_path / "a")
    sha, _ = adapter_sha256(src)
    root = tmp_path / "verified"
    staged = stage(src, sha, root)
    assert staged == root / sha and adapter_sha256(staged)[0] == sha
    assert not os.access(staged / "adapter_model.safetensors", os.W_OK) or os.geteuid() == 0
    assert oct((staged / "adapter_model.safetensors").stat().st_mode & 0o777) == "0o444"
    assert stage(src, sha, root) == staged  # reused

    other = make_adapter_dir(tmp_path / "b", seed=5)
    with pytest.raises(IntegrityError, match="changed after registration"):
        stage(other, "0" * 64, root)
    assert sorted(p.name for p in root.iterdir()) == [sha]  # nothing else published, no temp dir left
    with pytest.raises(IntegrityError):
        stage(src, "../../etc", root)


def test_verified_copy_refuses_outside_paths_and_changed_bytes(tmp_path):
    src = make_adapter_dir(tmp_path / "a")
    sha, _ = adapter_sha256(src)
    root = tmp_path / "verified"
    staged = stage(src, sha, root)
    copy = verified_copy(staged, root, tmp_path / "load1")
    assert adapter_sha256(copy)[0] == sha
    for bad in (src, root, tmp_path / "verified" / sha / ".."):
        with pytest.raises(IntegrityError, match="verified store"):
            verified_copy(bad, root, tmp_path / "load2")
    link = root / ("f" * 64)
    link.symlink_to(src)  # a link named like a hash, pointing out of the store
    with pytest.raises(IntegrityError, match="verified store"):
        verified_copy(link, root, tmp_path / "load3")
    weights = staged / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="changed on disk"):
        verified_copy(staged, root, tmp_path / "load4")


def _flip(weights) -> None:
    os.chmod(weights, 0o644)
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


def test_a_changed_staged_copy_is_staged_again_from_the_registered_files(tmp_path):
    """stage() hashes a copy it finds and replaces it when its bytes changed; restage() takes the first registered
    dir that has the right bytes, and refuses when none has."""
    src = make_adapter_dir(tmp_path / "a")
    sha, _ = adapter_sha256(src)
    root = tmp_path / "verified"
    staged = stage(src, sha, root)
    _flip(staged / "adapter_model.safetensors")
    assert not staged_intact(staged)
    assert stage(src, sha, root) == staged and staged_intact(staged)
    assert sorted(p.name for p in root.iterdir()) == [sha]  # the changed copy is gone, no temp dir left

    _flip(staged / "adapter_model.safetensors")
    changed = make_adapter_dir(tmp_path / "b")
    _flip(changed / "adapter_model.safetensors")
    assert restage(sha, root, [changed, src]) == staged and staged_intact(staged)
    _flip(staged / "adapter_model.safetensors")
    with pytest.raises(IntegrityError, match="no registered copy"):
        restage(sha, root, [changed])


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({}, None),
        ({"modules_to_save": None}, None),
        ({"modules_to_save": ["score"]}, None),
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "lora_bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"modules_to_save": "lm_head"}, "modules_to_save"),
    ],
)
def test_variants_vllm_cannot_load_are_named(tmp_path, config, problem):
    import json

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, **config}))
    found = multi_lora_problem(d)
    assert (found is None) if problem is None else (problem in found and "export-merged" in found), found


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_that_are_not_finite_are_named_and_refused(tmp_path, bad):
    """A NaN or infinite weight is refused by name (vLLM's loader does not look at values, and on CPU it would reach
    every request batched with it); a finite adapter passes; the answer for a verified copy is kept by its sha256."""
    import torch
    from safetensors.torch import load_file, save_file

    from serving.integrity import nonfinite_problem

    good = make_adapter_dir(tmp_path / "good")
    assert nonfinite_problem(good) is None
    src = make_adapter_dir(tmp_path / "bad", seed=2)
    weights = src / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name].to(torch.bfloat16)
    tensors[name][1, 3] = bad
    save_file(tensors, str(weights))
    problem = nonfinite_problem(src)
    assert problem and name in problem and "NaN or infinity" in problem and "Fix:" in problem
    sha, _ = adapter_sha256(src)
    staged = stage(src, sha, tmp_path / "verified")
    assert nonfinite_problem(staged) == problem
    os.chmod(staged / "adapter_model.safetensors", 0o644)
    save_file(load_file(str(good / "adapter_model.safetensors")), str(staged / "adapter_model.safetensors"))
    assert nonfinite_problem(staged) == problem  # kept by sha256: the bytes under that name are checked by hash


def test_what_vllm_loaded_is_checked_after_its_scaling():
    """vLLM folds the adapter's scaling into B when it packs it: a B that is finite in the file but overflows once
    scaled is refused too, as are NaN in A and in one slice of a packed (qkv) layer."""
    import torch
    from vllm.lora.lora_weights import LoRALayerWeights, PackedLoRALayerWeights

    from serving.integrity import loaded_nonfinite

    def model(**loras):
        return type("LoRAModel", (), {"loras": loras})()

    def layer(name, a=1.0, b=1.0, alpha=32):
        return LoRALayerWeights(name, 16, alpha, torch.full((16, 8), a).bfloat16(), torch.full((8, 16), b).bfloat16())

    assert loaded_nonfinite(model(q=layer("q"))) is None
    assert loaded_nonfinite(model(q=layer("q", b=3e38, alpha=16))) is None  # scaling 1: finite as loaded
    assert "'o'" in loaded_nonfinite(model(q=layer("q"), o=layer("o", b=3e38)))  # x2 overflows bf16
    assert "'q'" in loaded_nonfinite(model(q=layer("q", a=float("nan"))))
    packed = PackedLoRALayerWeights.pack([layer("qkv"), None, layer("qkv", b=float("inf"))])
    assert "'qkv'" in loaded_nonfinite(model(qkv=packed))
    assert loaded_nonfinite(model(qkv=PackedLoRALayerWeights.pack([layer("qkv"), None, layer("qkv")]))) is None
