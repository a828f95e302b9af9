"""serving/cpu_lora_extended.py: a bf16 LoRA layer's base and LoRA products in one of vLLM's oneDNN calls, against a
per-token reference, on real vLLM linear layers (``UnquantizedLinearMethod``, weights packed by vLLM's own CPU GEMM
dispatch) and a real PunicaWrapperCPU."""

from __future__ import annotations

import pytest
import torch

from serving import cpu_lora_extended, cpu_lora_fix

from .test_cpu_lora_ops import INDEX_SETS, SLICES, punica

pytestmark = pytest.mark.skipif(
    cpu_lora_fix._onednn_ops() is None,
    reason="no native oneDNN bf16 products here (a build without oneDNN, an AVX2-only CPU, AVX-512 without BF16): "
    "the one-product path is not installed (tests/test_cpu_lora_ops.py checks the two-product path such CPUs run)",
)

HIDDEN = 12


def vllm_dispatch():
    from vllm.model_executor.layers import utils

    d = utils.dispatch_cpu_unquantized_gemm
    return d.__wrapped__ if getattr(d, cpu_lora_extended._MARK, False) else d


def base_layer(monkeypatch, n_in: int, n_out: int, bias: bool = False, keep: bool = True):
    """A bf16 linear layer as vLLM's CPU worker prepares it (packed for oneDNN, its weight removed), through
    :func:`cpu_lora_extended._keep_base_weights` (``keep``: as in a process with LoRA enabled)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    layer = torch.nn.Linear(n_in, n_out, bias=bias, dtype=torch.bfloat16)
    layer.quant_method = UnquantizedLinearMethod()
    want = layer.weight.detach().clone()
    with monkeypatch.context() as m:
        if keep:
            m.setattr(cpu_lora_extended, "_keeps", lambda layer: True)
        cpu_lora_extended._keep_base_weights(vllm_dispatch())(layer, remove_weight=True)
    assert layer.weight.numel() == 0  # vLLM freed it, as the worker does
    return layer, want


def lora_bf16(slices, r=4, slots=4, scale=0.5):
    a = tuple((torch.randn(slots, 1, r, HIDDEN) * scale).bfloat16() for _ in slices)
    b = tuple((torch.randn(slots, 1, size, r) * scale).bfloat16() for size in slices)
    return a, b


def reference(x, w, bias, a, b, idx, slices):
    """Per token: x W^T + h B[slot]^T accumulated in fp32, h = x A[slot]^T rounded to bf16 (as vLLM's GPU kernels
    round the shrink), the sum rounded once to bf16; base tokens (-1) get x W^T alone."""
    y = x.float() @ w.float().T + (bias.float() if bias is not None else 0)
    offset = 0
    for a_s, b_s, size in zip(a, b, slices, strict=True):
        for t, i in enumerate(idx.tolist()):
            if i >= 0:
                h = (x[t].float() @ a_s[i, 0].float().T).bfloat16().float()
                y[t, offset : offset + size] += h @ b_s[i, 0].float().T
        offset += size
    return y.bfloat16()


def within_an_ulp(y, want):
    return ((y.float() - want.float()).abs() <= want.float().abs() * 2**-7).all()


@pytest.mark.parametrize("case", INDEX_SETS)
@pytest.mark.parametrize("layer", SLICES)
@pytest.mark.parametrize("bias", [False, True])
def test_one_product_layer_matches_the_per_token_reference(monkeypatch, case, layer, bias):
    """Within one bf16 ulp of the reference, and base-model tokens get exactly vLLM's own base product (the adapter
    columns of their inner dimension are zero, so nothing leaks into them, not even a rounding)."""
    torch.manual_seed(3)
    idx, slices = torch.tensor(INDEX_SETS[case]), SLICES[layer]
    base, w = base_layer(monkeypatch, HIDDEN, sum(slices), bias=bias)
    a, b = lora_bf16(slices)
    x = torch.randn(len(idx), HIDDEN).bfloat16()
    y = cpu_lora_extended.extended_linear(base, punica(idx), x, base.bias, a, b, slices)
    assert y.dtype == torch.bfloat16 and y.shape == (len(idx), sum(slices))
    assert within_an_ulp(y, reference(x, w, base.bias, a, b, idx, slices)), case
    on_base = idx < 0
    assert torch.equal(y[on_base], base.quant_method.apply(base, x, base.bias)[on_base])
    assert ("_lfx_extended" in base.__dict__) == bool((idx >= 0).any())  # base-only steps: vLLM's product alone


@pytest.mark.parametrize("slices", [(1536, 1536), (576,)], ids=["gate_up", "o"])
def test_base_tokens_are_exact_at_smollm2s_shapes(monkeypatch, slices):
    """The same exactness at real layers' sizes (SmolLM2-135M's gate/up, 576 -> 2 x 1536, and o, 576 -> 576, which
    vLLM runs on its small-GEMM kernel on AMX CPUs; r 16), where the kernels block the inner dimension: the
    adapters' columns come after the base's, so the base's partial sums are the same ones."""
    torch.manual_seed(4)
    idx = torch.tensor([-1 if t % 2 == 0 else (t // 2) % 2 for t in range(32)])
    base, w = base_layer(monkeypatch, 576, sum(slices))
    a = tuple((torch.randn(4, 1, 16, 576) * 0.02).bfloat16() for _ in slices)
    b = tuple((torch.randn(4, 1, size, 16) * 0.02).bfloat16() for size in slices)
    x = torch.randn(32, 576).bfloat16()
    y = cpu_lora_extended.extended_linear(base, punica(idx), x, None, a, b, slices)
    assert torch.equal(y[idx < 0], base.quant_method.apply(base, x, None)[idx < 0])
    want = reference(x, w, None, a, b, idx, slices)
    assert (y.float() - want.float()).abs().max() <= want.float().abs().max() * 2**-7


def test_layers_sharing_the_shrinks_scratch_tensor_keep_their_own_answers(monkeypatch):
    """Layers of the same shape share one scratch tensor for the shrink's output (a decode step's shape only): each
    answer is still its own layer's, after the next layer has written the scratch, and a prefill-sized step is not
    kept."""
    torch.manual_seed(5)
    slices = SLICES["gate_up"]
    idx = torch.tensor(INDEX_SETS["mixed"])
    layers = [(*base_layer(monkeypatch, HIDDEN, sum(slices)), *lora_bf16(slices)) for _ in range(3)]
    x = torch.randn(len(idx), HIDDEN).bfloat16()
    ys = [cpu_lora_extended.extended_linear(base, punica(idx), x, None, a, b, slices) for base, _, a, b in layers]
    for y, (_, w, a, b) in zip(ys, layers, strict=True):
        assert within_an_ulp(y, reference(x, w, None, a, b, idx, slices))
    assert ys[0].data_ptr() != ys[1].data_ptr()
    rows = cpu_lora_extended._SCRATCH_ROWS + 1
    wide = torch.tensor([t % 3 - 1 for t in range(rows)])
    base, w, a, b = layers[0]
    x = torch.randn(rows, HIDDEN).bfloat16()
    y = cpu_lora_extended.extended_linear(base, punica(wide, max_tokens=2 * rows), x, None, a, b, slices)
    assert within_an_ulp(y, reference(x, w, None, a, b, wide, slices))
    assert all(key[0] <= cpu_lora_extended._SCRATCH_ROWS for key in cpu_lora_extended._SCRATCH)


def test_packing_is_kept_widened_and_redone_when_an_adapter_loads(monkeypatch):
    """One packing per layer while steps need no higher slot than packed; widened when one does; redone when vLLM
    writes a slot in place (an adapter load), and the next step answers with the new weights."""
    slices = SLICES["qkv"]
    base, w = base_layer(monkeypatch, HIDDEN, sum(slices))
    a, b = lora_bf16(slices)
    wrapper = punica(torch.tensor(INDEX_SETS["mixed"]))
    packings = []
    for case in ("mixed", "one adapter", "base only", "adapters", "adapters"):  # highest slot 2, 2, -, 3, 3
        idx = torch.tensor(INDEX_SETS[case])
        wrapper._token_lora_indices[: len(idx)].copy_(idx)
        if len(packings) == 4:
            b[1][3, 0].mul_(-3.0)  # an adapter loaded into slot 3 (vLLM's in-place copy_)
        x = torch.randn(len(idx), HIDDEN).bfloat16()
        y = cpu_lora_extended.extended_linear(base, wrapper, x, None, a, b, slices)
        assert within_an_ulp(y, reference(x, w, None, a, b, idx, slices)), case
        packings.append(base.__dict__["_lfx_extended"][2])
    assert [p[0] for p in packings] == [3, 3, 3, 4, 4]  # slots packed
    assert packings[0] is packings[1] is packings[2]
    assert packings[3] is not packings[2] and packings[4] is not packings[3]


def test_too_wide_steps_take_the_two_product_path(monkeypatch):
    """Past _PACKED_MAX_COLUMNS the layer is vLLM's base product plus the fused add_lora_linear, as without this
    module: the same answer within the two-product path's roundings, nothing packed."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from .test_cpu_lora_ops import fused_op

    monkeypatch.setattr(PunicaWrapperCPU, "add_lora_linear", fused_op())
    slices = SLICES["gate_up"]
    base, w = base_layer(monkeypatch, HIDDEN, sum(slices))
    a, b = lora_bf16(slices)
    idx = torch.tensor(INDEX_SETS["mixed"])
    x = torch.randn(len(idx), HIDDEN).bfloat16()
    monkeypatch.setattr(cpu_lora_extended, "_PACKED_MAX_COLUMNS", 8)  # 3 slots x r 4 > 8
    y = cpu_lora_extended.extended_linear(base, punica(idx), x, None, a, b, slices)
    assert "_lfx_extended" not in base.__dict__
    want, base_product = reference(x, w, None, a, b, idx, slices).float(), x.float() @ w.float().T
    # the base's and the delta's roundings, then the sum's: an ulp of each
    tolerance = (base_product.abs() + (want - base_product).abs() + want.abs()) * 2**-7
    assert ((y.float() - want).abs() <= tolerance).all()


def test_weights_are_kept_only_where_lora_is_on(monkeypatch):
    """Outside a vLLM config with LoRA enabled (here: no config at all) nothing is kept: vLLM frees the weight."""
    base, _ = base_layer(monkeypatch, HIDDEN, 10, keep=False)
    assert not hasattr(base, cpu_lora_extended._STASH)
    big, _ = base_layer(monkeypatch, HIDDEN, 10)
    assert getattr(big, cpu_lora_extended._STASH).shape == (10, HIDDEN)


def test_compiled_graphs_op_returns_what_the_eager_layer_returns(monkeypatch):
    """``lorafoundry::cpu_lora_base_linear(x, w, bias)``, what vLLM's compiled model calls for these layers: the eager
    layer on the LoRA layer that wraps the base layer that kept ``w`` (its adapters' weights, slices and punica
    wrapper); its fake gives the output's shape to a trace; a weight no LoRA layer's base keeps is refused."""
    slices = SLICES["qkv"]
    base, w = base_layer(monkeypatch, HIDDEN, sum(slices))
    kept = getattr(base, cpu_lora_extended._STASH)
    a, b = lora_bf16(slices)
    cpu_lora_extended._register_op()
    op = torch.ops.lorafoundry.cpu_lora_base_linear
    x = torch.randn(len(INDEX_SETS["mixed"]), HIDDEN).bfloat16()
    with pytest.raises(RuntimeError, match="no LoRA layer's base keeps"):
        op(x, kept, None)  # no LoRA layer wraps it yet
    for case in ("mixed", "base only"):
        idx = torch.tensor(INDEX_SETS[case])
        lora = LoraLayer(base, a, b, slices, punica(idx))
        x = torch.randn(len(idx), HIDDEN).bfloat16()
        y = op(x, kept, None)
        assert torch.equal(y, cpu_lora_extended.extended_linear(base, lora.punica_wrapper, x, None, a, b, slices))
        traced = torch.compile(lambda x: op(x, kept, None) * 2, backend="aot_eager")
        assert torch.equal(traced(x), y * 2)
    with pytest.raises(RuntimeError, match="no LoRA layer's base keeps"):
        op(x, torch.zeros(sum(slices), HIDDEN).bfloat16(), None)
    del lora
    with pytest.raises(RuntimeError, match="no LoRA layer's base keeps"):
        op(x, kept, None)  # its LoRA layer is gone


class LoraLayer:
    """What the op reads of vLLM's ``BaseLinearLayerWithLoRA``, made through the patched ``__init__`` (which tells
    the base layer its LoRA layer)."""

    def __init__(self, base, a, b, slices, wrapper):
        cpu_lora_extended._remember_lora_layer(lambda self, base_layer: setattr(self, "base_layer", base_layer))(
            self, base
        )
        self.lora_a_stacked, self.lora_b_stacked, self.output_slices, self.punica_wrapper = a, b, slices, wrapper


def test_lora_layers_take_the_one_product_path_only_when_their_weight_was_kept(monkeypatch):
    """The patched ``BaseLinearLayerWithLoRA._apply_sync``: a layer whose base weight was kept runs
    :func:`extended_linear` (eagerly here; the custom op under Dynamo); one whose weight was not kept, a 3-D input, or
    an output that is not the slices' sum goes to vLLM's own method."""
    from types import SimpleNamespace

    slices = SLICES["gate_up"]
    kept, w = base_layer(monkeypatch, HIDDEN, sum(slices))
    freed, _ = base_layer(monkeypatch, HIDDEN, sum(slices), keep=False)
    a, b = lora_bf16(slices)
    idx = torch.tensor(INDEX_SETS["mixed"])
    calls = []
    apply_sync = cpu_lora_extended._one_product_apply(lambda self, x, bias=None: calls.append(x.shape) or "vllm's")

    def layer(base, output_slices=slices):
        return SimpleNamespace(
            base_layer=base, lora_a_stacked=a, lora_b_stacked=b, output_slices=output_slices, punica_wrapper=punica(idx)
        )

    x = torch.randn(len(idx), HIDDEN).bfloat16()
    y = apply_sync(layer(kept), x)
    assert not calls and within_an_ulp(y, reference(x, w, None, a, b, idx, slices))
    assert apply_sync(layer(freed), x) == "vllm's"
    assert apply_sync(layer(kept), x.unsqueeze(0)) == "vllm's"
    assert apply_sync(layer(kept, output_slices=(9, 8)), x) == "vllm's"
    assert len(calls) == 3


def test_an_adapter_whose_products_overflow_reaches_no_other_token(monkeypatch):
    """As in the two-product path (tests/test_cpu_lora_ops.py): slot 1's shrink overflows, and every token not on
    slot 1 gets exactly the product it gets when slot 1's weights are sane, base-model tokens vLLM's base product."""
    torch.manual_seed(7)
    idx, slices = torch.tensor(INDEX_SETS["mixed"]), SLICES["qkv"]
    base, _ = base_layer(monkeypatch, HIDDEN, sum(slices))
    a, b = lora_bf16(slices)
    x = (torch.randn(len(idx), HIDDEN).abs() + 0.5).bfloat16()
    sane = cpu_lora_extended.extended_linear(base, punica(idx), x, None, a, b, slices)
    for a_s in a:
        a_s[1].fill_(3e38)  # an in-place write: the layer repacks
    y = cpu_lora_extended.extended_linear(base, punica(idx), x, None, a, b, slices)
    others = idx != 1
    assert torch.isfinite(y[others]).all() and torch.equal(y[others], sane[others])
    assert torch.equal(y[idx < 0], base.quant_method.apply(base, x, None)[idx < 0])
    assert not torch.isfinite(y[~others]).all()
