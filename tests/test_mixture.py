"""Weighted mixtures of datasets (`adapters.<name>.datasets: {a: 0.7, b: 0.3}`): which rows one epoch trains on,
and what the manifest, the registry and evaluation record about each source."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml

from lora_assets.clean import clean_dataset, read_split
from lora_assets.mixture import mix_datasets, mixture_counts
from lora_assets.spec import AdapterSpec, DatasetSpec, SpecError, load_spec
from orchestration.assets import build_assets
from orchestration.resources import resources_from_env
from registry.store import AdapterRegistry


def test_counts_follow_the_weights_and_repeat_no_row():
    assert mixture_counts({"support": 1000, "faq": 200}, {"support": 0.7, "faq": 0.3}) == {"support": 466, "faq": 200}
    assert mixture_counts({"a": 100, "b": 100}, {"a": 7, "b": 3}) == {"a": 100, "b": 42}  # weights need not sum to 1
    assert mixture_counts({"a": 10, "b": 10, "c": 10}, {"a": 1, "b": 1, "c": 1}) == {"a": 10, "b": 10, "c": 10}
    assert mixture_counts({"a": 5}, {"a": 1.0}) == {"a": 5}
    counts = mixture_counts({"a": 333, "b": 1000, "c": 50}, {"a": 0.5, "b": 0.3, "c": 0.2})
    assert counts["c"] == 50 and all(counts[k] <= n for k, n in {"a": 333, "b": 1000}.items())
    assert abs(counts["a"] / sum(counts.values()) - 0.5) < 0.01 and abs(counts["b"] / sum(counts.values()) - 0.3) < 0.01


def test_a_mixture_is_checked_with_the_spec(tmp_path):
    assert AdapterSpec(datasets={"a": 2, "b": 1}).sources() == {"a": 2 / 3, "b": 1 / 3}
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    raw = {
        "base_model": "builtin:tiny",
        "datasets": {"a": {"path": "a.jsonl"}},
        "adapters": {
            "m": {"datasets": {"a": 0.5, "nope": 0.5}},
            "w": {"datasets": {"a": -1}},
            "both": {"dataset": "a", "datasets": {"a": 1}},
        },
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "spec.yaml")
    text = "\n".join(e.value.problems)
    assert "adapters.m.datasets.nope: 'nope' is not a declared dataset" in text
    assert "adapters.w" in text and "weight -1" in text and "positive" in text
    assert "adapters.both" in text and "exactly one of `dataset`" in text


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _clean(tmp_path: Path, name: str, rows: list[dict]):
    spec = DatasetSpec(path=f"{name}.jsonl", eval_fraction=0.2)
    return clean_dataset(name, spec, _write(tmp_path / f"{name}.jsonl", rows), tmp_path / "datasets")


def test_rows_selected_per_source_are_recorded_with_fingerprints(tmp_path):
    support = _clean(
        tmp_path, "support", [{"prompt": f"support question {i}?", "completion": f"fix {i}"} for i in range(300)]
    )
    shared = {"prompt": "a question both sources have?", "completion": "the same answer"}
    faq = _clean(tmp_path, "faq", [shared] + [{"prompt": f"faq {i}?", "completion": f"answer {i}"} for i in range(60)])
    reports = {"support": support, "faq": faq}
    mixed = mix_datasets(reports, {"support": 0.7, "faq": 0.3}, seed=0, datasets_root=tmp_path / "datasets")
    by = {s.dataset: s for s in mixed.mixture}
    assert by["faq"].rows_selected == faq.rows_train  # the scarcest source, relative to its weight, in full
    assert (
        by["support"].rows_selected
        == mixture_counts({"support": support.rows_train, "faq": faq.rows_train}, {"support": 0.7, "faq": 0.3})[
            "support"
        ]
    )
    assert by["support"].fingerprint == support.fingerprint and by["faq"].fingerprint == faq.fingerprint
    train = read_split(mixed, "train")
    assert len(train) == mixed.rows_train == by["support"].rows_selected + by["faq"].rows_selected
    assert len({r["id"] for r in train}) == len(train)  # no row twice
    assert {r["dataset"] for r in train} == {"support", "faq"}
    evals = read_split(mixed, "eval")
    assert (
        len(evals)
        == support.rows_eval + faq.rows_eval - by["support"].eval_leaks_dropped - by["faq"].eval_leaks_dropped
    )
    assert {r["dataset"] for r in evals[:2]} == {"support", "faq"}  # interleaved: a cap still takes from both
    assert not {json.dumps(r["messages"][:-1]) for r in evals} & {json.dumps(r["messages"][:-1]) for r in train}
    again = mix_datasets(reports, {"support": 0.7, "faq": 0.3}, seed=0, datasets_root=tmp_path / "datasets")
    assert again == mixed  # the same sources, weights and seed: the same rows, written once
    other = mix_datasets(reports, {"support": 0.5, "faq": 0.5}, seed=0, datasets_root=tmp_path / "datasets")
    assert other.fingerprint != mixed.fingerprint
    empty = faq.model_copy(update={"rows_train": 0})
    with pytest.raises(ValueError, match=r"mixture sources \['faq'\] have no train rows.*Fix:"):
        mix_datasets({"support": support, "faq": empty}, {"support": 1, "faq": 1}, 0, tmp_path / "datasets")


@pytest.mark.slow
def test_a_mixture_trains_once_over_its_selected_rows_and_registers_each_source(tmp_path, random_base):
    _write(tmp_path / "a.jsonl", [{"prompt": f"colour of item {i}?", "completion": "red"} for i in range(120)])
    _write(tmp_path / "b.jsonl", [{"prompt": f"size of thing {i}?", "completion": "big"} for i in range(40)])
    raw = {
        "base_model": str(random_base),
        "datasets": {"a": {"path": "a.jsonl", "eval_fraction": 0.25}, "b": {"path": "b.jsonl", "eval_fraction": 0.25}},
        "adapters": {"mix": {"datasets": {"a": 0.6, "b": 0.4}, "r": 4, "batch_size": 8, "max_eval_rows": 20}},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    spec = load_spec(tmp_path / "spec.yaml")
    home = tmp_path / "home"
    result = dg.materialize(build_assets(spec, deployment=False), resources=resources_from_env(home))
    assert result.success
    manifest_dir = Path(json.loads((home / "adapters" / "mix" / "current.json").read_text())["dir"])
    manifest = json.loads((manifest_dir / "training_manifest.json").read_text())
    sources = {s["dataset"]: s for s in manifest["mixture"]}
    assert set(sources) == {"a", "b"} and sources["b"]["rows_selected"] == sources["b"]["rows_available"]
    selected = sources["a"]["rows_selected"] + sources["b"]["rows_selected"]
    assert manifest["result"]["examples"] == selected == manifest["dataset"]["rows_train"]  # each row once
    assert manifest["steps_per_epoch"] == -(-selected // 8)
    (rec,) = AdapterRegistry(home / "registry.duckdb").list("mix")
    assert rec.dataset == "a+b" and rec.dataset_fingerprint == manifest["dataset"]["fingerprint"]
    recorded = {s["dataset"]: (s["rows_selected"], s["fingerprint"]) for s in rec.training_config["mixture"]}
    assert recorded == {n: (s["rows_selected"], s["fingerprint"]) for n, s in sources.items()}
    ev = json.loads((manifest_dir / "eval_results.json").read_text())
    assert set(ev["by_source"]) == {"a", "b"} and all("exact_match" in t for t in ev["by_source"].values())
    train_meta = result.asset_materializations_for_node("adapter__mix__train")[0].metadata
    assert "| a | 0.60 |" in train_meta["mixture"].value


def test_writers_racing_on_one_mixture_publish_it_once_and_agree(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    a = _clean(tmp_path, "a", [{"prompt": f"a {i}?", "completion": "x"} for i in range(200)])
    b = _clean(tmp_path, "b", [{"prompt": f"b {i}?", "completion": "y"} for i in range(100)])
    with ThreadPoolExecutor(6) as pool:
        reports = list(
            pool.map(lambda _: mix_datasets({"a": a, "b": b}, {"a": 1, "b": 1}, 0, tmp_path / "d"), range(6))
        )
    assert all(r == reports[0] for r in reports)
    assert [p.name for p in (tmp_path / "d" / "_mixtures").iterdir()] == [reports[0].fingerprint]  # no temp left
