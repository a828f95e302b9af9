"""Training configuration problems found before any weights load, and advice that does not stop a run."""

from __future__ import annotations

import json

from lora_assets.base_model import resolve_base_model
from lora_assets.pipeline import Pipeline
from lora_assets.spec import LLAMA_LINEAR_MODULES, AdapterSpec, SpecError, validate_spec
from lora_assets.train import linear_module_names, preflight, training_warnings


def test_linear_modules_of_a_llama_from_config_alone(tmp_path, random_base):
    base = resolve_base_model(str(random_base), tmp_path)
    assert linear_module_names(base) == set(LLAMA_LINEAR_MODULES)


def test_preflight_names_the_field_the_value_and_the_fix(tmp_path, random_base):
    base = resolve_base_model(str(random_base), tmp_path)
    assert preflight("adapters.a", AdapterSpec(dataset="d"), base) == []
    (msg,) = preflight("adapters.a", AdapterSpec(dataset="d", target_modules=["q_proj", "query_key_value"]), base)
    assert msg.startswith("adapters.a.target_modules:") and "query_key_value" in msg and "all-linear" in msg


def test_pipeline_preflight_collects_every_adapter(tmp_path, random_base):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    spec = validate_spec({"base_model": str(random_base), "datasets": {"d": {"path": "d.jsonl"}},
                          "adapters": {"a": {"dataset": "d", "target_modules": ["c_attn"]},
                                       "b": {"dataset": "d", "sweep": {"target_modules": [["q_proj"], ["wq"]]}}}},
                         tmp_path)
    try:
        Pipeline(spec, tmp_path / "home").preflight()
        raise AssertionError("expected a SpecError")
    except SpecError as e:
        assert len(e.problems) == 2
        assert any(p.startswith("adapters.a.target_modules") for p in e.problems)
        assert any(p.startswith("adapters.b (sweep point b.p1).target_modules") for p in e.problems)
    assert not (tmp_path / "home" / "datasets").exists()  # nothing was cleaned


def test_training_warnings():
    assert training_warnings(AdapterSpec(dataset="d"), 500) == []
    (alpha,) = training_warnings(AdapterSpec(dataset="d", r=16, lora_alpha=128), 5000)
    assert "alpha/r" in alpha and "8" in alpha
    (rank,) = training_warnings(AdapterSpec(dataset="d", r=128), 300)
    assert "r=128" in rank and "300" in rank
