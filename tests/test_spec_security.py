"""Hostile or careless spec files: anchor bombs, duplicate keys and absurd numbers are refused, fast and by name."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_assets.spec import MAX_LORA_RANK, AdapterSpec, SpecError, load_spec, parse_spec_yaml
from orchestration.cli import app

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "sentiment.jsonl"


def spec_text(dataset: str = "", adapter: str = "") -> str:
    """A valid spec, with extra flow-mapping entries for the dataset and the adapter."""
    return (
        "base_model: builtin:tiny\n"
        "datasets:\n"
        f"  d: {{path: {DATA}{', ' + dataset if dataset else ''}}}\n"
        "adapters:\n"
        f"  a: {{dataset: d{', ' + adapter if adapter else ''}}}\n"
    )


def anchor_bomb(levels: int, aliases: int, name: str = "l") -> str:
    """The billion-laughs shape: each level is a list of `aliases` aliases to the level below."""
    lines = ["base_model: builtin:tiny", f"{name}0: &{name}0 [{', '.join(['lol'] * aliases)}]"]
    for i in range(1, levels + 1):
        lines.append(f"{name}{i}: &{name}{i} [{', '.join([f'*{name}{i - 1}'] * aliases)}]")
    return "\n".join(lines) + "\n"


def validate_cli(tmp_path: Path, text: str) -> tuple[int, str, float]:
    """`lorafoundry validate` on a file holding ``text``: exit code, output, seconds taken."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    start = time.perf_counter()
    res = CliRunner().invoke(app, ["validate", str(spec)])
    return res.exit_code, res.output, time.perf_counter() - start


def problems_of(tmp_path: Path, text: str) -> list[str]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(spec)
    return e.value.problems


def test_kilobyte_anchor_bomb_is_refused_fast_and_briefly(tmp_path):
    bomb = anchor_bomb(levels=9, aliases=9, name="laugh")  # expands to 9**10 values
    assert 800 < len(bomb) < 1100
    code, output, seconds = validate_cli(tmp_path, bomb)
    assert code == 2, output
    assert seconds < 2 and len(output) < 2000, (seconds, len(output))
    flat = " ".join(output.split())
    assert "alias *laugh" in flat and "anchor bomb" in flat and "Fix:" in flat


def test_small_anchor_bomb_is_refused_without_printing_its_value(tmp_path):
    bomb = anchor_bomb(levels=5, aliases=9)  # the 354-byte shape: expands to 9**6 values
    assert len(bomb) < 400
    start = time.perf_counter()
    (problem,) = problems_of(tmp_path, bomb)
    assert time.perf_counter() - start < 2
    assert problem.startswith("l") and "alias *l" in problem and "line " in problem
    assert "lol" not in problem and len(problem) < 400


def test_recursive_alias_is_refused(tmp_path):
    (problem,) = problems_of(tmp_path, spec_text() + "serving: &s {x: *s}\n")
    assert problem.startswith("serving.x: alias *s (line 6)")


def test_alias_to_a_scalar_still_works(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(dataset="max_tokens: &len 256", adapter="max_seq_len: *len"))
    loaded = load_spec(spec)
    assert loaded.datasets["d"].max_tokens == loaded.adapters["a"].max_seq_len == 256


def test_merge_key_of_a_small_mapping_still_works(tmp_path):
    text = spec_text(adapter="learning_rate: 1.0e-3, seed: 7").replace("  a: {", "  a: &base {")
    text += "  b:\n    <<: *base\n    seed: 8\n"
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    loaded = load_spec(spec)
    assert (loaded.adapters["b"].learning_rate, loaded.adapters["b"].seed) == (1e-3, 8)


def test_duplicate_key_names_the_key_and_both_lines(tmp_path):
    text = spec_text() + "  b:\n    dataset: d\n    r: 8\n    seed: 1\n    r: 64\n"
    (problem,) = problems_of(tmp_path, text)
    assert problem.startswith("adapters.b.r: key 'r' appears twice")
    assert "lines 8 and 10" in problem and "Fix:" in problem


def test_duplicate_key_is_refused_by_the_cli(tmp_path):
    code, output, _ = validate_cli(tmp_path, spec_text() + "datasets: {}\n")
    flat = " ".join(output.split())
    assert code == 2
    assert "datasets: key 'datasets' appears twice" in flat and "lines 2 and 6" in flat


@pytest.mark.parametrize(
    ("dataset", "adapter", "field", "got"),
    [
        ("", "r: 1.2e29", "adapters.a.r", "'1.2e29'"),
        ("", "r: 1.2e+29", "adapters.a.r", "1.2e+29"),
        ("", "learning_rate: .inf", "adapters.a.learning_rate", "inf"),
        ("max_tokens: 1e26", "", "datasets.d.max_tokens", "'1e26'"),
        ("max_tokens: 1.0e+26", "", "datasets.d.max_tokens", "1e+26"),
    ],
)
def test_absurd_number_is_refused_naming_the_field_and_the_bounds(tmp_path, dataset, adapter, field, got):
    code, output, _ = validate_cli(tmp_path, spec_text(dataset=dataset, adapter=adapter))
    flat = " ".join(output.split())  # the console wraps long lines
    assert code == 2 and "1 problem(s)" in flat, output
    assert f"- {field}: " in flat and f"(got {got}). Fix: use a " in flat, flat


def test_rank_above_vllms_largest_is_refused(tmp_path):
    (problem,) = problems_of(tmp_path, spec_text(adapter=f"r: {MAX_LORA_RANK + 1}"))
    assert problem.startswith("adapters.a.r:") and f"from 1 to {MAX_LORA_RANK}" in problem


def test_not_a_number_is_refused(tmp_path):
    (problem,) = problems_of(tmp_path, spec_text(adapter="lora_dropout: .nan"))
    assert problem.startswith("adapters.a.lora_dropout:") and "finite" in problem


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("serving", "port", 70000),
        ("serving", "max_model_len", 10**9),
        ("serving", "startup_timeout_s", 10**9),
        ("serving", "max_loras", 10**6),
    ],
)
def test_serving_numbers_are_bounded(tmp_path, section, key, value):
    (problem,) = problems_of(tmp_path, spec_text() + f"{section}: {{{key}: {value}}}\n")
    assert problem.startswith(f"{section}.{key}:") and "Fix: use a whole number" in problem


def test_sweep_values_are_checked_like_the_setting(tmp_path):
    text = spec_text(adapter="sweep: {r: [4, 1.0e+29], learning_rate: [.inf]}")
    found = problems_of(tmp_path, text)
    assert any(p.startswith("adapters.a.sweep.r.1:") and "from 1 to 512" in p for p in found), found
    assert any(p.startswith("adapters.a.sweep.learning_rate.0:") and "finite" in p for p in found), found


def test_sweep_grid_size_is_bounded():
    with pytest.raises(ValueError, match="grid of 2,048 points"):
        AdapterSpec(dataset="d", sweep={"seed": list(range(2048))})


def test_huge_value_is_printed_short(tmp_path):
    (problem,) = problems_of(tmp_path, spec_text(adapter="lr_scheduler: " + "x" * 100_000))
    assert problem.startswith("adapters.a.lr_scheduler:") and len(problem) < 400


def test_deep_nesting_is_refused(tmp_path):
    (problem,) = problems_of(tmp_path, spec_text() + "serving: " + "[" * 5000 + "]" * 5000 + "\n")
    assert problem.startswith("serving.0.0.0") and "nested more than" in problem and len(problem) < 400


def test_overlong_integer_is_refused(tmp_path):
    (problem,) = problems_of(tmp_path, spec_text(adapter="seed: " + "9" * 5000))
    assert "line 5" in problem and "5,000 characters" in problem


def test_plain_yaml_parse_keeps_safe_load_results():
    assert parse_spec_yaml("a: [1, 2.5, x, null, true]\nb: &v 3\nc: *v\n") == {
        "a": [1, 2.5, "x", None, True],
        "b": 3,
        "c": 3,
    }
