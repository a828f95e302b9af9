"""Spec validation: every problem reported at once, each naming its field, value and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_assets.spec import AdapterSpec, SpecError, load_spec, validate_spec
from orchestration.cli import app

ROOT = Path(__file__).resolve().parents[1]


def good_raw() -> dict:
    return {
        "base_model": "builtin:tiny",
        "datasets": {"d": {"path": "examples/data/sentiment.jsonl"}},
        "adapters": {"a": {"dataset": "d"}},
    }


def problems(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as e:
        validate_spec(raw, ROOT)
    return e.value.problems


@pytest.mark.parametrize(
    ("spec_file", "base"),
    [("examples/demo.yaml", "builtin:smollm2-135m-instruct"), ("examples/tiny.yaml", "builtin:tiny")],
)
def test_example_specs_are_valid(spec_file, base):
    spec = load_spec(ROOT / spec_file)
    assert spec.base_model == base
    assert len(spec.datasets) >= 2 and len(spec.adapters) >= 2
    assert {a.dataset for a in spec.adapters.values()} == set(spec.datasets)


def test_defaults_follow_lora_practice():
    a = AdapterSpec(dataset="d")
    assert (a.r, a.alpha, a.lora_dropout, a.method) == (16, 32, 0.05, "auto")
    assert a.target_modules == "all-linear"  # resolved against the base: tests/test_train_config.py
    assert AdapterSpec(dataset="d", r=8).alpha == 16
    assert AdapterSpec(dataset="d", r=8, lora_alpha=8).alpha == 8


@pytest.mark.parametrize(
    "patch, field, fragment",
    [
        ({"adapters": {"a": {"dataset": "d", "r": -1}}}, "adapters.a.r", "-1"),
        ({"adapters": {"a": {"dataset": "d", "lora_alpha": 0}}}, "adapters.a.lora_alpha", "0"),
        ({"adapters": {"a": {"dataset": "d", "lora_dropout": 1.5}}}, "adapters.a.lora_dropout", "1.5"),
        ({"adapters": {"a": {"dataset": "nope"}}}, "adapters.a.dataset", "'nope'"),
        ({"adapters": {"a": {"dataset": "d", "rank": 8}}}, "adapters.a.rank", "unknown key"),
        ({"datasets": {"d": {"path": "missing.jsonl"}}}, "datasets.d.path", "missing.jsonl"),
        (
            {"datasets": {"d": {"path": "examples/data/sentiment.jsonl", "eval_fraction": 2}}},
            "datasets.d.eval_fraction",
            "2",
        ),
        ({"serving": {"port": 0}}, "serving.port", "0"),
        ({"base_model": "builtin:huge"}, "base_model", "builtin:huge"),
        ({"colour": "blue"}, "colour", "unknown key"),
    ],
)
def test_bad_spec_names_field_and_value(patch, field, fragment):
    found = problems({**good_raw(), **patch})
    assert any(p.startswith(field + ":") and fragment in p for p in found), found


def test_every_problem_is_reported_at_once():
    raw = good_raw()
    raw["adapters"] = {"a": {"dataset": "nope", "r": 0, "lora_dropout": -0.1}}
    raw["serving"] = {"port": -5}
    found = problems(raw)
    for field in ("adapters.a.r", "adapters.a.lora_dropout", "adapters.a.dataset", "serving.port"):
        assert any(p.startswith(field + ":") for p in found), (field, found)


def test_epochs_rejected_with_the_reason():
    raw = good_raw()
    raw["adapters"]["a"]["num_train_epochs"] = 3
    (msg,) = [p for p in problems(raw) if "num_train_epochs" in p]
    assert "exactly one epoch" in msg and "more" in msg and "data" in msg


def test_gate_needs_exactly_one_threshold():
    raw = good_raw()
    raw["adapters"]["a"]["gate"] = {"metric": "exact_match"}
    assert any(p.startswith("adapters.a.gate") and "exactly one" in p for p in problems(raw))


def test_sweep_expands_to_the_grid():
    a = AdapterSpec(dataset="d", sweep={"r": [4, 16], "target_modules": [["q_proj", "v_proj"], "all-linear"]})
    points = a.sweep_points()
    assert len(points) == 4
    assert {(p.r, p.alpha) for p in points} == {(4, 8), (16, 32)}


def test_cli_validate_exit_codes(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["validate", str(ROOT / "examples/demo.yaml")]).exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: builtin:tiny\ndatasets: {}\nadapters: {x: {dataset: y, r: 0}}\n")
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2
    assert "adapters.x.r" in res.output and "adapters.x.dataset" in res.output


def test_compile_false_serves_eagerly():
    """`serving.compile` is on by default (vLLM compiles; the plugin makes its CPU LoRA layers compilable); false
    passes vLLM's own switch, `--enforce-eager`."""
    from serving.launch import build_vllm_command

    assert "--enforce-eager" not in build_vllm_command(Path("/m"), "m", [], validate_spec(good_raw(), ROOT).serving)
    eager = validate_spec({**good_raw(), "serving": {"compile": False}}, ROOT).serving
    assert "--enforce-eager" in build_vllm_command(Path("/m"), "m", [], eager)


def test_deterministic_serving_computes_in_float32_and_refuses_a_lower_precision():
    """`serving.deterministic` means float32 for vLLM's `--dtype` and for evaluation; with an explicit bf16/fp16
    `dtype` the two settings contradict each other, and the problem names both fields and the fix."""
    from lora_assets.hardware import resolve_dtype
    from serving.launch import build_vllm_command

    spec = validate_spec({**good_raw(), "serving": {"deterministic": True}}, ROOT)
    assert spec.serving.compute_dtype == "float32"
    cmd = build_vllm_command(Path("/m"), "m", [], spec.serving)
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    default = validate_spec(good_raw(), ROOT).serving
    assert default.compute_dtype == "auto" and resolve_dtype(default.compute_dtype) in ("bfloat16", "float32")
    assert validate_spec({**good_raw(), "serving": {"deterministic": True, "dtype": "float32"}}, ROOT)
    (msg,) = problems({**good_raw(), "serving": {"deterministic": True, "dtype": "bfloat16"}})
    assert msg.startswith("serving:") and "deterministic: true" in msg and "'bfloat16'" in msg and "Fix:" in msg
