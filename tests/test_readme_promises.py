"""Promises the README makes that no other test checked (issue 26, item 10), each tested where it is decided: the
memory rule of `method: auto`, a sweep point's failing gate as a warning, and the guard's 4 MiB body limit. (The
fourth, "two processes never build a `builtin:` base twice", is in tests/test_model_cache.py.)"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from lora_assets import envs
from lora_assets.base_model import resolve_base_model
from lora_assets.methods import choose_method
from lora_assets.spec import AdapterSpec

FOUR_MIB = 4 * 1024 * 1024


# --- `adapters.<name>.method: auto`: "QLoRA only if bf16 weights + training state exceed 90% of free memory" ------


@pytest.fixture(scope="module")
def base(random_base, tmp_path_factory):
    return resolve_base_model(str(random_base), tmp_path_factory.mktemp("home"))


def test_method_auto_chooses_qlora_only_past_90_percent_of_the_memory_budget(base):
    spec = AdapterSpec(dataset="d")  # method: auto, the default
    estimate = choose_method(spec, base, budget_bytes=1 << 40).estimate_bytes
    assert choose_method(spec, base, budget_bytes=math.ceil(estimate / 0.9) + 1).method == "lora"
    assert choose_method(spec, base, budget_bytes=math.floor(estimate / 0.9) - 1).method == "qlora"
    fits_but_past_90 = choose_method(spec, base, budget_bytes=int(estimate / 0.95))  # room, but under 10% spare
    assert fits_but_past_90.method == "qlora" and "> 90%" in fits_but_past_90.reason


def test_method_set_in_the_spec_is_kept_whatever_the_budget(base):
    for method in ("lora", "qlora"):
        choice = choose_method(AdapterSpec(dataset="d", method=method), base, budget_bytes=1)
        assert choice.method == method and "set in the spec" in choice.reason


def test_method_auto_measures_the_budget_in_free_memory(base):
    import psutil

    choice = choose_method(AdapterSpec(dataset="d"), base)  # this machine: a CPU, so available RAM
    assert 0.5 < choice.budget_bytes / psutil.virtual_memory().available < 2
    assert choice.method == "lora"  # a 2-layer model fits any machine these tests run on


# --- Sweeps: "a failing gate on a sweep point is a warning (a result of the sweep, a non-blocking check), not a stop"


def write_rows(path: Path, n: int = 40) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question {i} on item {i * 7}"},
                {"role": "assistant", "content": "yes"},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow  # trains two sweep points on the 2-layer random base, a few steps each
def test_a_sweep_point_failing_its_gate_warns_and_the_run_goes_on(random_base, tmp_path):
    import dagster as dg

    from lora_assets.pipeline import adapter_jobs
    from lora_assets.spec import validate_spec
    from orchestration.assets import build_assets
    from orchestration.resources import resources_from_env
    from registry.store import AdapterRegistry

    adapter = {"dataset": "d", "max_steps": 4, "batch_size": 4, "max_eval_rows": 4}
    gate = {"metric": "eval_loss", "min_gain": 0.05}  # the point at a learning rate of 1e-9 cannot gain that
    spec = validate_spec(
        {
            "base_model": str(random_base),
            "datasets": {"d": {"path": str(write_rows(tmp_path / "d.jsonl")), "eval_fraction": 0.2}},
            "adapters": {"s": {**adapter, "gate": gate, "sweep": {"learning_rate": [1e-2, 1e-9]}}},
        }
    )
    point = {job.point["learning_rate"]: key for key, job in adapter_jobs(spec).items()}
    home = tmp_path / "home"
    result = dg.materialize(
        build_assets(spec, deployment=False), resources=resources_from_env(home), raise_on_error=False
    )
    assert result.success
    checks = {e.asset_key.path[1]: e for e in result.get_asset_check_evaluations() if e.check_name == "quality_gate"}
    assert not checks[point[1e-9]].passed and checks[point[1e-9]].severity == dg.AssetCheckSeverity.WARN
    assert checks[point[1e-2]].passed, checks[point[1e-2]].description
    registry = AdapterRegistry(home / "registry.duckdb")
    status = {r.training_config["sweep_point"]["learning_rate"]: r.status for r in registry.list(name="s")}
    assert status == {1e-9: "rejected", 1e-2: "champion"}
    (board,) = [
        e for e in result.get_asset_materialization_events() if e.asset_key.path == ["adapter", "s", "leaderboard"]
    ]
    assert board.materialization.metadata["winner_version"].value == registry.champion("s").version


# --- The guard: "bodies above 4 MiB are refused (413)" --------------------------------------------------------------


async def _echo(scope, receive, send) -> None:
    """Stands in for vLLM: answers 200 with the length of the prompt it was given."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(json.loads(body)["prompt"])).encode()})


def post_in_chunks(guard, body: bytes, chunk: int = 64 * 1024) -> tuple[int, bytes, int]:
    """POST ``body`` to /v1/completions through ``guard`` as a client streams it: (status, response body, bytes the
    guard read before answering)."""
    sent: list[dict] = []
    read = 0

    async def receive() -> dict:
        nonlocal read
        part = body[read : read + chunk]
        read += len(part)
        return {"type": "http.request", "body": part, "more_body": read < len(body)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    asyncio.run(guard(scope, receive, send))
    (start,) = [m for m in sent if m["type"] == "http.response.start"]
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), read


#: The bytes of a completion request for the base around its prompt.
FRAME_BYTES = len(json.dumps({"model": "tiny", "prompt": ""}).encode())


def completion_body(size: int) -> bytes:
    """A completion request for the base, exactly ``size`` bytes long."""
    return json.dumps({"model": "tiny", "prompt": "x" * (size - FRAME_BYTES)}).encode()


@pytest.fixture
def guard(tmp_path, monkeypatch):
    from serving.guard import LoraFoundryGuard
    from serving.settings import ServerSettings

    settings = ServerSettings(tmp_path / "registry.duckdb", "b" * 64, "tiny", tmp_path / "adapters", tmp_path / "v")
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(envs.VLLM_API_KEY.name, raising=False)  # no client key: the body is what is tested
    return LoraFoundryGuard(_echo)


def test_a_body_of_4_mib_is_served(guard):
    body = completion_body(FOUR_MIB)
    status, answer, read = post_in_chunks(guard, body)
    assert (status, read) == (200, FOUR_MIB)
    assert int(answer) == FOUR_MIB - FRAME_BYTES  # the whole prompt reached the server


def test_a_body_over_4_mib_is_refused_413_before_it_is_read_to_the_end(guard):
    body = completion_body(FOUR_MIB + 1) + b" " * FOUR_MIB  # one byte too many, and a second 4 MiB behind it
    status, answer, read = post_in_chunks(guard, body)
    assert status == 413 and json.loads(answer)["error"]["code"] == 413
    assert read <= FOUR_MIB + 64 * 1024  # it stopped reading at the first chunk past the limit; vLLM saw nothing
