"""Checking the files of a peft LoRA adapter dir before the registry records a version of them.

A registered version is what the server loads at its next start (``--lora-modules``): files vLLM cannot load must be
refused here, where they enter, not found out there. Only what the check needs is read: adapter_config.json (at most
:data:`MAX_CONFIG_BYTES`), the *header* of adapter_model.safetensors (its 8-byte little-endian length, bounded by
:data:`MAX_HEADER_BYTES` and by the file, then JSON), and, once the header is known to be sound, the tensor data in
bounded chunks, for NaN and infinity only; nothing is opened that is not a regular file. So no file can make a check
hang or use unbounded memory.

The header is checked as the safetensors library checks it (known dtypes, shapes, data offsets that tile the data
exactly); the tensors against the config (peft LoRA tensor names of target modules, the rank, float dtypes); and, when
the base model is a local dir, against the base's weight shapes, read from the base's own safetensors headers.

Plain Python (and numpy, for the values) over paths: imports no dagster, torch or safetensors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import RegistryInputError

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: The safetensors library's own bound on a header.
MAX_HEADER_BYTES = 100_000_000
#: A real adapter_config.json is about 1 KB.
MAX_CONFIG_BYTES = 1 << 20
#: Bits per element of every safetensors dtype.
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}
#: The dtypes a LoRA weight may have: the floating-point ones vLLM loads adapters in.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
#: The bits of each float dtype's exponent, little-endian, as numpy reads the stored words: all set is infinity or NaN.
NONFINITE_BITS = {
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F32": ("<u4", 0x7F80_0000),
    "F64": ("<u8", 0x7FF0_0000_0000_0000),
}
#: Bytes of tensor data read at a time when values are checked (a multiple of every dtype's size).
VALUE_CHUNK_BYTES = 16 << 20
#: The prefix peft gives every tensor of a saved adapter (vLLM refuses other names).
PEFT_PREFIX = "base_model.model."
#: peft's tensor name suffixes of a LoRA-wrapped module, and what each tensor is.
LORA_SUFFIXES = {
    ".lora_A.weight": "A",  # [rank, in] of a Linear's [out, in] weight
    ".lora_B.weight": "B",  # [out, rank]
    ".lora_B.bias": "bias",  # [out], with lora_bias
    ".lora_embedding_A": "embedding_A",  # [rank, num_embeddings] of an Embedding's [num_embeddings, dim] weight
    ".lora_embedding_B": "embedding_B",  # [dim, rank]
    ".lora_magnitude_vector": "magnitude",  # [out], DoRA
    ".lora_magnitude_vector.weight": "magnitude",  # the same, as older peft saved it
    ".base_layer.weight": "base_layer",  # a targeted embedding's own weight (peft's save_embedding_layers)
}
NONFINITE_FIX = "train or export it again (a run whose loss diverged leaves such weights) and register the new version"
_SAVE_FIX = (
    "save the adapter again with peft (`model.save_pretrained(DIR, safe_serialization=True)`) and register the dir "
    "it writes, unchanged"
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header declares it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    #: where its data is in the file: [begin, end) bytes from the file's start
    span: tuple[int, int]


def _refuse(path: Path, what: str, fix: str = _SAVE_FIX) -> RegistryInputError:
    """The error for ``path``: what is wrong (cut short: it may quote a crafted file) and the fix."""
    what = what if len(what) <= 1000 else what[:1000] + " ..."
    return RegistryInputError(f"{path}: {what}. Fix: {fix}.")


def _open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, refused unless it is a regular file (a FIFO or device could block or
    never end). Non-blocking open: opening a FIFO does not wait for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise _refuse(path, f"cannot be opened ({e.strerror})", "make it a readable file") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refuse(path, "is not a regular file", "replace it with the file itself")
    return fd


def _strict_json(raw: bytes, path: Path, what: str) -> Any:
    """``raw`` parsed as JSON, refusing what Python's parser lets through: NaN/Infinity, numbers too large to be
    finite, duplicate keys."""

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"non-finite number {text}")
        return value

    def no_constant(text: str) -> None:
        raise ValueError(f"non-finite number {text}")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for k, v in pairs:
            if k in obj:
                raise ValueError(f"duplicate key {k!r}")
            obj[k] = v
        return obj

    try:
        return json.loads(
            raw.decode("utf-8"), parse_float=finite, parse_constant=no_constant, object_pairs_hook=no_duplicates
        )
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _refuse(path, f"{what} is not valid JSON ({str(e)[:200]})") from None


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, by name, after checking its header as the safetensors library
    does: a length within the file and :data:`MAX_HEADER_BYTES`, a JSON object, known dtypes, shapes of
    non-negative ints, and data offsets that tile the data after the header exactly. The data is not read.

    Raises:
        RegistryInputError: naming the file, what is wrong, and the fix.
    """
    path = Path(path)
    with os.fdopen(_open_regular(path), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _refuse(path, f"not a safetensors file: {size} bytes, too short for the 8-byte header length")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES:
            raise _refuse(path, f"not a safetensors file: header length {n} is over the {MAX_HEADER_BYTES} allowed")
        if n > size - 8:
            raise _refuse(path, f"not a safetensors file: header length {n} is larger than the file ({size} bytes)")
        raw = f.read(n)
    if len(raw) < n:
        raise _refuse(path, "the file shrank while it was read", "register it when nothing is writing it")
    header = _strict_json(raw, path, "the safetensors header")
    if not isinstance(header, dict):
        raise _refuse(path, f"the safetensors header is JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _refuse(path, "the header's __metadata__ is not an object of strings")
    tensors = {name: _tensor_entry(path, name, entry, data_start=8 + n) for name, entry in header.items()}
    _check_offsets(path, header, tensors, data_bytes=size - 8 - n)
    return tensors


def _tensor_entry(path: Path, name: str, entry: Any, data_start: int) -> TensorInfo:
    """One header entry checked: exactly dtype, shape and data_offsets, of the right types (the data follows the
    header, at ``data_start``)."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _refuse(path, f"header entry {name!r} is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise _refuse(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _refuse(path, f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise _refuse(path, f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    return TensorInfo(name, dtype, tuple(shape), (data_start + offsets[0], data_start + offsets[1]))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _size_bits(t: TensorInfo, limit: int) -> int:
    """Bits of data ``t``'s shape and dtype take, or ``limit + 1`` once it is known to be more than ``limit`` (a
    crafted shape's product could be too large to compute in reasonable time)."""
    if 0 in t.shape:
        return 0
    bits = DTYPE_BITS[t.dtype]
    for d in t.shape:
        bits *= d
        if bits > limit:
            return limit + 1
    return bits


def _check_offsets(path: Path, header: dict, tensors: dict[str, TensorInfo], data_bytes: int) -> None:
    """The tensors' data, in offset order, must follow each other from 0 to the end of the file, each exactly as
    long as its shape and dtype say (what safetensors checks before it loads anything)."""
    end = 0
    for name in sorted(tensors, key=lambda t: tuple(header[t]["data_offsets"])):
        begin, stop = header[name]["data_offsets"]
        info = tensors[name]
        if stop > data_bytes:
            raise _refuse(
                path, f"tensor {name!r} ends at data byte {stop}, beyond the file's {data_bytes} (a truncated file?)"
            )
        if begin != end:
            raise _refuse(path, f"tensor {name!r} starts at data byte {begin}, not {end} (its data overlaps or skips)")
        bits = _size_bits(info, limit=8 * data_bytes)
        if stop < begin or bits != (stop - begin) * 8:
            raise _refuse(
                path,
                f"tensor {name!r} ({info.dtype} {list(info.shape)}) needs "
                f"{'more than the file holds' if bits > 8 * data_bytes else f'{bits / 8:g} bytes'}, but data_offsets "
                f"{[begin, stop]} span {stop - begin}",
            )
        end = stop
    if end != data_bytes:
        raise _refuse(path, f"the tensors' data ends at byte {end} of {data_bytes}: the file has trailing bytes")


def nonfinite_tensor(path: Path, tensors: dict[str, TensorInfo]) -> str | None:
    """The name of the first float tensor of the weights file ``path`` that holds NaN or infinity, or None.

    ``tensors`` is the file's header from :func:`read_safetensors_header`. Each tensor's stored words are read (in
    chunks of :data:`VALUE_CHUNK_BYTES`) and tested for an all-ones exponent, the IEEE 754 mark of both; tensors of
    other dtypes are not read. A file shorter than its header said (changed since) counts as unreadable.

    Raises:
        RegistryInputError: the file cannot be read.
    """
    import numpy as np  # here, not at the top: the CLI's light commands (`registry list`) do not pay its import

    path = Path(path)
    with os.fdopen(_open_regular(path), "rb") as f:
        for t in sorted(tensors.values(), key=lambda t: t.span):
            if t.dtype not in NONFINITE_BITS:
                continue
            dtype, bits = NONFINITE_BITS[t.dtype]
            f.seek(t.span[0])
            left = t.span[1] - t.span[0]
            while left > 0:
                raw = f.read(min(left, VALUE_CHUNK_BYTES))
                if not raw or len(raw) % np.dtype(dtype).itemsize:
                    raise _refuse(path, "the file shrank while it was read", "register it when nothing is writing it")
                words = np.frombuffer(raw, dtype=dtype)
                if np.any((words & bits) == bits):
                    return t.name
                left -= len(raw)
    return None


def read_adapter_config(path: Path) -> dict[str, Any]:
    """adapter_config.json of a LoRA adapter, checked: a JSON object, ``peft_type`` LORA, ``r`` a positive integer,
    ``lora_alpha`` a positive number, ``target_modules`` module names (or peft's one regex), and ``rank_pattern`` /
    ``modules_to_save`` of the right types when present.

    Raises:
        RegistryInputError: naming the file, the field, the bad value and the fix.
    """
    path = Path(path)
    with os.fdopen(_open_regular(path), "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise _refuse(path, f"over {MAX_CONFIG_BYTES} bytes, not a peft adapter config")
    cfg = _strict_json(raw, path, "it")
    if not isinstance(cfg, dict):
        raise _refuse(path, f"JSON {type(cfg).__name__}, not an object")
    if cfg.get("peft_type") != "LORA":
        raise RegistryInputError(
            f"{path.parent}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be registered."
        )
    fix = "set it to what the adapter was trained with (peft writes this file with save_pretrained)"
    r, alpha, targets = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("target_modules")
    if not _is_count(r) or r == 0:
        raise _refuse(path, f"r is {r!r}, not a positive integer", fix)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise _refuse(path, f"lora_alpha is {alpha!r}, not a positive number", fix)
    names = [targets] if isinstance(targets, str) else targets  # a str is peft's regex over module names
    if not isinstance(names, list) or not names or not all(isinstance(t, str) and t for t in names):
        raise _refuse(path, f"target_modules is {targets!r}, not a list of module names", fix)
    ranks = cfg.get("rank_pattern") or {}
    if not isinstance(ranks, dict) or not all(_is_count(v) and v > 0 for v in ranks.values()):
        raise _refuse(path, f"rank_pattern is {ranks!r}, not {{module pattern: positive rank}}", fix)
    saved = cfg.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved):
        raise _refuse(path, f"modules_to_save is {saved!r}, not a list of module names", fix)
    return cfg


def local_base_dir(base_model: str | None) -> Path | None:
    """The model dir ``base_model`` names when it is a local dir on this machine (one with a config.json), else None
    (a `builtin:` name or a hub id: their weights are not looked up here)."""
    if not base_model or base_model.startswith("builtin:"):
        return None
    try:
        d = Path(base_model).expanduser()
        return d if (d / "config.json").is_file() else None
    except (OSError, ValueError):  # a hub id is no path: names too long, NUL bytes
        return None


def base_weight_shapes(base_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """The shape of every weight of the model in ``base_dir``, by name, from its safetensors headers; None when they
    cannot be known: no safetensors files, a quantized checkpoint (packed shapes), or files that do not parse
    (logged: that is the base's own problem, reported where the base is loaded)."""
    base_dir = Path(base_dir)
    files = sorted(base_dir.glob("*.safetensors"))
    try:
        with os.fdopen(_open_regular(base_dir / "config.json"), "rb") as f:
            config = json.loads(f.read(MAX_CONFIG_BYTES))
        if not files or not isinstance(config, dict) or config.get("quantization_config"):
            return None
        shapes = {t.name: t.shape for f in files for t in read_safetensors_header(f).values()}
    except (RegistryInputError, ValueError, RecursionError) as e:
        log.warning("base model %s: weight shapes unreadable, adapters are not checked against them: %s", base_dir, e)
        return None
    embed = next((s for name, s in shapes.items() if name.endswith("embed_tokens.weight")), None)
    if "lm_head.weight" not in shapes and embed is not None:  # tied embeddings: lm_head is the embedding matrix
        shapes["lm_head.weight"] = embed
    return shapes


def check_adapter_tensors(
    path: Path,
    tensors: dict[str, TensorInfo],
    cfg: dict[str, Any],
    base_shapes: dict[str, tuple[int, ...]] | None = None,
) -> None:
    """Check the tensors of the weights file ``path`` against its adapter config (from :func:`read_adapter_config`)
    and, when known, the base model's weight shapes (from :func:`base_weight_shapes`).

    Every tensor must be a float, named as peft names the LoRA tensors of a target module (or the weights of a
    ``modules_to_save`` module); ``lora_A`` is ``[rank, in]`` and ``lora_B`` ``[out, rank]`` with the rank ``r`` (or
    a ``rank_pattern`` rank), DoRA magnitudes and LoRA biases ``[out]``, and ``in``/``out`` are those of the base's
    weight of that module (a module the base has no weight for is not checked against it: vLLM ignores it too).
    A regex ``target_modules`` or ``rank_pattern`` key is never run (a config's regex can take exponential time):
    names are then checked for their form only, and a rank for being one of the config's.

    Raises:
        RegistryInputError: naming the file, the tensor, what is wrong (got vs expected) and the fix.
    """
    if not tensors:
        raise _refuse(path, "holds no tensors")
    modules: dict[str, dict[str, TensorInfo]] = {}
    for t in tensors.values():
        if t.dtype not in FLOAT_DTYPES:
            raise _refuse(path, f"tensor {t.name!r} has dtype {t.dtype}, not a float type ({', '.join(FLOAT_DTYPES)})")
        module, kind = _split_name(path, t.name, cfg)
        modules.setdefault(module, {})[kind] = t
    if not any(kind in parts for parts in modules.values() for kind in ("A", "B", "embedding_A", "embedding_B")):
        raise _refuse(path, "holds no LoRA tensors (lora_A / lora_B)")
    for module, parts in modules.items():
        if "saved" in parts:
            _check_saved(path, module, parts["saved"], base_shapes)
        else:
            _check_lora_module(path, module, parts, cfg, base_shapes)


def _split_name(path: Path, name: str, cfg: dict[str, Any]) -> tuple[str, str]:
    """(module, kind) of a tensor: the base module it belongs to and which of its tensors it is (a kind of
    :data:`LORA_SUFFIXES`); for a weight of a ``modules_to_save`` module, (the base weight's name, ``saved``)."""
    key = name.removeprefix(PEFT_PREFIX)
    if key != name:
        for suffix, kind in LORA_SUFFIXES.items():
            module = key.removesuffix(suffix)
            if module != key and module and _is_target(module, cfg["target_modules"]):
                return module, kind
        if any(f".{m}." in f".{key}" for m in cfg.get("modules_to_save") or []):  # a weight of (a child of) m
            return key, "saved"
    raise _refuse(
        path,
        f"tensor name {name!r} is not one of this adapter's: expected {PEFT_PREFIX}<module>.lora_A.weight, "
        f".lora_B.weight (or lora_embedding_A/B, lora_magnitude_vector) with <module> one of target_modules "
        f"{cfg['target_modules']}, or a weight of modules_to_save {cfg.get('modules_to_save') or []}",
    )


def _is_target(module: str, targets: list[str] | str) -> bool:
    """Whether peft's rule puts ``module`` among ``targets`` (always for a regex: see check_adapter_tensors)."""
    return isinstance(targets, str) or any(module == t or module.endswith(f".{t}") for t in targets)


def _check_saved(path: Path, weight: str, t: TensorInfo, base_shapes: dict[str, tuple[int, ...]] | None) -> None:
    """A ``modules_to_save`` weight replaces the base's: the same shape."""
    if base_shapes is not None and weight in base_shapes:
        _check_shape(path, t, base_shapes[weight], "the base model's weight")


def _check_lora_module(
    path: Path,
    module: str,
    parts: dict[str, TensorInfo],
    cfg: dict[str, Any],
    base_shapes: dict[str, tuple[int, ...]] | None,
) -> None:
    """The LoRA tensors of one module checked against the rank, each other, and the base's weight."""
    ranks = {cfg["r"], *(cfg.get("rank_pattern") or {}).values()}
    embedding = "embedding_A" in parts or "embedding_B" in parts
    a, b = parts.get("embedding_A" if embedding else "A"), parts.get("embedding_B" if embedding else "B")
    for t, rank_axis in ((a, 0), (b, 1)):
        if t is None:
            continue
        if len(t.shape) != 2:
            raise _refuse(path, f"tensor {t.name!r} has shape {list(t.shape)}, not a 2-D LoRA matrix")
        if t.shape[rank_axis] not in ranks:
            pattern = f" (or {sorted(ranks - {cfg['r']})} by rank_pattern)" if len(ranks) > 1 else ""
            raise _refuse(
                path,
                f"tensor {t.name!r} has shape {list(t.shape)}, so rank {t.shape[rank_axis]}, but adapter_config.json "
                f"says r = {cfg['r']}{pattern}",
                "register the dir peft wrote, with the adapter_config.json saved with these weights",
            )
    if a is not None and b is not None:
        _check_shape(path, b, (b.shape[0], a.shape[0]), f"lora_A's rank {a.shape[0]}")
    out = b.shape[0] if b is not None else None
    for t in (parts.get("bias"), parts.get("magnitude")):
        if t is not None:
            _check_shape(path, t, (out,), "lora_B's output size")
    # a module the base lacks is skipped, as vLLM skips it (it applies an adapter's tensors module by module)
    base = base_shapes.get(f"{module}.weight") if base_shapes is not None else None
    if base is None:
        return
    first = next(iter(parts.values()))
    if len(base) != 2:
        raise _refuse(path, f"tensor {first.name!r} is for {module!r}, whose base weight {list(base)} is not 2-D")
    if cfg.get("fan_in_fan_out"):  # Conv1D-style bases store [in, out]
        base = base[::-1]
    # a Linear's weight is [out, in]; an Embedding's [num_embeddings, dim], with lora_embedding_A [rank, num]
    size_in, size_out = (base[0], base[1]) if embedding else (base[1], base[0])
    what = "the base model's weight"
    if a is not None:
        _check_shape(path, a, (a.shape[0], size_in), what)
    if b is not None:
        _check_shape(path, b, (size_out, b.shape[1]), what)
    if "base_layer" in parts:
        _check_shape(path, parts["base_layer"], base_shapes[f"{module}.weight"], what)


def _check_shape(path: Path, t: TensorInfo, want: tuple[int | None, ...], source: str) -> None:
    """``t`` must have shape ``want`` (None: any size on that axis), which ``source`` says it must."""
    if len(t.shape) != len(want) or any(w is not None and g != w for g, w in zip(t.shape, want, strict=True)):
        from_base = source.startswith("the base")
        raise _refuse(
            path,
            f"tensor {t.name!r} has shape {list(t.shape)}, expected {['*' if w is None else w for w in want]} "
            f"from {source}",
            "register it with --base-model set to the model it was trained on"
            if from_base
            else "register the dir peft wrote, with the adapter_config.json saved with these weights",
        )


def check_adapter_files(adapter_dir: Path, base_model: str | None = None, values: bool = True) -> dict[str, Any]:
    """Check a peft LoRA adapter dir before it is registered or imported; return its adapter_config.json (with
    ``target_modules`` a list: peft's regex form becomes a one-item list).

    Args:
        adapter_dir: the dir: adapter_config.json and adapter_model.safetensors.
        base_model: the base model it is registered for; when it is a local model dir, the tensors' shapes are
            checked against the base's weights too.
        values: read the weights too and refuse NaN or infinity (:func:`nonfinite_tensor`): one such value in a
            served adapter makes its answers NaN. False reads headers only (the server's catalog check, which
            checks values once per sha256 where it loads them).

    Raises:
        RegistryInputError: what is wrong with which file, and the fix.
    """
    d = Path(adapter_dir)
    if not (d / CONFIG_FILE).exists():
        raise RegistryInputError(f"{d} is not a peft adapter dir: no {CONFIG_FILE}.")
    cfg = read_adapter_config(d / CONFIG_FILE)
    if not (d / WEIGHTS_FILE).exists():
        pickled = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt")]
        why = f" (found pickled weights {pickled}, which are refused)" if pickled else ""
        raise RegistryInputError(f"{d}: no {WEIGHTS_FILE}{why}. Fix: save with safe_serialization=True.")
    tensors = read_safetensors_header(d / WEIGHTS_FILE)
    base_dir = local_base_dir(base_model)
    check_adapter_tensors(d / WEIGHTS_FILE, tensors, cfg, base_weight_shapes(base_dir) if base_dir else None)
    if values and (bad := nonfinite_tensor(d / WEIGHTS_FILE, tensors)):
        raise _refuse(d / WEIGHTS_FILE, f"tensor {bad!r} holds NaN or infinity", NONFINITE_FIX)
    targets = cfg["target_modules"]
    return {**cfg, "target_modules": [targets] if isinstance(targets, str) else targets}
