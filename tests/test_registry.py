"""The DuckDB registry: migrations, versions, idempotent registration, hashes, lock retry, CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import duckdb
import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from registry.errors import RegistryError
from registry.records import NewAdapter, adapter_sha256
from registry.schema import SCHEMA_VERSION
from registry.store import AdapterRegistry


def make_adapter_dir(path: Path, r: int = 4, seed: int = 0) -> Path:
    """A minimal but real peft LoRA dir: config + safetensors weights."""
    import torch

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": 2 * r,
                "target_modules": ["v_proj", "q_proj"],
                "base_model_name_or_path": "base",
            }
        )
    )
    g = torch.Generator().manual_seed(seed)
    save_file(
        {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(r, 8, generator=g)},
        str(path / "adapter_model.safetensors"),
    )
    return path


def new(path: Path, name: str = "a", **kw) -> NewAdapter:
    return NewAdapter(
        name=name, path=path, base_model="builtin:tiny", metrics={"exact_match": {"base": 0.0, "adapter": 0.5}}, **kw
    )


def test_register_assigns_versions_and_is_idempotent(tmp_path, registry_location):
    reg = AdapterRegistry(registry_location)
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


def test_rejected_adapters_are_not_servable(tmp_path, registry_location):
    reg = AdapterRegistry(registry_location)
    reg.register(new(make_adapter_dir(tmp_path / "a1")))
    reg.register(new(make_adapter_dir(tmp_path / "a2", seed=1), status="rejected"))
    reg.register(new(make_adapter_dir(tmp_path / "b1", seed=2), name="b", status="rejected"))
    assert [(r.name, r.version) for r in reg.servable()] == [("a", 1)]


def test_refuses_non_lora_or_pickled_dirs(tmp_path, registry_location):
    reg = AdapterRegistry(registry_location)
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
    path, dirs = args
    reg = AdapterRegistry(path, max_wait_s=300)
    # alternate between two names so that both see concurrent version assignment
    return [
        (name, reg.register(new(Path(d), name=name)).version)
        for i, d in enumerate(dirs)
        for name in [("x", "y")[i % 2]]
    ]


def test_eight_processes_register_200_adapters_without_gaps(tmp_path):
    dirs = [str(make_adapter_dir(tmp_path / f"d{i}", seed=i)) for i in range(200)]
    path = tmp_path / "r.duckdb"
    AdapterRegistry(path).schema_version()  # nothing needed up front: the first writer creates and migrates
    ctx = mp.get_context("spawn")
    with ctx.Pool(8) as pool:  # any exception in a worker would be re-raised here
        results = pool.map(_register_many, [(path, dirs[i * 25 : (i + 1) * 25]) for i in range(8)])
        # Shut the pool down gracefully: Pool.__exit__ terminates its workers with SIGTERM, which CI may have us
        # ignore; then a worker waiting on the task queue's lock never exits and the join waits for ever (seen).
        pool.close()
        pool.join()
    got = [nv for r in results for nv in r]
    assert len(got) == 200
    for name in ("x", "y"):
        versions = sorted(v for n, v in got if n == name)
        assert versions == list(range(1, len(versions) + 1)), name  # no gaps, no duplicates
    assert len(AdapterRegistry(path).list()) == 200


def test_cli_registry_list_json(tmp_path):
    from orchestration.cli import app

    reg = AdapterRegistry(tmp_path / "registry.duckdb")
    reg.register(new(make_adapter_dir(tmp_path / "a1")))
    res = CliRunner().invoke(app, ["registry", "list", "--json", "--home", str(tmp_path)])
    assert res.exit_code == 0, res.output
    (row,) = [json.loads(line) for line in res.stdout.splitlines()]
    for key in (
        "name",
        "version",
        "status",
        "base_model",
        "method",
        "r",
        "lora_alpha",
        "target_modules",
        "path",
        "adapter_sha256",
        "dataset_fingerprint",
        "metrics",
    ):
        assert key in row
    human = CliRunner().invoke(app, ["registry", "list", "--home", str(tmp_path)])
    assert human.exit_code == 0 and "candidate" in human.stdout


def _metrics(loss: float) -> dict:
    return {"eval_loss": {"base": 9.0, "adapter": loss}, "exact_match": {"base": 0.0, "adapter": 1.0}}


def test_champion_rule_promotes_only_better_versions(tmp_path, registry_location):
    reg = AdapterRegistry(registry_location)
    dirs = [make_adapter_dir(tmp_path / f"d{i}", seed=i) for i in range(5)]

    def add(i: int, loss: float, **kw):
        return reg.register(
            NewAdapter(
                name="a",
                path=dirs[i],
                base_model="builtin:tiny",
                metrics=_metrics(loss),
                promote=kw.pop("promote", "if_better"),
                rank_metric="eval_loss",
                **kw,
            )
        )

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
    _, events = reg.query(
        "SELECT action, version, detail->>'previous_champion' FROM events WHERE action = 'promote' ORDER BY occurred_at"
    )
    assert [(a, v, p) for a, v, p in events] == [("promote", 1, None), ("promote", 3, "1"), ("promote", 5, "3")]
    board = reg.leaderboard("a")
    assert [r["version"] for r in board] == [5, 3, 1, 2, 4]  # by eval_loss, the rejected one last
    assert board[0]["rank"] == 1 and board[0]["metric_value"] == 0.5
    _, champs = reg.query("SELECT name, version FROM champions")
    assert champs == [("a", 5)]


def test_same_bytes_re_evaluated_take_the_new_gate_outcome(tmp_path, registry_location):
    """A changed gate re-registers the same weights: rejected -> candidate (and champion by the rule), and a
    champion that now fails is rejected and leaves the champion alias; nothing else changes, no new version."""
    reg = AdapterRegistry(registry_location)
    d = make_adapter_dir(tmp_path / "d")

    def again(status: str, loss: float):
        return reg.register(
            NewAdapter(
                name="a",
                path=d,
                base_model="b",
                metrics=_metrics(loss),
                status=status,
                promote="if_better",
                rank_metric="eval_loss",
            )
        )

    assert again("rejected", 2.0).status == "rejected"
    assert again("rejected", 2.0).status == "rejected"  # nothing changed: nothing written
    passed = again("candidate", 2.0)  # the gate was loosened
    assert (passed.version, passed.status) == (1, "champion") and reg.get("a:champion").version == 1
    failed = again("rejected", 2.5)  # a stricter gate, a new evaluation
    assert (failed.version, failed.status, failed.metrics["eval_loss"]["adapter"]) == (1, "rejected", 2.5)
    assert reg.servable() == [] and reg.aliases("a") == {}
    _, rows = reg.query("SELECT action, count(*) FROM events GROUP BY 1 ORDER BY 1")
    assert dict(rows) == {"promote": 1, "reevaluate": 2, "reject": 1}
    reg.archive("a", 1)
    assert again("candidate", 2.0).status == "archived"  # a retired version stays retired

    d2 = make_adapter_dir(tmp_path / "d2", seed=2)
    reg.register(NewAdapter(name="c", path=d2, base_model="b", metrics=_metrics(2.0), status="rejected"))
    plain = reg.register(NewAdapter(name="c", path=d2, base_model="b"))  # files again, no evaluation
    assert plain.status == "rejected"  # only an evaluation can pass a gate


def test_registering_again_with_the_base_present_records_its_hash(tmp_path, registry_location):
    reg = AdapterRegistry(registry_location)
    d = make_adapter_dir(tmp_path / "outside")
    first = reg.register(NewAdapter(name="x", path=d, base_model="b"))
    assert first.base_model_hash is None
    home_copy = make_adapter_dir(tmp_path / "adapters" / "imported" / "x")  # same bytes, inside the home
    again = reg.register(NewAdapter(name="x", path=home_copy, base_model="b", base_model_hash="h" * 64))
    assert (again.version, again.base_model_hash, again.path) == (1, "h" * 64, str(home_copy.resolve()))
    assert (
        reg.register(NewAdapter(name="x", path=d, base_model="b", base_model_hash="z" * 64)).base_model_hash == "h" * 64
    )  # a recorded hash is never replaced


def test_champion_rule_higher_is_better_and_always(tmp_path, registry_location):
    reg = AdapterRegistry(registry_location)
    d = [make_adapter_dir(tmp_path / f"d{i}", seed=i) for i in range(3)]
    em = [0.8, 0.6, 0.9]
    recs = [
        reg.register(
            NewAdapter(
                name="b",
                path=d[i],
                base_model="x",
                rank_metric="exact_match",
                promote="if_better",
                metrics={"exact_match": {"base": 0, "adapter": em[i]}},
            )
        )
        for i in range(3)
    ]
    assert [r.status for r in recs] == ["champion", "candidate", "champion"]
    always = reg.register(
        NewAdapter(
            name="b",
            path=make_adapter_dir(tmp_path / "d9", seed=9),
            base_model="x",
            promote="always",
            metrics={"exact_match": {"base": 0, "adapter": 0.1}},
        )
    )
    assert always.status == "champion"


def test_older_schema_file_is_upgraded_in_place(tmp_path):
    from registry.schema import _m001_initial

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
        return {
            "version": v,
            "sweep_point": json.dumps({"r": r, "seed": seed}),
            "metric_value": loss,
            "rank_metric": "eval_loss",
            "trainable_params": r * 100,
            "status": "candidate",
        }

    rows = [row(1, 4, 0, 1.0), row(2, 4, 1, 1.2), row(3, 4, 2, 1.1), row(4, 16, 0, 0.5), row(5, 16, 1, 0.7)]
    groups = across_seeds(rows)
    assert [g["label"] for g in groups] == ["r=16", "r=4"] and [g["seeds"] for g in groups] == [2, 3]
    mean, low, high = mean_ci([1.0, 1.2, 1.1])
    assert abs(mean - 1.1) < 1e-9 and abs((high - mean) - 4.303 * 0.1 / 3**0.5) < 1e-9 and low < mean < high
    assert groups[1]["mean"] == mean


def test_aliases_move_with_history_and_resolve(tmp_path, registry_location):
    reg = AdapterRegistry(registry_location, actor="tester")
    for i in range(3):
        reg.register(new(make_adapter_dir(tmp_path / f"d{i}", seed=i)))
    reg.set_alias("a", "prod", 1)
    reg.set_alias("a", "prod", 2)
    assert reg.get("a:prod").version == 2 and reg.get("a", "prod").version == 2 and reg.get("a@1").version == 1
    assert reg.aliases("a") == {"prod": 2}
    reg.set_alias("a", "prod", None)
    assert reg.aliases("a") == {}
    history = [(h["alias"], h["version"], h["previous_version"], h["actor"]) for h in reg.alias_history("a")]
    assert history == [("prod", 1, None, "tester"), ("prod", 2, 1, "tester"), ("prod", None, 2, "tester")]
    with pytest.raises(RegistryError, match="no alias 'prod'"):
        reg.get("a:prod")
    with pytest.raises(RegistryError, match="set by promotion"):
        reg.set_alias("a", "champion", 1)
    reg.promote("a", 3)
    assert reg.get("a:champion").version == 3
    archived = reg.archive("a", 3)
    assert archived.status == "archived" and reg.aliases("a") == {}  # an archived version keeps no alias
    assert [(r.name, r.version) for r in reg.servable()] == [("a", 2)]
    with pytest.raises(RegistryError, match="archived and cannot be promoted"):
        reg.promote("a", 3)


def test_verify_catches_one_flipped_byte_and_serving_skips_it(tmp_path, registry_location):
    reg = AdapterRegistry(registry_location)
    d = make_adapter_dir(tmp_path / "d")
    reg.register(new(d))
    assert [v.ok for v in reg.verify()] == [True]
    weights = d / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    (result,) = reg.verify()
    assert not result.ok and "differs" in result.detail
    assert [r.name for r in reg.servable()] == ["a"] and reg.servable(verify=True) == []


def test_list_filters_and_metric_order(tmp_path, registry_location):
    reg = AdapterRegistry(registry_location)
    for i, (em, ds) in enumerate([(0.2, "d1"), (0.9, "d1"), (0.5, "d2"), (0.7, "d2+d1"), (0.6, "d10")]):
        reg.register(
            NewAdapter(
                name=f"n{i}",
                path=make_adapter_dir(tmp_path / f"a{i}", seed=i),
                base_model="b",
                dataset=ds,
                metrics={"exact_match": {"base": 0.0, "adapter": em}},
            )
        )
    assert [r.name for r in reg.list(order_by="exact_match", descending=True)] == ["n1", "n3", "n4", "n2", "n0"]
    assert [r.name for r in reg.list(min_metric={"exact_match": 0.5})] == ["n1", "n2", "n3", "n4"]
    assert [r.name for r in reg.list(dataset="d1", max_metric={"exact_match": 0.5})] == ["n0"]
    assert [r.name for r in reg.list(dataset="d1")] == ["n0", "n1", "n3"]  # alone or in a mixture, not d10
    assert reg.list(base_model="other") == []
    with pytest.raises(RegistryError, match="not a metric name"):
        reg.list(order_by="x'; DROP TABLE adapters; --")


@pytest.fixture
def cli_home(tmp_path):
    """A home of its own for one CLI test, and ``ok(*args)``: run `registry ARGS --home HOME`, expect exit 0,
    return stdout."""
    from orchestration.cli import app

    home = tmp_path / "home"

    def ok(*args: str, at: Path = home) -> str:
        res = CliRunner().invoke(app, ["registry", *args, "--home", str(at)])
        assert res.exit_code == 0, res.output
        return res.stdout

    ok.home = home
    return ok


@pytest.fixture
def populated(cli_home, tmp_path):
    """``cli_home`` with ext@1 (alias stable), ext@2 (base other-base, champion) and trained@1 (dataset demo)."""
    reg = AdapterRegistry(cli_home.home / "registry.duckdb")
    for seed, base in ((0, "base"), (1, "other-base")):
        reg.register(NewAdapter(name="ext", path=make_adapter_dir(tmp_path / f"ext{seed}", seed=seed), base_model=base))
    reg.promote("ext", 2)
    reg.set_alias("ext", "stable", 1)
    reg.register(new(make_adapter_dir(tmp_path / "t", seed=5), name="trained", dataset="demo"))
    return cli_home


def test_cli_register_is_idempotent_and_takes_the_base_from_the_config(cli_home, tmp_path):
    d = make_adapter_dir(tmp_path / "ext1")
    first = json.loads(cli_home("register", str(d), "--name", "ext", "--json"))
    assert (first["version"], first["status"], first["base_model"]) == (1, "candidate", "base")
    again = json.loads(cli_home("register", str(d), "--name", "ext", "--json"))
    assert (again["version"], again["adapter_sha256"]) == (1, first["adapter_sha256"])


def test_cli_promote_and_alias_show_in_show(cli_home, tmp_path):
    for seed in (0, 1):
        cli_home("register", str(make_adapter_dir(tmp_path / f"ext{seed}", seed=seed)), "--name", "ext")
    assert "ext@2 is now champion" in cli_home("promote", "ext", "2")
    cli_home("alias", "ext@1", "stable")
    shown = json.loads(cli_home("show", "ext:champion", "--json"))
    assert shown["version"] == 2 and shown["aliases"] == {"champion": 2, "stable": 1}


def test_cli_list_filters_by_base_model(populated):
    listed = [json.loads(line) for line in populated("list", "--json", "--base-model", "other-base").splitlines()]
    assert [(r["name"], r["version"]) for r in listed] == [("ext", 2)]


def test_cli_sql_reads_the_views(populated):
    rows = [json.loads(line) for line in populated("sql", "SELECT name, version FROM champions", "--json").splitlines()]
    assert rows == [{"name": "ext", "version": 2}]


def test_cli_sql_refuses_writes(populated):
    from orchestration.cli import app

    denied = CliRunner().invoke(app, ["registry", "sql", "DELETE FROM adapters", "--home", str(populated.home)])
    assert denied.exit_code == 1 and "read-only" in denied.output.lower()


def test_cli_verify_passes_for_unchanged_files(populated):
    assert [json.loads(line)["ok"] for line in populated("verify", "--json").splitlines()] == [True] * 3


def test_cli_card_writes_a_hub_model_card_that_verify_ignores(populated):
    import yaml

    trained = AdapterRegistry(populated.home / "registry.duckdb").get("trained@1")
    card_path = Path(populated("card", "trained@1").split("wrote ", 1)[1].strip())
    assert card_path == Path(trained.path) / "README.md"
    text = card_path.read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "builtin:tiny" and meta["library_name"] == "peft"
    assert meta["base_model_relation"] == "adapter" and meta["datasets"] == ["demo"]
    (metric,) = meta["model-index"][0]["results"][0]["metrics"]
    assert (metric["type"], metric["value"]) == ("exact_match", 0.5)
    assert [v["ok"] for v in map(json.loads, populated("verify", "--json").splitlines())] == [True] * 3


def test_cli_archive_retires_a_version(populated):
    assert "ext@1 is now archived" in populated("archive", "ext@1")
    assert json.loads(populated("show", "ext@1", "--json"))["status"] == "archived"


def test_cli_export_writes_every_table(populated, tmp_path):
    populated("export", str(tmp_path / "export"))
    assert {p.name for p in (tmp_path / "export").glob("*.parquet")} == {
        "adapters.parquet",
        "aliases.parquet",
        "alias_history.parquet",
        "events.parquet",
    }


def test_cli_import_keeps_versions_statuses_and_hashes_once(populated, tmp_path):
    populated("archive", "ext@1")
    populated("export", str(tmp_path / "export"))
    other = tmp_path / "other"
    populated("import", str(tmp_path / "export"), at=other)
    moved = [json.loads(line) for line in populated("list", "--json", at=other).splitlines()]
    source = {(r.name, r.version): r.adapter_sha256 for r in AdapterRegistry(populated.home / "registry.duckdb").list()}
    assert [(r["name"], r["version"], r["status"]) for r in moved] == [
        ("ext", 1, "archived"),
        ("ext", 2, "champion"),
        ("trained", 1, "candidate"),
    ]
    assert {(r["name"], r["version"]): r["adapter_sha256"] for r in moved} == source
    assert all(Path(r["path"]).is_relative_to(other) for r in moved)
    assert "adapters 0" in populated("import", str(tmp_path / "export"), at=other)  # same rows: nothing new


def test_cli_show_of_an_unknown_name_fails_cleanly(cli_home):
    from orchestration.cli import app

    bad = CliRunner().invoke(app, ["registry", "show", "nope", "--json", "--home", str(cli_home.home)])
    assert bad.exit_code == 1 and "no adapter 'nope'" in bad.output


def test_docs_registry_queries_run_as_written(tmp_path):
    """Every ```sql block in docs/registry.md runs on a registry with data in it."""
    import re

    reg = AdapterRegistry(tmp_path / "r.duckdb")
    for i in range(3):
        reg.register(
            NewAdapter(
                name="a",
                path=make_adapter_dir(tmp_path / f"d{i}", seed=i),
                base_model="b",
                dataset="ds",
                promote="if_better",
                rank_metric="exact_match",
                metrics={
                    "exact_match": {
                        "base": 0.0,
                        "adapter": 0.3 * i,
                        "gain": 0.3 * i,
                        "gain_ci_low": 0.1 * i,
                        "gain_ci_high": 0.4 * i,
                    }
                },
            )
        )
    reg.set_alias("a", "prod", 1)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "registry.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", doc, flags=re.S)
    assert len(blocks) >= 5
    for sql in blocks:
        cols, rows = reg.query(sql)
        assert cols and rows, sql


def test_cli_register_brings_files_home_and_records_the_base(tmp_path, random_base):
    """`registry register DIR --base-model LOCAL_DIR`: the files are copied under <home>/adapters, the base's content
    hash is recorded, and the server's resolver accepts the version; without a local base it is registered but a
    note says it will not be served."""
    from lora_assets.base_model import resolve_base_model
    from orchestration.cli import app
    from serving.resolver import Refusal
    from tests.test_guard import make_resolver

    home = tmp_path / "home"
    ext = make_adapter_dir(tmp_path / "elsewhere")
    res = CliRunner().invoke(
        app,
        [
            "registry",
            "register",
            str(ext),
            "--name",
            "ext",
            "--base-model",
            str(random_base),
            "--home",
            str(home),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    base_hash = resolve_base_model(str(random_base), home).content_hash
    assert rec["base_model_hash"] == base_hash
    assert Path(rec["path"]).is_relative_to(home / "adapters") and (Path(rec["path"]) / "adapter_config.json").exists()
    resolver = make_resolver(home / "registry.duckdb", base_hash, home / "adapters")
    assert not isinstance(resolver.resolve("ext@1"), Refusal)

    res = CliRunner().invoke(
        app,
        [
            "registry",
            "register",
            str(make_adapter_dir(tmp_path / "x", seed=3)),
            "--name",
            "nobase",
            "--base-model",
            "some-org/not-here",
            "--home",
            str(home),
        ],
    )
    assert res.exit_code == 0 and "no server will load it" in res.output
    assert isinstance(resolver.resolve("nobase@1"), Refusal)


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import shutil

    from registry.portable import export_registry

    reg = AdapterRegistry(tmp_path / "r.duckdb")
    reg.register(new(make_adapter_dir(tmp_path / "a1")))
    gone = reg.register(new(make_adapter_dir(tmp_path / "a2", seed=1)))
    shutil.rmtree(gone.path)  # its files vanished after registration
    with pytest.raises(OSError):
        export_registry(reg, tmp_path / "export")
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export*"))
    (tmp_path / "ok").mkdir()  # an existing empty dir is fine
    make_adapter_dir(Path(gone.path), seed=1)
    assert export_registry(reg, tmp_path / "ok")["adapters"] == 2
    assert sorted(p.name for p in (tmp_path / "ok" / "adapters" / "a").iterdir()) == ["v1", "v2"]
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert export_registry(reg, Path("."))["adapters"] == 2  # `registry export .` in an empty dir
    assert (tmp_path / "here" / "adapters.parquet").exists()


def test_resolver_answers_are_shared_for_their_time(tmp_path):
    """The guard and vLLM's resolver plugin ask about the same name one after the other: the second asks no
    registry; after the cache time a change (here an archive) is seen."""
    from serving.resolver import Refusal
    from tests.test_guard import make_resolver

    reg = AdapterRegistry(tmp_path / "r.duckdb")
    root = tmp_path / "adapters"
    rec = reg.register(
        NewAdapter(name="a", path=make_adapter_dir(root / "a1"), base_model="b", base_model_hash="h" * 64)
    )
    guard, plugin = (make_resolver(tmp_path / "r.duckdb", "h" * 64, root, ttl_s=60) for _ in range(2))
    assert guard.resolve("a@1").adapter_sha256 == rec.adapter_sha256
    reg.archive("a", 1)
    assert not isinstance(plugin.resolve("a@1"), Refusal)  # the guard's answer, seconds old
    fresh = make_resolver(tmp_path / "r.duckdb", "h" * 64, root, ttl_s=0)
    assert fresh.resolve("a@1").status == 403
    reg.register(
        NewAdapter(name="a", path=make_adapter_dir(root / "a2", seed=2), base_model="b", base_model_hash="h" * 64)
    )
    assert not isinstance(fresh.resolve("a@2"), Refusal)  # hashed once; later checks see unchanged files
    weights = root / "a2" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))  # a new mtime: hashed again
    assert fresh.resolve("a@2").status == 409
