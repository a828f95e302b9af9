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


def _metrics(loss: float) -> dict:
    return {"eval_loss": {"base": 9.0, "adapter": loss}, "exact_match": {"base": 0.0, "adapter": 1.0}}


def test_champion_rule_promotes_only_better_versions(tmp_path):
    reg = AdapterRegistry(tmp_path / "r.duckdb")
    dirs = [make_adapter_dir(tmp_path / f"d{i}", seed=i) for i in range(5)]

    def add(i: int, loss: float, **kw):
        return reg.register(NewAdapter(name="a", path=dirs[i], base_model="builtin:tiny", metrics=_metrics(loss),
                                       promote=kw.pop("promote", "if_better"), rank_metric="eval_loss", **kw))

    assert add(0, 2.0).status == "champion"  # first version that passed its gate
    assert add(1, 3.0).status == "candidate"  # worse: stays a candidate
    assert add(2, 1.0).status == "champion"  # better: takes over
    assert reg.get("a", 1).status == "candidate"  # the old champion is demoted, not lost
    assert add(3, 0.1, status="rejected").status == "rejected"  # a failed gate never becomes champion
    assert add(4, 0.5, promote="manual").status == "candidate"
    assert [r.version for r in reg.list(status="champion")] == [3]
    assert [(r.name, r.version) for r in reg.servable()] == [("a", 3)]  # the champion is what is served
    reg.promote("a", 5)
    assert reg.champion("a").version == 5 and reg.get("a", 3).status == "candidate"
    with pytest.raises(RegistryError, match="rejected and cannot be promoted"):
        reg.promote("a", 4)
    _, events = reg.query("SELECT action, version, detail->>'previous_champion' FROM events "
                          "WHERE action = 'promote' ORDER BY occurred_at")
    assert [(a, v, p) for a, v, p in events] == [("promote", 1, None), ("promote", 3, "1"), ("promote", 5, "3")]
    board = reg.leaderboard("a")
    assert [r["version"] for r in board] == [5, 3, 1, 2, 4]  # by eval_loss, the rejected one last
    assert board[0]["rank"] == 1 and board[0]["metric_value"] == 0.5
    _, champs = reg.query("SELECT name, version FROM champions")
    assert champs == [("a", 5)]


def test_champion_rule_higher_is_better_and_always(tmp_path):
    reg = AdapterRegistry(tmp_path / "r.duckdb")
    d = [make_adapter_dir(tmp_path / f"d{i}", seed=i) for i in range(3)]
    em = [0.8, 0.6, 0.9]
    recs = [reg.register(NewAdapter(name="b", path=d[i], base_model="x", rank_metric="exact_match",
                                    promote="if_better", metrics={"exact_match": {"base": 0, "adapter": em[i]}}))
            for i in range(3)]
    assert [r.status for r in recs] == ["champion", "candidate", "champion"]
    always = reg.register(NewAdapter(name="b", path=make_adapter_dir(tmp_path / "d9", seed=9), base_model="x",
                                     promote="always", metrics={"exact_match": {"base": 0, "adapter": 0.1}}))
    assert always.status == "champion"


def test_older_schema_file_is_upgraded_in_place(tmp_path):
    from registry.store import _m001_initial

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)")
    _m001_initial(con)
    con.execute("INSERT INTO schema_migrations VALUES (1, 'initial', now())")
    con.close()
    reg = AdapterRegistry(path)
    assert reg.leaderboard("none") == []  # a read upgrades the file first
    assert reg.schema_version() == SCHEMA_VERSION >= 2
    _, views = reg.query("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1")
    assert {v for (v,) in views} >= {"champions", "latest_adapters", "leaderboard"}


def test_leaderboard_across_seeds():
    from registry.leaderboard import across_seeds, mean_ci

    def row(v, r, seed, loss):
        return {"version": v, "sweep_point": json.dumps({"r": r, "seed": seed}), "metric_value": loss,
                "rank_metric": "eval_loss", "trainable_params": r * 100, "status": "candidate"}

    rows = [row(1, 4, 0, 1.0), row(2, 4, 1, 1.2), row(3, 4, 2, 1.1), row(4, 16, 0, 0.5), row(5, 16, 1, 0.7)]
    groups = across_seeds(rows)
    assert [g["label"] for g in groups] == ["r=16", "r=4"] and [g["seeds"] for g in groups] == [2, 3]
    mean, low, high = mean_ci([1.0, 1.2, 1.1])
    assert abs(mean - 1.1) < 1e-9 and abs((high - mean) - 4.303 * 0.1 / 3 ** 0.5) < 1e-9 and low < mean < high
    assert groups[1]["mean"] == mean
