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
from typing import Any, NamedTuple

from serving.cpu_lora_fix import (
    _PACKED_MAX_COLUMNS,
    _logger,
    _onednn_ops,
    _prefix_mask,
    _step_adapters,
    _weights,
)

#: Layers whose bf16 weight is at most this many bytes get the one-product path (and keep their weight).
EXTENDED_MAX_BYTES = 32 << 20

_STASH = "_lfx_base_weight"  # the base layer's weight, kept for the extended packing
_MARK = "_lfx_extended"
_CACHE = "_lfx_extended"  # on a base layer: (versions, the tensors they are of, its Packed weights)
_LORA = "_lfx_lora"  # on a base layer: a weakref to the LoRA layer that wraps it
_bases: dict[int, weakref.ref] = {}  # id(kept weight) -> its base layer (the op receives the weight)
_LIBRARY: list = []
_PACKED: list = []  # one element once this process has packed a layer
_SCRATCH: dict = {}  # (rows, columns) -> the shrink's output tensor, for steps of up to _SCRATCH_ROWS tokens
_SCRATCH_ROWS = 256
_MM: list = []  # vLLM's torch.ops._C.onednn_mm.default, once a layer is packed


class Packed(NamedTuple):
    """A layer's adapter slots ``0 .. width-1`` packed for oneDNN: the shrink ``A`` (all slices and slots side by
    side) and the extended weight ``[W | B]`` (B block-diagonal over the slices)."""

    width: int  #: slots packed
    rank: int
    n_shrink: int  #: slices * width * rank columns
    shrink: Any  #: vLLM's oneDNN handler's tensor, what ``onednn_mm`` takes
    n_out: int
    extended: Any
    handlers: tuple  #: the handlers themselves: the tensors above are their addresses, valid while they live


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


def extended_weights(base, a_stacked, b_stacked, width: int) -> Packed | None:
    """The layer's :class:`Packed` weights for slots ``0 .. width-1`` at least, or None past
    :data:`_PACKED_MAX_COLUMNS` (A laid out as :func:`serving.cpu_lora_fix._packed_weights` lays it out). Cached on
    the base layer; repacked when an adapter is (re)loaded into a slot (any in-place write bumps a tensor's version
    counter) or a step needs a higher slot than packed (the width only grows)."""
    hit = base.__dict__.get(_CACHE)
    packed = hit[2] if hit is not None and hit[1][0] is a_stacked[0] else None  # `is`: ids recur
    if packed is not None and packed.width >= width and hit[0] == [t._version for t in hit[1]]:
        return packed
    return _pack_extended(base, a_stacked, b_stacked, max(width, packed.width if packed is not None else 0))


def _pack_extended(base, a_stacked, b_stacked, width: int):
    import torch

    rank = _weights(a_stacked[0]).shape[1]
    if width * rank > _PACKED_MAX_COLUMNS:
        return None
    ops, w = _onednn_ops(), getattr(base, _STASH)
    a_all = torch.cat([_weights(a)[:width].flatten(0, 1) for a in a_stacked])  # (slices*width*r, in)
    b_all = torch.block_diag(*(_weights(b)[:width].transpose(1, 2).flatten(0, 1) for b in b_stacked))
    w_ext = torch.cat([w, b_all.t().to(w.dtype)], dim=1)  # (out, in + slices*width*r)
    shrink, extended = ops.create_onednn_mm(a_all.t(), 32), ops.create_onednn_mm(w_ext.t(), 32)
    if not _MM:
        _MM.append(torch.ops._C.onednn_mm.default)
    tensors = (*a_stacked, *b_stacked)
    packed = Packed(
        width, rank, shrink.n, shrink.handler_tensor, extended.n, extended.handler_tensor, (shrink, extended)
    )
    base.__dict__[_CACHE] = ([t._version for t in tensors], tensors, packed)
    if not _PACKED:  # once per process: the servers' tests look for this line
        _PACKED.append(True)
        _logger().info("lorafoundry LoRA fix: LoRA layers run in one product with their base (first: %s)", w_ext.shape)
    return packed


def extended_linear(base, wrapper, x, bias, a_stacked, b_stacked, slices):
    """The LoRA layer's output for this step: vLLM's base product when no token uses an adapter, else one
    extended product; the two-product path where the step's shapes or slots are not the packed ones. 120 calls a
    decode step on SmolLM2, each after a product that has evicted the caches, where every Python-level call costs
    ~5-10 us: so the products are called as vLLM's ``onednn_mm`` calls them, without its wrapper, and the shrink
    writes into a scratch tensor the step's layers share."""
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
            return _one_product(x, bias, packed, _prefix_mask(idx, masks, packed.width, len(slices), packed.rank))
    y = base.quant_method.apply(base, x, bias)
    wrapper.add_lora_linear(y, x, tuple(a_stacked), tuple(b_stacked), 1.0, tuple(slices))
    return y


def _one_product(x, bias, packed: Packed, mask):
    """``[x | h] @ [W | B]^T`` with ``h = x A^T``, each token's other slots' columns zeroed."""
    import torch

    rows, (_, _, n_shrink, shrink, n_out, extended, _) = x.shape[0], packed
    h = _SCRATCH.get((rows, n_shrink))
    if h is None:  # the shrink's output, read once by the cat below: one tensor for all layers of a decode step's shape
        h = torch.empty((rows, n_shrink), dtype=x.dtype)
        if rows <= _SCRATCH_ROWS:
            _SCRATCH[(rows, n_shrink)] = h
    _MM[0](h, x, None, shrink)
    h.masked_fill_(mask, 0)
    if bias is not None and bias.dtype != x.dtype:  # vLLM's small-GEMM kernel keeps its bias in fp32
        bias = bias.to(x.dtype)
    y = torch.empty((rows, n_out), dtype=x.dtype)
    _MM[0](y, torch.cat([x, h], dim=1), bias, extended)
    return y


def _register_op() -> None:
    """``lorafoundry::cpu_lora_base_linear(x, w, bias) -> y``: the layer's whole product, opaque to the compiled graph
    (registered as :func:`serving.cpu_lora_fix._register_ops` registers its ops). The op finds its LoRA layer (the
    adapters' weights, the output slices, the punica wrapper) from the weight its base layer kept: passing the
    adapters' tensors as arguments cost ~3 us a call in the dispatcher, 120 calls a step, base-only steps too."""
    import torch
    from torch.library import Library

    if hasattr(torch.ops.lorafoundry, "cpu_lora_base_linear"):
        return

    def cpu_lora_base_linear(x, w, bias):
        ref = _bases.get(id(w))
        base = ref() if ref is not None else None
        lora = base.__dict__.get(_LORA) if base is not None and base.__dict__.get(_STASH) is w else None
        lora = lora() if lora is not None else None
        if lora is None:
            raise RuntimeError("lorafoundry: cpu_lora_base_linear called with a weight no LoRA layer's base keeps")
        a, b, slices = lora.lora_a_stacked, lora.lora_b_stacked, lora.output_slices
        return extended_linear(base, lora.punica_wrapper, x, bias, a, b, slices)

    def fake(x, w, bias):
        return x.new_empty((x.shape[0], w.shape[0]))

    lib = Library("lorafoundry", "FRAGMENT")
    lib.define("cpu_lora_base_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor")
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
        if torch.compiler.is_compiling():
            return torch.ops.lorafoundry.cpu_lora_base_linear(x, w, bias)
        a, b, slices = self.lora_a_stacked, self.lora_b_stacked, self.output_slices
        return extended_linear(self.base_layer, self.punica_wrapper, x, bias, a, b, slices)

    setattr(_apply_sync, _MARK, True)
    return _apply_sync


def _remember_lora_layer(init):
    """``BaseLinearLayerWithLoRA.__init__`` that also tells the base layer which LoRA layer wraps it (a weakref), so
    that the custom op, which receives the kept weight, finds the adapters' weights."""

    @functools.wraps(init)
    def __init__(self, base_layer, *args, **kwargs):
        init(self, base_layer, *args, **kwargs)
        base_layer.__dict__[_LORA] = weakref.ref(self)

    setattr(__init__, _MARK, True)
    return __init__


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
    init = BaseLinearLayerWithLoRA.__init__
    if _onednn_ops() is None:
        logger.info("lorafoundry LoRA fix: no native oneDNN bf16 products here; bf16 layers keep two products")
        return False
    expected = {apply_sync: ["self", "x", "bias"], dispatch: ["layer", "remove_weight"], init: ["self", "base_layer"]}
    if any(list(inspect.signature(f).parameters)[: len(want)] != want for f, want in expected.items()):
        logger.warning("lorafoundry LoRA fix: vLLM's LoRA layer changed; one-product path skipped")
        return False
    _register_op()
    utils.dispatch_cpu_unquantized_gemm = _keep_base_weights(dispatch)
    BaseLinearLayerWithLoRA._apply_sync = _one_product_apply(apply_sync)
    BaseLinearLayerWithLoRA.__init__ = _remember_lora_layer(init)
    limit = EXTENDED_MAX_BYTES >> 20
    logger.info("lorafoundry LoRA fix: bf16 LoRA layers to %d MiB: base and LoRA in one product", limit)
    return True
