"""The clean asset in Dagster: its metadata, and blocking checks that keep training from starting."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from lora_assets.spec import validate_spec
from orchestration.assets import build_assets
from orchestration.resources import resources_from_env


def small_spec(tmp_path: Path, base: Path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question number {i} about item {i * 7}"},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        }
        for i in range(60)
    ]
    rows.append({"messages": [{"role": "user", "content": "mail a@b.io"}, {"role": "assistant", "content": ""}]})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return validate_spec(
        {
            "base_model": str(base),
            "datasets": {"d": {"path": "d.jsonl", "eval_fraction": 0.2}},
            "adapters": {"a": {"dataset": "d", "max_steps": 1, "batch_size": 2}},
        },
        tmp_path,
    )


def run(spec, home: Path, selection: list[str]) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        build_assets(spec, deployment=False),
        selection=selection,
        raise_on_error=False,
        resources=resources_from_env(home),
    )


def test_clean_asset_metadata_and_passing_checks(tmp_path, random_base):
    spec = small_spec(tmp_path, random_base)
    result = run(spec, tmp_path / "home", ["dataset/d/clean"])
    assert result.success
    (mat,) = result.get_asset_materialization_events()
    meta = mat.materialization.metadata
    assert meta["rows_in"].value == 61 and meta["rows_quarantined"].value == 1
    for key in ("counts", "quarantined_by_reason", "cleaned_rows_sample", "quarantined_rows_sample", "fingerprint"):
        assert key in meta
    assert "empty_response" in meta["quarantined_by_reason"].value
    checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {
        "no_train_eval_leakage": True,
        "no_duplicates_left": True,
        "min_train_rows": True,
        "min_eval_rows": True,
    }


def test_leakage_check_blocks_training(tmp_path, random_base):
    spec = small_spec(tmp_path, random_base)
    home = tmp_path / "home"
    assert run(spec, home, ["dataset/d/clean"]).success
    out_dir = Path(json.loads((home / "datasets" / "d" / "current.json").read_text())["dir"])
    leaked = (out_dir / "train.jsonl").read_text().splitlines()[0]
    with (out_dir / "eval.jsonl").open("a") as f:  # a train row sneaks into eval
        f.write(leaked + "\n")

    result = run(spec, home, ["dataset/d/clean", "adapter/a/train"])
    checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["no_train_eval_leakage"] is False and checks["no_duplicates_left"] is False
    materialized = {"/".join(e.asset_key.path) for e in result.get_asset_materialization_events()}
    assert "adapter/a/train" not in materialized
    assert not (home / "adapters" / "a").exists()


def test_cli_clean_prints_the_report(tmp_path, random_base):
    import yaml
    from typer.testing import CliRunner

    from orchestration.cli import app

    small_spec(tmp_path, random_base)  # writes d.jsonl
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "base_model": str(random_base),
                "datasets": {"d": {"path": "d.jsonl"}},
                "adapters": {"a": {"dataset": "d"}},
            }
        )
    )
    runner = CliRunner()
    res = runner.invoke(app, ["clean", str(spec_file), "--home", str(tmp_path / "h"), "--dataset", "d"])
    assert res.exit_code == 0, res.output
    assert "empty_response" in res.stdout and "redacted: email" not in res.stdout  # the e-mail row was dropped
    res = runner.invoke(app, ["clean", str(spec_file), "--home", str(tmp_path / "h"), "--json"])
    report = json.loads(res.stdout)
    assert report["rows_in"] == report["rows_train"] + report["rows_eval"] + report["rows_quarantined"] == 61
    assert runner.invoke(app, ["clean", str(spec_file), "--dataset", "nope"]).exit_code == 2


def test_rows_over_max_tokens_are_quarantined_not_truncated(tmp_path, random_base):
    from transformers import AutoTokenizer

    from lora_assets.clean import clean_dataset, read_split
    from lora_assets.spec import DatasetSpec

    tok = AutoTokenizer.from_pretrained(random_base)
    rows = [
        {"prompt": "short question", "completion": "short answer"},
        {"prompt": "a long question " + "with many words " * 40, "completion": "answer"},
    ]
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = clean_dataset("d", DatasetSpec(path="d.jsonl", max_tokens=40, eval_fraction=0.01), src, tmp_path / "o", tok)
    assert r.by_reason == {"too_long": 1}
    (kept,) = read_split(r, "train") + read_split(r, "eval")
    assert kept["messages"][0]["content"] == "short question"
    text = tok.apply_chat_template(kept["messages"], tokenize=False)
    assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 40
    long_text = tok.apply_chat_template(
        [{"role": "user", "content": rows[1]["prompt"]}, {"role": "assistant", "content": "answer"}], tokenize=False
    )
    assert len(tok(long_text, add_special_tokens=False)["input_ids"]) > 40


def test_the_fingerprint_names_the_tokenizer_not_where_it_was_loaded_from(tmp_path, random_base):
    """The same data cleaned with the same tokenizer from two homes gets one fingerprint (the registry's lineage
    compares it); a tokenizer with another chat template gets another."""
    import shutil

    from transformers import AutoTokenizer

    from lora_assets.clean import clean_dataset
    from lora_assets.spec import DatasetSpec

    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(20)) + "\n")
    spec = DatasetSpec(path="d.jsonl", max_tokens=64)
    copy = shutil.copytree(random_base, tmp_path / "elsewhere" / "base")
    here = clean_dataset("d", spec, src, tmp_path / "home-a", AutoTokenizer.from_pretrained(random_base))
    there = clean_dataset("d", spec, src, tmp_path / "home-b", AutoTokenizer.from_pretrained(copy))
    assert here.fingerprint == there.fingerprint
    other = AutoTokenizer.from_pretrained(copy)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert clean_dataset("d", spec, src, tmp_path / "home-c", other).fingerprint != here.fingerprint
