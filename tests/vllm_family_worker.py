"""Serve registered adapters of several bases with vLLM, one base after another in one process, and write the
greedy tokens (run by tests/test_families.py as `python -m tests.vllm_family_worker JOBS.json OUT.json`).

Each job: a base model dir, one LoRA adapter dir, its rank, and prompts as token ids. vLLM runs its engine in this
process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, eager, float32 so that the comparison with peft is not a bf16
near-tie), with the project's plugin loaded as in `lorafoundry serve` (its CPU LoRA fix included); the import is
paid once for every family. A base vLLM cannot load is recorded with its error, and the next one runs.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def serve_one(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    t0 = time.time()
    llm = LLM(
        model=job["model"],
        dtype="float32",
        enforce_eager=True,
        enable_lora=True,
        max_lora_rank=job["rank"],
        max_loras=1,
        max_model_len=256,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    lora = LoRARequest(job["name"], 1, job["adapter"])
    outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    return {"tokens": tokens, "seconds": round(time.time() - t0, 1)}


def _register_in_process(architectures: list[str]) -> None:
    """Import each architecture's vLLM class here and register it as imported: vLLM otherwise inspects a class it
    has no cached record of in a fresh Python process (~10 s each on a clean machine), where CPU needs none."""
    from vllm import ModelRegistry

    for arch in architectures:
        cls = ModelRegistry._try_load_model_cls(arch)
        if cls is not None and cls.__name__ == arch:  # not those vLLM serves through its Transformers backend
            ModelRegistry.register_model(arch, cls)


def main(jobs_path: str, out_path: str) -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    results = {}
    jobs = json.loads(open(jobs_path).read())
    _register_in_process(sorted({job["architecture"] for job in jobs}))
    for job in jobs:
        try:
            results[job["family"]] = serve_one(job)
        except Exception:  # noqa: BLE001 - recorded for the test to report, then the next base
            results[job["family"]] = {"error": traceback.format_exc()[-3000:]}
        cleanup_dist_env_and_memory()
        gc.collect()
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
