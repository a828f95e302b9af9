"""serving/cpu_lora_fix.py: the grouped CPU LoRA ops against a per-token reference (table-driven, real vLLM ops
as the fallback), including batches of base tokens (-1), one adapter, and several."""

from __future__ import annotations

import pytest
import torch

ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

from serving.cpu_lora_fix import _grouped  # noqa: E402

INDEX_SETS = {
    "base only": [-1] * 6,
    "one adapter": [2] * 6,
    "mixed": [-1, 0, 2, -1, 2, 1],
    "adapters": [1, 0, 0, 3, 1, 2],
}


def vllm_op(name: str):
    """vLLM's own op, also when cpu_lora_fix.apply() already replaced it in this process (building vLLM's argument
    parser loads the general plugins: tests/test_security_serving.py does, in the test process)."""
    fn = getattr(ops, name)
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
