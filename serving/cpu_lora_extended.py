"""A bf16 LoRA layer's whole product in one of vLLM's oneDNN calls on CPU: ``y = [x | h] @ [W | B]^T``.

vLLM runs a LoRA layer as the base product ``y = x W^T`` and then ``y += (x A^T) B^T`` (``add_lora_linear``). On CPU,
where a decode step's products are a few rows each, every extra call and pass over ``y`` costs more than its
arithmetic: after the shrink ``h = x A^T`` (all adapter slots side by side, each token's other slots' columns masked
to zero, see :mod:`serving.cpu_lora_fix`), the expand product and the addition of its bf16 result into ``y`` were
half of the LoRA time of a mixed step on SmolLM2 (docs/benchmarks.md, "Base and LoRA in one oneDNN product").
Concatenating along the inner dimension does both in the base product's own call: ``[x | h] @ [W | B_blockdiag]^T =
x W^T + h B^T``, one oneDNN product with fp32 accumulation and one rounding to bf16 (more exact than rounding the base
and the delta separately), and base-model tokens, whose ``h`` columns are all zero, get exactly the base product's
result (the extra inner columns add exact zeros; ``tests/test_cpu_lora_extended.py`` checks it bit for bit).

The price is memory and a repacking: the layer's base weight is kept (vLLM frees it once it is packed for oneDNN) and
packed a second time with the adapters' B beside it, so such a layer holds three copies of its weight instead of one
(+0.5-0.9 GB for SmolLM2-135M), and the first step after an adapter is loaded into a slot packs every layer again
(~0.2 s on SmolLM2). Hence only for layers of at most :data:`EXTENDED_MAX_BYTES` (SmolLM2-135M's largest is 3.5 MB,
Qwen2.5-1.5B's 27.5 MB): on larger ones the base product's own cost dwarfs the LoRA calls', and they keep the
two-product path, as do fp32 models and steps wider than the packed slots allow. Steps with no adapter token run
vLLM's own base product, as without this module.

In vLLM's compiled model the layer's product is one opaque custom op, ``lorafoundry::cpu_lora_base_linear``, that
returns ``y`` (no base product in the graph for these layers); eager (``serving.compile: false``) calls the same code.
"""

from __future__ import annotations

import functools
import weakref

from serving.cpu_lora_fix import (
    _PACKED_MAX_COLUMNS,
    _logger,
    _onednn_ops,
    _prefix_mask,
    _step_adapters,
    _the_wrapper,
    _weights,
)

#: Layers whose bf16 weight is at most this many bytes get the one-product path (and keep their weight).
EXTENDED_MAX_BYTES = 32 << 20

_STASH = "_lfx_base_weight"  # the base layer's weight, kept for the extended packing
_MARK = "_lfx_extended"
_bases: dict[int, weakref.ref] = {}  # id(kept weight) -> its base layer (the op receives the weight)
_LIBRARY: list = []
_PACKED: list = []  # one element once this process has packed a layer


def _keeps(layer) -> bool:
    """Keep this layer's weight: a 2-D bf16 weight under the size cap, in a vLLM process with LoRA enabled."""
    import torch
    from vllm.config import get_current_vllm_config_or_none

    w, config = getattr(layer, "weight", None), get_current_vllm_config_or_none()
    return (
        isinstance(w, torch.Tensor)
        and not w.is_meta
        and w.ndim == 2
        and w.dtype == torch.bfloat16
        and w.numel() * w.element_size() <= EXTENDED_MAX_BYTES
        and config is not None
        and config.lora_config is not None
    )


def keep_weight(layer) -> None:
    """Keep the layer's weight for :func:`extended_weights` (vLLM frees ``layer.weight`` once it is packed)."""
    kept = layer.weight.detach()
    setattr(layer, _STASH, kept)
    _bases[id(kept)] = weakref.ref(layer)


def _keep_base_weights(orig):
    """vLLM's ``dispatch_cpu_unquantized_gemm`` that first keeps the weight of a layer :func:`_keeps` picks."""

    @functools.wraps(orig)
    def dispatch_cpu_unquantized_gemm(layer, remove_weight, *args, **kwargs):
        if _keeps(layer):
            keep_weight(layer)
        return orig(layer, remove_weight, *args, **kwargs)

    setattr(dispatch_cpu_unquantized_gemm, _MARK, True)
    return dispatch_cpu_unquantized_gemm


def extended_weights(base, a_stacked, b_stacked, width: int):
    """(slots packed, rank, shrink, extended) for a layer, the last two vLLM's oneDNN handlers, or None past
    :data:`_PACKED_MAX_COLUMNS`: A of every slice and slot side by side (as
    :func:`serving.cpu_lora_fix._packed_weights`), and ``[W | B]`` with B block-diagonal over the slices. Cached on
    the base layer; repacked when an adapter is (re)loaded into a slot or a step needs a higher slot than packed (the
    width only grows)."""
    import torch

    versions = tuple(t._version for t in (*a_stacked, *b_stacked))
    hit = base.__dict__.get("_lfx_extended")
    if hit is not None and hit[0] is a_stacked[0] and hit[1] == versions and hit[2][0] >= width:  # `is`: ids recur
        return hit[2]
    rank = _weights(a_stacked[0]).shape[1]
    width = max(width, hit[2][0] if hit is not None and hit[0] is a_stacked[0] else 0)
    if width * rank > _PACKED_MAX_COLUMNS:
        return None
    ops, w = _onednn_ops(), getattr(base, _STASH)
    a_all = torch.cat([_weights(a)[:width].flatten(0, 1) for a in a_stacked])  # (slices*width*r, in)
    b_all = torch.block_diag(*(_weights(b)[:width].transpose(1, 2).flatten(0, 1) for b in b_stacked))
    w_ext = torch.cat([w, b_all.t().to(w.dtype)], dim=1)  # (out, in + slices*width*r)
    packed = (width, rank, ops.create_onednn_mm(a_all.t(), 32), ops.create_onednn_mm(w_ext.t(), 32))
    base.__dict__["_lfx_extended"] = (a_stacked[0], versions, packed)
    if not _PACKED:  # once per process: the servers' tests look for this line
        _PACKED.append(True)
        _logger().info("lorafoundry LoRA fix: LoRA layers run in one product with their base (first: %s)", w_ext.shape)
    return packed


def extended_linear(base, wrapper, x, bias, a_stacked, b_stacked, slices):
    """The LoRA layer's output for this step: vLLM's base product when no token uses an adapter, else one
    extended product; the two-product path where the step's shapes or slots are not the packed ones. 120 calls a
    decode step on SmolLM2, so the products are called as vLLM's ``onednn_mm`` calls them, without its wrapper."""
    import torch

    if x.shape[0] == wrapper.indices_len[0] and "_lfx_no_onednn" not in wrapper.__dict__:
        slots, _, masks, idx = _step_adapters(wrapper)
        if not slots:
            return base.cpu_linear(x, base.weight, bias)  # what UnquantizedLinearMethod.apply calls on CPU
        try:
            packed = extended_weights(base, a_stacked, b_stacked, slots[-1] + 1)  # slots are sorted
        except RuntimeError:  # oneDNN refused these shapes (bf16 itself was probed): two products, from now on
            wrapper._lfx_no_onednn = True
            packed = None
        if packed is not None:
            width, rank, shrink, extended = packed
            onednn_mm = torch.ops._C.onednn_mm
            h = torch.empty((x.shape[0], shrink.n), dtype=x.dtype)
            onednn_mm(h, x, None, shrink.handler_tensor)
            h.masked_fill_(_prefix_mask(idx, masks, width, len(slices), rank), 0)
            if bias is not None and bias.dtype != x.dtype:  # vLLM's small-GEMM kernel keeps its bias in fp32
                bias = bias.to(x.dtype)
            y = torch.empty((x.shape[0], extended.n), dtype=x.dtype)
            onednn_mm(y, torch.cat([x, h], dim=1), bias, extended.handler_tensor)
            return y
    y = base.quant_method.apply(base, x, bias)
    wrapper.add_lora_linear(y, x, tuple(a_stacked), tuple(b_stacked), 1.0, tuple(slices))
    return y


def _register_op() -> None:
    """``lorafoundry::cpu_lora_base_linear(x, w, bias, a, b, slices) -> y``: the layer's whole product, opaque to the
    compiled graph (registered as :func:`serving.cpu_lora_fix._register_ops` registers its ops)."""
    import torch
    from torch.library import Library

    if hasattr(torch.ops.lorafoundry, "cpu_lora_base_linear"):
        return

    def cpu_lora_base_linear(x, w, bias, a, b, slices):
        ref = _bases.get(id(w))
        base = ref() if ref is not None else None
        if base is None or getattr(base, _STASH, None) is not w:
            raise RuntimeError("lorafoundry: cpu_lora_base_linear called with a weight no base layer keeps")
        return extended_linear(base, _the_wrapper(), x, bias, a, b, slices)

    def fake(x, w, bias, a, b, slices):
        return x.new_empty((x.shape[0], w.shape[0]))

    schema = "(Tensor x, Tensor w, Tensor? bias, Tensor[] a, Tensor[] b, int[] slices) -> Tensor"
    lib = Library("lorafoundry", "FRAGMENT")
    lib.define("cpu_lora_base_linear" + schema)
    lib.impl("cpu_lora_base_linear", cpu_lora_base_linear, "CPU")
    lib._register_fake("cpu_lora_base_linear", fake)
    _LIBRARY.append(lib)


def _one_product_apply(orig):
    """``BaseLinearLayerWithLoRA._apply_sync`` that runs :func:`extended_linear` for a layer whose weight was kept
    (as the custom op while Dynamo traces); other layers and 3-D inputs take vLLM's own path."""
    import torch

    @functools.wraps(orig)
    def _apply_sync(self, x, bias=None):
        w = getattr(self.base_layer, _STASH, None)
        if w is None or x.ndim != 2 or w.shape[0] != sum(self.output_slices):
            return orig(self, x, bias)
        a, b, slices = self.lora_a_stacked, self.lora_b_stacked, self.output_slices
        if torch.compiler.is_compiling():
            return torch.ops.lorafoundry.cpu_lora_base_linear(x, w, bias, list(a), list(b), list(slices))
        return extended_linear(self.base_layer, self.punica_wrapper, x, bias, a, b, slices)

    setattr(_apply_sync, _MARK, True)
    return _apply_sync


def apply_extended(logger=None) -> bool:
    """Install the one-product path (idempotent); False, and nothing changed, where vLLM's shape differs or its
    oneDNN has no native bf16 products on this CPU (:func:`serving.cpu_lora_fix._onednn_ops`)."""
    import inspect

    logger = logger or _logger()
    try:
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
        from vllm.model_executor.layers import utils
    except Exception as e:
        logger.warning("lorafoundry LoRA fix: vLLM's LoRA layers not importable (%s); one-product path skipped", e)
        return False
    if getattr(BaseLinearLayerWithLoRA._apply_sync, _MARK, False):
        return True
    apply_sync, dispatch = BaseLinearLayerWithLoRA._apply_sync, utils.dispatch_cpu_unquantized_gemm
    if _onednn_ops() is None:
        logger.info("lorafoundry LoRA fix: no native oneDNN bf16 products here; bf16 layers keep two products")
        return False
    shapes = list(inspect.signature(apply_sync).parameters), list(inspect.signature(dispatch).parameters)[:2]
    if shapes != (["self", "x", "bias"], ["layer", "remove_weight"]):
        logger.warning("lorafoundry LoRA fix: vLLM's LoRA layer changed; one-product path skipped")
        return False
    _register_op()
    utils.dispatch_cpu_unquantized_gemm = _keep_base_weights(dispatch)
    BaseLinearLayerWithLoRA._apply_sync = _one_product_apply(apply_sync)
    limit = EXTENDED_MAX_BYTES >> 20
    logger.info("lorafoundry LoRA fix: bf16 LoRA layers to %d MiB: base and LoRA in one product", limit)
    return True
