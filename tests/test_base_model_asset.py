"""The base model is an asset of its own: upstream of every clean and train asset, its content hash its data
version, so one step builds or locates it and the graph shows it."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from lora_assets.base_model import resolve_base_model
from lora_assets.spec import validate_spec
from orchestration.assets import base_model_key, base_model_name, build_assets
from orchestration.keys import AssetKeys
from orchestration.resources import resources_from_env


@pytest.fixture
def spec(random_base, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(20)))
    return validate_spec(
        {
            "base_model": str(random_base),
            "datasets": {"qa": {"path": str(data)}, "more": {"path": str(data)}},
            "adapters": {"a": {"dataset": "qa"}, "s": {"dataset": "more", "sweep": {"r": [4, 8]}}},
        }
    )


@pytest.mark.parametrize("prefix", ["", "team"])
def test_base_model_is_the_root_upstream_of_every_clean_and_train(spec, prefix, tmp_path):
    keys = AssetKeys(prefix)
    assets = build_assets(spec, deployment=False, keys=keys)
    graph = dg.Definitions(assets=assets, resources=resources_from_env(tmp_path)).resolve_asset_graph()
    base = base_model_key(spec, keys)
    assert base.path[-2:] == ["base_model", spec.base_model.rstrip("/").rsplit("/", 1)[-1]]
    assert not graph.get(base).parent_keys
    for name in ("qa", "more"):
        assert base in graph.get(keys.clean(name)).parent_keys
    for job in ("a", "s.p0", "s.p1"):
        assert graph.get(keys.adapter(job, "train")).parent_keys == {keys.clean(spec.adapters[job[0]].dataset), base}


@pytest.mark.parametrize(
    ("base_model", "name"),
    [
        ("builtin:tiny", "builtin_tiny"),
        ("builtin:smollm2-135m-instruct", "builtin_smollm2-135m-instruct"),
        ("HuggingFaceTB/SmolLM2-135M", "SmolLM2-135M"),
        ("/models/my model+v2/", "my_model_v2"),
    ],
)
def test_base_model_key_names_are_readable_and_valid(base_model, name):
    assert base_model_name(base_model) == name
    dg.Definitions(assets=[dg.AssetSpec(dg.AssetKey(["base_model", name]))]).resolve_asset_graph()


def test_base_model_data_version_is_its_content_hash(spec, tmp_path):
    base = next(a for a in build_assets(spec, deployment=False) if a.key.path[0] == "base_model")
    instance = dg.DagsterInstance.ephemeral()
    versions = []
    for _ in range(2):  # a second materialization locates the same dir: the same version, nothing downstream stale
        result = dg.materialize([base], resources=resources_from_env(tmp_path), instance=instance)
        (mat,) = result.asset_materializations_for_node(base.node_def.name)
        versions.append(mat.tags["dagster/data_version"])
        assert mat.metadata["obtained"].value == "local dir"
        assert mat.metadata["parameters"].value > 0
    expected = resolve_base_model(spec.base_model, tmp_path).content_hash
    assert versions == [expected, expected]
