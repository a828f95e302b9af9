"""Built-in bases built once: in a home under its build lock, and across homes through the model cache
(`envs.MODEL_CACHE`, lora_assets/builtin.py:build_once), on a `builtin:tiny` recipe small enough to build in about a
second (the session's own base takes minutes). The uncached path is tested here too: the session sets a cache for every
other test (tests/conftest.py)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_assets import builtin, envs
from lora_assets.base_model import BUILD_RECORD, CACHE_NOTE, resolve_base_model

#: `builtin:tiny`'s recipe shrunk to a 36 k-parameter model pretrained for 2 steps on 300 documents.
TINY_RECIPE = {
    **builtin.RECIPE,
    "corpus_documents": 300,
    "vocab_size": 400,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "steps": 2,
    "batch_size": 2,
    "block_size": 32,
    "warmup_steps": 1,
}
BUILD_LINE = "building builtin:tiny into"


@pytest.fixture
def tiny_recipe(monkeypatch) -> dict:
    """`builtin:tiny` means :data:`TINY_RECIPE` for this test."""
    monkeypatch.setattr(builtin, "RECIPE", TINY_RECIPE)
    return TINY_RECIPE


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A model cache of this test's own (never the session's)."""
    monkeypatch.setenv(envs.MODEL_CACHE.name, str(tmp_path / "cache"))
    return tmp_path / "cache"


def resolve_tiny(home: Path) -> tuple:
    """`builtin:tiny` resolved in ``home``: its ref, the progress lines, and the seconds it took."""
    lines: list[str] = []
    started = time.perf_counter()
    ref = resolve_base_model("builtin:tiny", home, progress=lines.append)
    return ref, lines, time.perf_counter() - started


def test_without_a_cache_the_base_is_built_in_its_home_once(tmp_path, tiny_recipe, monkeypatch):
    monkeypatch.delenv(envs.MODEL_CACHE.name, raising=False)
    assert builtin.model_cache() is None
    first, lines, _ = resolve_tiny(tmp_path / "home")
    assert first.obtained == "built" and any(BUILD_LINE in line for line in lines)
    assert first.path.parent == tmp_path / "home" / "models" and CACHE_NOTE not in first.build_record()
    again, lines, _ = resolve_tiny(tmp_path / "home")
    assert again.obtained == "cached build" and lines == [] and again.content_hash == first.content_hash


def test_a_second_home_copies_the_base_from_the_cache_with_the_same_content_hash(tmp_path, tiny_recipe, cache):
    built, _, build_s = resolve_tiny(tmp_path / "home-1")
    assert built.obtained == "built" and (cache / built.path.name / BUILD_RECORD).exists()
    copied, lines, copy_s = resolve_tiny(tmp_path / "home-2")
    print(f"built in {build_s:.2f} s, copied from the cache in {copy_s:.2f} s")
    assert copied.obtained == "copied from the model cache"
    assert copied.path == tmp_path / "home-2" / "models" / built.path.name
    assert copied.content_hash == built.content_hash and copied.parameters == built.parameters
    assert not any(BUILD_LINE in line or "pretraining" in line for line in lines), lines
    assert copied.build_record()[CACHE_NOTE] == str(cache / built.path.name)
    assert copied.build_record()["build_seconds"] == built.build_record()["build_seconds"]  # the same build


def test_an_incomplete_cache_entry_is_never_used(tmp_path, tiny_recipe, cache):
    entry = cache / f"builtin-tiny-{builtin.recipe_hash(tiny_recipe)}"
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")  # a dir without its build record: not a build
    ref, lines, _ = resolve_tiny(tmp_path / "home")
    assert ref.obtained == "built" and any(BUILD_LINE in line for line in lines)
    assert json.loads((entry / BUILD_RECORD).read_text())["recipe_hash"] == builtin.recipe_hash(tiny_recipe)


def test_a_copy_cut_short_publishes_nothing_and_the_next_copy_is_whole(tmp_path, tiny_recipe, cache, monkeypatch):
    built, _, _ = resolve_tiny(tmp_path / "home-1")
    room = {"files": 1}  # the disk fills up after one file of the copy

    def copy_until_full(src, dst):
        if room["files"] == 0:
            raise OSError(28, "No space left on device")
        room["files"] -= 1
        return shutil.copy2(src, dst)

    monkeypatch.setattr(shutil, "copytree", functools.partial(shutil.copytree, copy_function=copy_until_full))
    with pytest.raises(OSError, match="No space left"):
        resolve_tiny(tmp_path / "home-2")
    assert os.listdir(tmp_path / "home-2" / "models") == [".build.lock"]  # no model dir, no temporary copy left
    room["files"] = 100
    copied, _, _ = resolve_tiny(tmp_path / "home-2")
    assert copied.obtained == "copied from the model cache" and copied.content_hash == built.content_hash


def test_an_unusable_cache_is_named_with_the_fix(tmp_path, tiny_recipe, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(envs.MODEL_CACHE.name, str(tmp_path / "a-file" / "cache"))
    with pytest.raises(OSError, match=f"{envs.MODEL_CACHE.name}=.*a-file/cache.*Fix: point it at a writable"):
        resolve_tiny(tmp_path / "home")


#: One racer: imports first, then waits until every racer is ready, then resolves `builtin:tiny` (the tiny recipe)
#: in the home ``argv[1]`` and prints its progress lines and what it got.
RACER = """
import json, sys, time
from pathlib import Path
from lora_assets import builtin
from lora_assets.base_model import resolve_base_model
home, ready, racers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
builtin.RECIPE = json.loads(sys.argv[4])
import torch, transformers  # the build's imports, before the start line
(ready / sys.argv[5]).touch()
while len(list(ready.iterdir())) < racers:
    time.sleep(0.01)
ref = resolve_base_model("builtin:tiny", home, progress=print)
print("RESULT", json.dumps({"path": str(ref.path), "hash": ref.content_hash, "obtained": ref.obtained}))
"""


def race(homes: list[Path], ready: Path, env: dict) -> list[tuple[list[str], dict]]:
    """Start one racer per home at once; each one's output lines and result."""
    ready.mkdir()
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(home), str(ready), str(len(homes)), json.dumps(TINY_RECIPE), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
        for i, home in enumerate(homes)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in racers]
    assert [p.returncode for p in racers] == [0] * len(homes), outputs
    lines = [out.splitlines() for out in outputs]
    return [(ls, json.loads(next(x for x in ls if x.startswith("RESULT ")).split(" ", 1)[1])) for ls in lines]


@pytest.mark.slow
def test_two_processes_never_build_a_builtin_base_twice_in_one_home(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != envs.MODEL_CACHE.name}  # the home's lock alone
    results = race([tmp_path / "home", tmp_path / "home"], tmp_path / "ready", env)
    builds = [line for lines, _ in results for line in lines if BUILD_LINE in line]
    assert len(builds) == 1, builds
    assert "built" in {r["obtained"] for _, r in results}  # the other one waited for it (or came after it)
    assert len({(r["path"], r["hash"]) for _, r in results}) == 1


@pytest.mark.slow
def test_two_homes_sharing_a_cache_never_build_a_builtin_base_twice(tmp_path):
    env = {**os.environ, envs.MODEL_CACHE.name: str(tmp_path / "cache")}
    results = race([tmp_path / "home-1", tmp_path / "home-2"], tmp_path / "ready", env)
    builds = [line for lines, _ in results for line in lines if BUILD_LINE in line]
    assert len(builds) == 1, builds
    assert sorted(r["obtained"] for _, r in results) == ["built", "copied from the model cache"]
    assert len({r["hash"] for _, r in results}) == 1 and len({Path(r["path"]).name for _, r in results}) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [
        Path(results[0][1]["path"]).name
    ]
