"""Fix for vLLM CPU multi-LoRA: base-model tokens (LoRA index -1) get the
LoRA delta of the *last* adapter slot when batched with adapter requests.

Root cause (vllm 0.32.0, vllm/lora/ops/torch_ops/lora_ops.py):
bgmv_shrink / bgmv_expand / bgmv_expand_slice gather per-token weights with
``lora_weights[lora_indices_tensor]``.  The punica metadata marks "no LoRA"
tokens with the sentinel -1 (PunicaWrapperBase.token_lora_indices docstring,
punica_wrapper/utils.py convert_mapping), and the Triton kernels early-exit on
-1, but in PyTorch -1 is a valid index -> slot max_loras-1.  The sgmv_* ops
used by PunicaWrapperCPU (is_prefill is always True on CPU) delegate to the
bgmv_* ops, and ``no_lora`` only short-circuits when *every* token is -1, so a
mixed batch applies the last slot's adapter to base requests.

Fix: wrap the three bgmv_* ops: gather with the index clamped to >= 0 and zero
the input rows of -1 tokens, so their delta is exactly 0 (shrink writes 0,
expand adds 0).  Valid-index rows are bit-for-bit unchanged.  Idempotent; a
logged no-op if the target code does not look as expected (or is fixed).

Must run in the process that owns the model runner (the VllmWorker process,
started with multiprocessing *spawn* on CPU), so call apply() from a
``vllm.general_plugins`` entry point (loaded in APIServer, EngineCore and
every worker).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys

_TESTED_VERSIONS = ("0.32.",)  # prefix match; other versions: shape check decides
_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_MARK = "_lfx_no_lora_fix"

log = logging.getLogger("lorafoundry.vllm_cpu_lora_fix")


def _logger():
    try:  # use vLLM's logger so the message shows up in the server log
        from vllm.logger import init_logger

        return init_logger("vllm.lorafoundry_cpu_lora_fix")  # under "vllm" so it is printed
    except Exception:
        return log


def _make_wrapper(orig):
    # All three ops have signature (inputs, lora_weights, output_tensor,
    # lora_indices_tensor, ...) and compute einsum("bi,boi->bo", inputs,
    # lora_weights[lora_indices_tensor]) - one index per input row.
    @functools.wraps(orig)
    def wrapper(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        no_lora = lora_indices_tensor < 0
        inputs = inputs.masked_fill(no_lora.unsqueeze(-1), 0)
        return orig(
            inputs,
            lora_weights,
            output_tensor,
            lora_indices_tensor.clamp(min=0),
            *args,
            **kwargs,
        )

    setattr(wrapper, _MARK, True)
    wrapper.__wrapped_original__ = orig
    return wrapper


def apply() -> bool:
    """Patch vLLM's torch LoRA ops (CPU path). Returns True if patched/active."""
    logger = _logger()
    try:
        import vllm
        import vllm.lora.ops.torch_ops as torch_ops_pkg
        import vllm.lora.ops.torch_ops.lora_ops as lora_ops
    except Exception as e:  # vLLM layout changed / not installed
        logger.warning("lorafoundry LoRA fix: vllm torch_ops not importable (%s); skipped", e)
        return False

    version = getattr(vllm, "__version__", "?")
    originals = {}
    for name in _OPS:
        fn = getattr(lora_ops, name, None)
        if fn is None or not callable(fn):
            logger.warning("lorafoundry LoRA fix: %s.%s missing (vllm %s); skipped", lora_ops.__name__, name, version)
            return False
        if getattr(fn, _MARK, False):
            logger.debug("lorafoundry LoRA fix already applied in this process")
            return True
        try:
            src = inspect.getsource(fn)
            params = list(inspect.signature(fn).parameters)
        except (OSError, TypeError, ValueError) as e:
            logger.warning("lorafoundry LoRA fix: cannot inspect %s (%s); skipped", name, e)
            return False
        if params[:4] != ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor"]:
            logger.warning(
                "lorafoundry LoRA fix: unexpected signature of %s %s (vllm %s); skipped", name, params, version
            )
            return False
        if "[lora_indices_tensor]" not in src or '"bi, boi -> bo"' not in src:
            logger.warning(
                "lorafoundry LoRA fix: %s no longer gathers weights[lora_indices_tensor] (vllm %s); skipped",
                name,
                version,
            )
            return False
        if "clamp" in src or "masked_fill" in src or "== -1" in src or "< 0" in src:
            logger.info("lorafoundry LoRA fix: vllm %s already handles -1 in %s; not needed", version, name)
            return False
        originals[name] = fn

    if not version.startswith(_TESTED_VERSIONS):
        logger.warning(
            "lorafoundry LoRA fix: vllm %s not tested (tested: %s); code shape matches, applying anyway",
            version,
            _TESTED_VERSIONS,
        )

    patched = {name: _make_wrapper(fn) for name, fn in originals.items()}
    # sgmv_* look bgmv_* up in lora_ops' globals; PunicaWrapperCPU and the
    # torch_ops package hold their own references (from-imports): replace every
    # reference to the original function objects in already-imported vllm
    # modules, then import punica_cpu (if not yet imported) and patch it too.
    try:
        import vllm.lora.punica_wrapper.punica_cpu  # noqa: F401
    except Exception as e:
        logger.debug("punica_cpu not importable: %s", e)
    n = 0
    by_id = {id(fn): patched[name] for name, fn in originals.items()}
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "vllm" or mod_name.startswith("vllm.")):
            continue
        d = getattr(mod, "__dict__", None)
        if not d:
            continue
        for attr, val in list(d.items()):
            new = by_id.get(id(val))
            if new is not None:
                setattr(mod, attr, new)
                n += 1
    ok = all(getattr(getattr(m, name), _MARK, False) for m in (lora_ops, torch_ops_pkg) for name in _OPS)
    logger.info(
        "lorafoundry LoRA fix: patched %s (%d references) for vllm %s: "
        "no-LoRA (-1) tokens now get no adapter delta on CPU",
        ", ".join(_OPS),
        n,
        version,
    )
    return ok
