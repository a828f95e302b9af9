"""Adapter weights are checked against the registry's sha256 where they are read, not where a request is routed.

Two steps, both here (no vLLM import, so they are tested on their own):

1. :func:`stage` (in lorafoundry's processes and the guard): copy a registered adapter's files into the server's
   verified store ``<stage_root>/<sha256>/``, hash the *copy*, and publish it (read-only, by rename) only when the
   hash is the registry's. vLLM is only ever given paths in this store, so overwriting the files under
   ``<home>/adapters`` after registration changes nothing that vLLM reads.
2. :func:`verified_copy` (in vLLM's worker, through lorafoundry's plugin, on every adapter load: at start, on first
   use, and again after vLLM evicted the adapter from its cache): refuse any path that is not a directory of the
   store, copy its files to a private temporary dir, hash that copy against the directory's name, and let vLLM
   read the copy. Bytes that do not hash to the name are never loaded, under any name, after any eviction.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from registry.store import ADAPTER_FILES, adapter_sha256

SHA_RE = re.compile(r"[0-9a-f]{64}")


class IntegrityError(RuntimeError):
    """Adapter files do not match the sha256 they must have, or are not where verified adapters live."""


def multi_lora_problem(adapter_dir: Path) -> str | None:
    """Why vLLM's multi-LoRA path cannot serve the adapter in ``adapter_dir`` as it is, or None.

    Read from its adapter_config.json (what vLLM would load), not from the registry row: DoRA (``use_dora``)
    has a magnitude vector per layer that vLLM's LoRA kernels do not apply; served anyway it would either fail
    to load or answer without it. The merged model serves it exactly.
    """
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None  # unreadable or damaged files are the sha256 check's to refuse, with its own message
    if isinstance(config, dict) and config.get("use_dora"):
        return (
            "it is a DoRA adapter (use_dora), which vLLM's multi-LoRA server cannot apply. Fix: export it merged "
            "(`lorafoundry registry export-merged NAME@VERSION DIR`) and serve DIR as its own model "
            "(`vllm serve DIR`, or `base_model: DIR` in a spec)"
        )
    return None


def stage(src: Path, sha256: str, stage_root: Path) -> Path:
    """The verified copy of the adapter in ``src`` whose registered sha256 is ``sha256``: ``stage_root/sha256``.

    Made once per content (later calls reuse it). Raises :class:`IntegrityError` when the files in ``src`` do not
    hash to ``sha256`` (nothing is published then), ``OSError`` when they cannot be read.
    """
    if not SHA_RE.fullmatch(sha256 or ""):
        raise IntegrityError(f"{sha256!r} is not a sha256 hex digest.")
    stage_root = Path(stage_root)
    dest = stage_root / sha256
    if dest.is_dir():
        return dest
    stage_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=stage_root))
    try:
        for name in ADAPTER_FILES:
            shutil.copyfile(Path(src) / name, tmp / name)
        got, _ = adapter_sha256(tmp)
        if got != sha256:
            raise IntegrityError(
                f"adapter files in {src} changed after registration: sha256 {got[:12]}…, registered {sha256[:12]}…."
            )
        for name in ADAPTER_FILES:
            os.chmod(tmp / name, 0o444)  # read-only files; the dir stays removable (`rm -rf` of a home works)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, dest)  # atomic; another process may have published the same content first
        except OSError:
            if not dest.is_dir():
                raise
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verified_copy(path: str | Path, stage_root: Path, into: Path) -> Path:
    """Copy the staged adapter at ``path`` into the new dir ``into`` and check the copy's sha256 against the
    staged dir's name. Raises :class:`IntegrityError` for a path outside ``stage_root`` or bytes that changed."""
    path, stage_root = Path(path), Path(stage_root).resolve()
    real = path.resolve()
    if real.parent != stage_root or not SHA_RE.fullmatch(real.name):
        raise IntegrityError(
            f"adapter path {str(path)!r} is not in this server's verified store {stage_root}: lorafoundry's vLLM "
            "loads only registered adapters, staged and checked by `lorafoundry serve`."
        )
    into.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copyfile(real / name, into / name)
    got, _ = adapter_sha256(into)
    if got != real.name:
        raise IntegrityError(
            f"verified adapter {real.name[:12]}… changed on disk (sha256 now {got[:12]}…): refused to load it. "
            f"Fix: delete {real} and restart `lorafoundry serve` (it re-stages from the registry)."
        )
    problem = multi_lora_problem(into)
    if problem:
        raise IntegrityError(f"verified adapter {real.name[:12]}… is not loaded: {problem}.")
    return into
