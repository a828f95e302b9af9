"""The two places where a LoRA training step on a CPU spends time it need not: the LM head and the dropout masks.

Measured on SmolLM2-135M (vocabulary 49,152 x hidden 576), 2 cores, fp32, one step of 8 chat rows (424 tokens):
- **LM head and loss, 21% of the step**: transformers computes logits at every position (and their softmax, its
  gradient, a zero-filled 424 x 49,152 buffer), although in chat data only the assistant tokens carry a label
  (5-10% of positions in short-answer data). :func:`supervised_lm_loss` runs the body once, then the head only at
  labelled positions, in chunks, computing the loss and the gradient for the hidden states in one pass
  (:class:`FrozenHeadCrossEntropy`): the head is frozen under LoRA, so nothing else needs its logits, and memory
  stays at one chunk of logits instead of all of them in fp32 two or three times over. Same loss, same gradients.
- **Dropout masks, 13% of the step**: peft gives each LoRA module its own ``nn.Dropout``, and ``bernoulli_`` on
  CPU draws one random number per element (7 masks per layer). :class:`BitsDropout` draws 64 random bits per 4
  elements instead and keeps an element when its 16 bits clear a threshold: still an independent Bernoulli mask
  per element, with p rounded to a multiple of 1/65,536 (0.05 -> 0.050003), ~3x cheaper.
"""

from __future__ import annotations

import torch

#: Rows of logits materialized at once: 1,024 x 49,152 fp32 = 200 MB.
HEAD_CHUNK = 1024


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` for a frozen ``weight``.

    The gradient for ``hidden`` is computed in the forward pass, chunk by chunk (softmax minus one-hot, times the
    weight), so no chunk's logits outlive it. Backward only scales that stored gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        grad = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], HEAD_CHUNK):
                h, t = hidden[start : start + HEAD_CHUNK], targets[start : start + HEAD_CHUNK]
                logits = (h.to(weight.dtype) @ weight.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad[start : start + HEAD_CHUNK] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


def supervised_lm_loss(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(summed loss, number of labelled tokens) of a causal LM, running its head only at labelled positions.

    ``model`` is a peft model or a plain causal LM; ``inputs`` holds ``input_ids``, ``labels`` and optionally
    ``position_ids`` / ``attention_mask``. Returns None when the model's head is not a frozen plain linear layer
    (then the caller uses the model's own loss).
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    # A wrapper (DDP, FSDP) has no head of its own: calling inside it would skip its hooks, so use the model's loss
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if (
        not isinstance(head, torch.nn.Linear)
        or head.bias is not None
        or head.weight.requires_grad
        or getattr(causal_lm.config, "final_logit_softcapping", None)
    ):
        return None
    labels = inputs["labels"]
    body = causal_lm.get_decoder()
    hidden = body(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    total = FrozenHeadCrossEntropy.apply(hidden[:, :-1][keep], head.weight, targets[keep])
    return total, keep.sum()


class BitsDropout(torch.nn.Module):
    """Inverted dropout with a mask from 16 random bits per element (p rounded to a multiple of 1/65,536)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        drop = round(p * 65536)
        self.p = drop / 65536
        self.threshold = drop - 32768  # kept when a uniform int16 is >= this
        self.scale = 1.0 / (1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        bits = words.view(torch.int16)[:n].view(x.shape)
        return torch.where(bits >= self.threshold, x * self.scale, torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return f"p={self.p:.6f}"


def use_bits_dropout(model) -> int:
    """Replace every LoRA ``nn.Dropout`` in a peft model by :class:`BitsDropout` (CPU only); returns how many."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for key, d in list(dropouts.items()):
            if isinstance(d, torch.nn.Dropout) and d.p > 0:
                dropouts[key] = BitsDropout(d.p)
                replaced += 1
    return replaced
