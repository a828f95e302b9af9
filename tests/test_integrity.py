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
