"""Where a decode step's LoRA time goes on this CPU: lorafoundry's fused CPU LoRA layer (serving/cpu_lora_fix.py)
against the base model's own matrix products, on SmolLM2-135M's shapes, in one run.

    python bench/lora_layer_bench.py [--tokens 8,32] [--threads 1]

For one decode step of SmolLM2-135M (30 layers; per layer the LoRA layers q/k/v, o, gate/up and down, r 16, 4
adapter slots, 2 adapters active and half the tokens on the base), in bfloat16 and in float32:
- ``base``: the step's linear layers alone, as vLLM's CPU worker runs them (``dispatch_cpu_unquantized_gemm``:
  oneDNN or, on AMX CPUs, its small-GEMM kernel, with prepacked weights), with the real weight shapes;
- ``lora``: ``PunicaWrapperCPU.add_lora_linear`` as lorafoundry replaces it, on a real PunicaWrapperCPU (what the
  compiled model's ``lorafoundry::cpu_lora_linear`` op runs): the LoRA products added to the base's output, the
  two-product path (fp32 models, layers over the one-product path's size cap);
- ``one product`` (bf16 only): ``serving/cpu_lora_extended.py:extended_linear``, the whole layer (base and LoRA) in
  one oneDNN product, what the server runs for bf16 layers; its LoRA cost is its time minus ``base``; and the time of
  the first step after an adapter is loaded into a slot, which packs every layer's weights again.
Prints milliseconds per step (median of --reps) and the LoRA cost / base. vLLM's CPU worker computes on one thread on
a 2-core machine, hence --threads 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, KV, INTER, LAYERS, RANK, SLOTS = 576, 192, 1536, 30, 16, 4
#: (input size, output slices) of each LoRA layer of one decoder layer.
LAYER_SHAPES = {"qkv": (HIDDEN, (HIDDEN, KV, KV)), "o": (HIDDEN, (HIDDEN,)), "gate_up": (HIDDEN, (INTER, INTER)),
                "down": (INTER, (HIDDEN,))}  # fmt: skip


def timed(fn, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs, after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="8,32", help="tokens per step (decode: one per running request)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()

    import torch
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    from serving.cpu_lora_extended import extended_linear, keep_weight
    from serving.cpu_lora_fix import _fused_add_lora_linear

    torch.set_num_threads(args.threads)
    orig = getattr(PunicaWrapperCPU.add_lora_linear, "__wrapped_original__", PunicaWrapperCPU.add_lora_linear)
    fused = _fused_add_lora_linear(orig)
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"cpu capability {cpu}, {args.threads} thread(s), torch {torch.__version__}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        for dtype in (torch.bfloat16, torch.float32):
            torch.manual_seed(0)
            wrapper = PunicaWrapperCPU(max(256, tokens), 8, "cpu")
            idx = torch.tensor([-1 if t % 2 == 0 else (t // 2) % 2 for t in range(tokens)])  # half base, 2 adapters
            wrapper._token_lora_indices[:tokens].copy_(idx)
            wrapper.indices_len = [tokens] * 4
            layers = []
            for _ in range(LAYERS):
                for size_in, slices in LAYER_SHAPES.values():
                    w = torch.nn.Linear(size_in, sum(slices), bias=False, dtype=dtype)
                    w.quant_method = UnquantizedLinearMethod()
                    keep_weight(w)  # as the plugin does in a LoRA-enabled worker
                    dispatch_cpu_unquantized_gemm(w, remove_weight=True)  # as vLLM's CPU worker prepares it
                    a = tuple(torch.randn(SLOTS, 1, RANK, size_in, dtype=dtype) * 0.02 for _ in slices)
                    b = tuple(torch.randn(SLOTS, 1, s, RANK, dtype=dtype) * 0.02 for s in slices)
                    x = torch.randn(tokens, size_in, dtype=dtype)
                    layers.append((w, a, b, x, torch.zeros(tokens, sum(slices), dtype=dtype), slices))

            def base(layers=layers) -> None:
                for w, _, _, x, _, _ in layers:
                    w.quant_method.apply(w, x, None)

            def lora(layers=layers, wrapper=wrapper) -> None:
                for _, a, b, x, y, slices in layers:
                    fused(wrapper, y, x, a, b, 1.0, slices)  # vLLM folds the scale into B when it loads an adapter

            def one_product(layers=layers, wrapper=wrapper) -> None:
                for w, a, b, x, _, slices in layers:
                    extended_linear(w, wrapper, x, None, a, b, slices)

            t_base, t_lora = timed(base, args.reps), timed(lora, args.reps)
            line = f"{tokens:3d} tokens {str(dtype).removeprefix('torch.'):9s} base {t_base:7.2f} ms  "
            line += f"lora {t_lora:7.2f} ms  lora/base {t_lora / t_base:5.2f}"
            if dtype == torch.bfloat16:
                t_one = timed(one_product, args.reps)
                line += f"  one product {t_one:7.2f} ms: lora {t_one - t_base:6.2f} ms, lora/base "
                line += f"{(t_one - t_base) / t_base:5.2f}"
                for _, _, b, *_ in layers:  # an adapter loaded into slot 0 of every layer (vLLM's in-place copy_)
                    b[0][0].mul_(1.0)
                t0 = time.perf_counter()
                one_product()
                line += f"; the step after an adapter load {(time.perf_counter() - t0) * 1000:6.1f} ms (repacking)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
