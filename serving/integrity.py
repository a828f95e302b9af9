"""Adapter weights are checked against the registry's sha256 where they are read, not where a request is routed.

Two steps, both here (no vLLM import, so they are tested on their own):

1. :func:`stage` (in lorafoundry's processes and the guard): copy a registered adapter's files into the server's
   verified store ``<stage_root>/<sha256>/``, hash the *copy*, and publish it (read-only, by rename) only when the
   hash is the registry's. vLLM is only ever given paths in this store, so overwriting the files under
   ``<home>/adapters`` after registration changes nothing that vLLM reads. A staged copy found changed (its bytes
   no longer hash to its name) is set aside and staged again from the registered files.
2. :func:`verified_copy` (in vLLM's worker, through lorafoundry's plugin, on every adapter load: at start, on first
   use, and again after vLLM evicted the adapter from its cache): refuse any path that is not a directory of the
   store, copy its files to a private temporary dir, hash that copy against the directory's name, and let vLLM
   read the copy. Bytes that do not hash to the name are never loaded, under any name, after any eviction. When
   the staged copy changed, the worker re-stages it from the registered files (:func:`restage`) and checks again,
   so one changed file is that adapter's problem, not the engine's (an exception there kills vLLM's engine).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from registry.adapter_files import NONFINITE_FIX, WEIGHTS_FILE, nonfinite_tensor, read_safetensors_header
from registry.records import ADAPTER_FILES, adapter_sha256

SHA_RE = re.compile(r"[0-9a-f]{64}")
#: The ``modules_to_save`` vLLM 0.32's LoRA loader accepts (vllm/lora/utils.py ``parse_fine_tuned_lora_name``):
#: classification heads; any other saved module is refused there as an unsupported LoRA weight.
VLLM_SAVED_MODULES = frozenset({"score", "classifier"})
log = logging.getLogger(f"vllm.lorafoundry.{__name__}")  # under "vllm": kept and printed by vLLM's logging


class IntegrityError(RuntimeError):
    """Adapter files do not match the sha256 they must have, or are not where verified adapters live."""


def multi_lora_problem(adapter_dir: Path) -> str | None:
    """Why vLLM's multi-LoRA path cannot serve the adapter in ``adapter_dir`` as it is, or None.

    Read from its adapter_config.json (what vLLM would load), not from the registry row: DoRA (``use_dora``)
    has a magnitude vector per layer that vLLM's LoRA kernels do not apply; served anyway it would either fail
    to load or answer without it. A trained lora_B bias and saved whole modules (other than classification heads)
    fail vLLM's loader. The merged model serves each of them exactly.
    """
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None  # unreadable or damaged files are the sha256 check's to refuse, with its own message
    if not isinstance(config, dict):
        return None
    merged = (
        "Fix: export it merged (`lorafoundry registry export-merged NAME@VERSION DIR`) and serve DIR as its own model "
        "(`vllm serve DIR`, or `base_model: DIR` in a spec)"
    )
    if config.get("use_dora"):
        return f"it is a DoRA adapter (use_dora), which vLLM's multi-LoRA server cannot apply. {merged}"
    if config.get("lora_bias"):
        return f"it trains a bias on lora_B (lora_bias), which vLLM's multi-LoRA server cannot load. {merged}"
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or set(saved) - VLLM_SAVED_MODULES:
        return (
            f"it saves whole modules ({', '.join(map(str, saved))[:200]}; modules_to_save), which vLLM's multi-LoRA "
            f"server loads only for {', '.join(sorted(VLLM_SAVED_MODULES))}. {merged}"
        )
    return None


def weights_problem(adapter_dir: Path) -> str | None:
    """Why vLLM could not load the adapter files in ``adapter_dir`` (the registry's check at registration: a
    safetensors header that parses, tensors that fit the adapter config; not their values, which
    :func:`nonfinite_problem` reads once per sha256), or None. The details name files of this machine, so they go to
    the log and the answer says only what kind of problem it is."""
    from registry.errors import RegistryInputError
    from registry.store import check_adapter_dir

    try:
        check_adapter_dir(adapter_dir, values=False)
    except (RegistryInputError, ValueError, OSError) as e:
        log.error("adapter files in %s cannot be served: %s", adapter_dir, e)
        return "its files are not a LoRA adapter vLLM can load (the server's log says why)"
    return None


#: sha256 of a verified copy -> :func:`nonfinite_problem`'s answer for its bytes (the name is checked to be the hash).
_NONFINITE: dict[str, str | None] = {}


def nonfinite_problem(adapter_dir: Path) -> str | None:
    """Why the adapter in ``adapter_dir`` must not be loaded because a weight holds NaN or infinity, or None.

    The registry refuses such files at registration (:func:`registry.adapter_files.nonfinite_tensor`, the same
    check), but a registry file is untrusted input too: a row written by other means, or by a version before that
    check, must not reach vLLM, whose loader does not look at values. On CPU one such adapter would not stay its own
    problem: the plugin computes a batch's LoRA products for all of its adapters at once (serving/cpu_lora_fix.py),
    so a NaN there reaches every request batched with it unless each token's other columns are masked, not
    multiplied by 0 (0 * inf is NaN). Read from the bytes vLLM would be given; the answer is kept per sha256 when
    the dir is a verified copy named by its hash. Unreadable files are :func:`weights_problem`'s to refuse (None
    here)."""
    from registry.errors import RegistryInputError

    adapter_dir = Path(adapter_dir)
    key = adapter_dir.name if SHA_RE.fullmatch(adapter_dir.name) else None
    if key in _NONFINITE:
        return _NONFINITE[key]
    try:
        weights = adapter_dir / WEIGHTS_FILE
        bad = nonfinite_tensor(weights, read_safetensors_header(weights))
    except (RegistryInputError, OSError, ValueError) as e:
        log.error("adapter weights in %s unreadable: %s", adapter_dir, e)
        return None
    problem = f"its weight {bad[:200]!r} holds NaN or infinity. Fix: {NONFINITE_FIX}." if bad else None
    if key is not None:
        _NONFINITE[key] = problem
    return problem


def loaded_nonfinite(lora_model) -> str | None:
    """The same check on what vLLM's worker loaded (a ``LoRAModel``: its layers' ``lora_a``, and ``lora_b`` times
    the ``scaling`` vLLM folds into it when it packs the adapter, which can overflow a finite bf16 weight): the
    module whose weights are not finite, as a reason, or None."""
    import torch

    def listed(v):
        return v if isinstance(v, (list, tuple)) else [v]

    for module, layer in lora_model.loras.items():
        b, scaling = listed(layer.lora_b), listed(getattr(layer, "scaling", 1.0))
        if len(scaling) != len(b):  # one scaling for every slice
            scaling = scaling[:1] * len(b)
        tensors = [*listed(layer.lora_a), *(t * (s or 1.0) for t, s in zip(b, scaling, strict=True) if t is not None)]
        if any(t is not None and not bool(torch.isfinite(t).all()) for t in tensors):
            return (
                f"its weights for {module[:200]!r} are not finite (NaN or infinity) once loaded. Fix: {NONFINITE_FIX}."
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
        if staged_intact(dest):
            return dest
        log.warning("verified copy %s changed on disk; staging it again from %s", dest, src)
        set_aside(dest)
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


def staged_intact(staged: Path) -> bool:
    """Whether the staged dir's files still hash to its name (its sha256)."""
    try:
        return adapter_sha256(staged)[0] == Path(staged).name
    except OSError:
        return False


def set_aside(staged: Path) -> None:
    """Take a changed staged dir out of the store at once (by rename, so no reader sees half of it), then delete it."""
    aside = staged.with_name(f".changed-{staged.name[:12]}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(staged, aside)
    except FileNotFoundError:  # another process set it aside first
        return
    shutil.rmtree(aside, ignore_errors=True)


def restage(sha256: str, stage_root: Path, registered: list[Path]) -> Path:
    """Stage ``sha256`` again from the first of the ``registered`` dirs whose files hash to it (a changed staged
    copy is set aside by :func:`stage`). Raises :class:`IntegrityError` when none does."""
    for src in registered:
        try:
            return stage(src, sha256, stage_root)
        except (IntegrityError, OSError) as e:
            log.warning("cannot re-stage %s… from %s: %s", sha256[:12], src, e)
    raise IntegrityError(
        f"verified adapter {sha256[:12]}… changed on disk and no registered copy hashes to it: refused. "
        "Fix: `lorafoundry registry verify`."
    )


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
