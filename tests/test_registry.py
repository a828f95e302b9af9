"""The DuckDB registry: migrations, versions, idempotent registration, hashes, lock retry, CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import duckdb
import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from registry.store import SCHEMA_VERSION, AdapterRegistry, NewAdapter, RegistryError, adapter_sha256


def make_adapter_dir(path: Path, r: int = 4, seed: int = 0) -> Path:
    """A minimal but real peft LoRA dir: config + safetensors weights."""
    import torch

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["v_proj", "q_proj"],
        "base_model_name_or_path": "base"}))
    g = torch.Generator().manual_seed(seed)
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(r, 8, generator=g)},
              str(path / "adapter_model.safetensors"))
    return path


def new(path: Path, name: str = "a", **kw) -> NewAdapter:
    return NewAdapter(name=name, path=path, base_model="builtin:tiny",
                      metrics={"exact_match": {"base": 0.0, "adapter": 0.5}}, **kw)


def test_register_assigns_versions_and_is_idempotent(tmp_path):
    reg = AdapterRegistry(tmp_path / "r.duckdb")
    d1, d2 = make_adapter_dir(tmp_path / "a1"), make_adapter_dir(tmp_path / "a2", seed=1)
    v1 = reg.register(new(d1))
    assert (v1.version, v1.status, v1.r, v1.lora_alpha) == (1, "candidate", 4, 8)
    assert v1.target_modules == ["q_proj", "v_proj"]
    assert v1.adapter_sha256 == adapter_sha256(d1)[0]
    assert reg.register(new(d1)).version == 1  # same sha, same name: the existing version
    assert reg.register(new(d2)).version == 2
    assert reg.register(new(d1, name="b")).version == 1
    assert [(r.name, r.version) for r in reg.list()] == [("a", 1), ("a", 2), ("b", 1)]
    assert reg.get("a").version == 2 and reg.get("a", 1).metrics["exact_match"]["adapter"] == 0.5
    cols, rows = reg.query("SELECT action, count(*) FROM events GROUP BY 1")
    assert dict(rows) == {"register": 3}


def test_rejected_adapters_are_not_servable(tmp_path):
    reg = AdapterRegistry(tmp_path / "r.duckdb")
    reg.register(new(make_adapter_dir(tmp_path / "a1")))
    reg.register(new(make_adapter_dir(tmp_path / "a2", seed=1), status="rejected"))
    reg.register(new(make_adapter_dir(tmp_path / "b1", seed=2), name="b", status="rejected"))
    assert [(r.name, r.version) for r in reg.servable()] == [("a", 1)]


def test_refuses_non_lora_or_pickled_dirs(tmp_path):
    reg = AdapterRegistry(tmp_path / "r.duckdb")
    with pytest.raises(RegistryError, match="no adapter_config.json"):
        reg.register(new(tmp_path))
    d = make_adapter_dir(tmp_path / "p")
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(RegistryError, match="pickled"):
        reg.register(new(d))
    assert reg.list() == []


def test_migrations_and_newer_schema_refused(tmp_path):
    path = tmp_path / "r.duckdb"
    AdapterRegistry(path).list()  # read on a missing file creates nothing
    assert not path.exists()
    reg = AdapterRegistry(path)
    reg.register(new(make_adapter_dir(tmp_path / "a")))
    assert reg.schema_version() == SCHEMA_VERSION
    con = duckdb.connect(str(path))
    con.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', now())", [SCHEMA_VERSION + 1])
    con.close()
    with pytest.raises(RegistryError, match="newer than this lorafoundry"):
        AdapterRegistry(path).list()


def _register_many(args):
    path, dirs, name = args
    reg = AdapterRegistry(path, max_wait_s=120)
    return [reg.register(new(Path(d), name=name)).version for d in dirs]


def test_concurrent_writers_get_gapless_versions(tmp_path):
    dirs = [str(make_adapter_dir(tmp_path / f"d{i}", seed=i)) for i in range(12)]
    path = tmp_path / "r.duckdb"
    AdapterRegistry(path).register(new(Path(dirs[0]), name="seed"))  # create + migrate once
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.map(_register_many, [(path, dirs[i::4], "x") for i in range(4)])
    versions = sorted(v for vs in results for v in vs)
    assert versions == list(range(1, 13))


def test_cli_registry_list_json(tmp_path):
    from orchestration.cli import app

    reg = AdapterRegistry(tmp_path / "registry.duckdb")
    reg.register(new(make_adapter_dir(tmp_path / "a1")))
    res = CliRunner().invoke(app, ["registry", "list", "--json", "--home", str(tmp_path)])
    assert res.exit_code == 0, res.output
    (row,) = [json.loads(line) for line in res.stdout.splitlines()]
    for key in ("name", "version", "status", "base_model", "method", "r", "lora_alpha", "target_modules", "path",
                "adapter_sha256", "dataset_fingerprint", "metrics"):
        assert key in row
    human = CliRunner().invoke(app, ["registry", "list", "--home", str(tmp_path)])
    assert human.exit_code == 0 and "candidate" in human.stdout
