"""The spec as a Dagster Component (orchestration/component.py), through the `dg` CLI and through Dagster itself.

- the example project (examples/components: two instances) passes `dg check defs`, and `dg list defs` shows each
  instance's assets under its own key prefix;
- two instances in one code location materialize together in one `dg.materialize`, no key clash, each into the
  shared home and registry;
- `dg scaffold defs orchestration.LoraFoundryPipeline NAME` writes an instance that loads and materializes;
- a bad spec in a defs.yaml fails with validate_spec's every-problem-with-a-fix message, not a raw schema error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora_assets import envs
from tests.conftest import ROOT

DG = str(Path(sys.executable).parent / "dg")
EXAMPLE = ROOT / "examples" / "components"


def _dg(args: list[str], cwd: Path, home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = os.environ | {envs.HOME.name: str(home), "DAGSTER_HOME": str(dagster_home), "NO_COLOR": "1"}
    return subprocess.run([DG, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(n: int, topic: str) -> list[dict]:
    return [
        {"instruction": f"{topic} question number {i}: say {topic} {i}", "output": f"{topic} {i}"} for i in range(n)
    ]


def _project(root: Path, module: str, instances: dict[str, str]) -> Path:
    """A dg project at ``root`` with one folder (and defs.yaml) per instance."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [project]
            name = "{module}"
            version = "0.1.0"
            [tool.dg]
            directory_type = "project"
            [tool.dg.project]
            root_module = "{module}"
            registry_modules = ["orchestration"]
            """
        )
    )
    package = root / module
    (package / "defs").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "definitions.py").write_text(
        "from pathlib import Path\n\nimport dagster as dg\n\n\n@dg.definitions\ndef defs():\n"
        "    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)\n"
    )
    for name, yaml_text in instances.items():
        (package / "defs" / name).mkdir()
        (package / "defs" / name / "defs.yaml").write_text(yaml_text)
    return package / "defs"


def test_example_project_passes_dg_check_and_lists_prefixed_defs(tmp_path):
    checked = _dg(["check", "defs"], EXAMPLE, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr

    listed = _dg(["list", "defs", "--json"], EXAMPLE, tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    defs = json.loads(listed.stdout)
    keys = {a["asset_key"] for a in defs["assets"]}
    assert {
        "categories/dataset/categories/clean",
        "categories/adapter/categories/train",
        "categories/serving/deployment",
        "sentiment/dataset/sentiment/clean",
        "sentiment/adapter/sentiment/register",
    } <= keys
    assert "sentiment/serving/deployment" not in keys  # deploy: false on that instance
    assert not any(k.startswith(("dataset/", "adapter/", "serving/")) for k in keys)  # every key is prefixed
    assert {j["name"] for j in defs["jobs"]} >= {"categories_all_adapters", "sentiment_all_adapters"}
    assert {s["name"] for s in defs["sensors"]} >= {
        "categories_dataset_files_changed",
        "sentiment_promotions_to_server",
    }


def test_dg_finds_the_component_type(tmp_path):
    listed = _dg(["list", "components", "--json"], EXAMPLE, tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "orchestration.LoraFoundryPipeline" in {c["key"] for c in json.loads(listed.stdout)["items"]}


@pytest.mark.slow
def test_two_instances_materialize_in_one_run_without_key_clashes(tmp_path, random_base, monkeypatch):
    """Two pipelines (same adapter-free names would clash without the prefix: both call their dataset `qa`)
    load from one defs folder and materialize in one run into one home."""
    import dagster as dg

    from registry.store import AdapterRegistry

    home = tmp_path / "home"
    monkeypatch.setenv(envs.HOME.name, str(home))

    def instance(adapter: str, topic: str, how: str) -> str:
        spec = {
            "base_model": str(random_base),
            "datasets": {"qa": {"path": "data.jsonl", "near_duplicate_threshold": None}},
            "adapters": {adapter: {"dataset": "qa", "r": 4, "max_eval_rows": 4}},
        }
        if how == "inline":
            return (
                f"type: orchestration.LoraFoundryPipeline\nattributes:\n  spec: {json.dumps(spec)}\n  deploy: false\n"
            )
        return "type: orchestration.LoraFoundryPipeline\nattributes:\n  spec_file: spec.yaml\n  deploy: false\n"

    defs_dir = _project(
        tmp_path / "proj",
        "lf_two_instances",
        {"alpha": instance("alpha_bot", "alpha", "inline"), "beta": instance("beta_bot", "beta", "file")},
    )
    for name, topic in (("alpha", "alpha"), ("beta", "beta")):
        (defs_dir / name / "data.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(40, topic)) + "\n")
    (defs_dir / "beta" / "spec.yaml").write_text(
        json.dumps(
            {
                "base_model": str(random_base),
                "datasets": {"qa": {"path": "data.jsonl", "near_duplicate_threshold": None}},
                "adapters": {"beta_bot": {"dataset": "qa", "r": 4, "max_eval_rows": 4}},
            }
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path / "proj"))
    defs = dg.load_from_defs_folder(path_within_project=tmp_path / "proj")

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"alpha/dataset/qa/clean", "beta/dataset/qa/clean", "alpha/adapter/alpha_bot/register"} <= keys

    result = dg.materialize(list(defs.assets), resources=defs.resources, raise_on_error=False)
    assert result.success
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert {"alpha/dataset/qa/clean", "beta/dataset/qa/clean", "beta/adapter/beta_bot/train"} <= done
    registered = {r.name for r in AdapterRegistry(home / "registry.duckdb").list()}
    assert registered == {"alpha_bot", "beta_bot"}
    # relative dataset paths resolved from each instance's own folder: each cleaned its own rows
    assert (defs_dir / "alpha" / "data.jsonl").read_text() != (defs_dir / "beta" / "data.jsonl").read_text()


def test_a_bad_spec_fails_with_every_problem_and_its_fix(tmp_path):
    bad = textwrap.dedent(
        """\
        type: orchestration.LoraFoundryPipeline
        attributes:
          spec:
            base_model: builtin:tiny
            datasets:
              qa: {path: missing.jsonl}
            adapters:
              bot: {dataset: qna, r: -3}
        """
    )
    _project(tmp_path / "proj", "lf_bad_spec", {"broken": bad})
    checked = _dg(["check", "defs"], tmp_path / "proj", tmp_path)
    assert checked.returncode != 0
    text = checked.stdout + checked.stderr
    assert "broken/defs.yaml" in text  # names the instance
    assert "spec.adapters.bot.r" in text and "Fix:" in text  # validate_spec's messages
    assert "spec.adapters.bot.dataset: 'qna' is not a declared dataset" in text
    assert "spec.datasets.qa.path" in text  # all problems at once, not the first one


def _load_error(project: Path, monkeypatch) -> str:
    """Load a dg project in this process (what `dg check defs` does, without its start-up); the error's text,
    causes included."""
    import dagster as dg

    monkeypatch.syspath_prepend(str(project))
    with pytest.raises(Exception) as info:
        dg.load_from_defs_folder(path_within_project=project)
    texts, error = [], info.value
    while error is not None:
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


def test_both_spec_and_spec_file_or_neither_is_refused(tmp_path, monkeypatch):
    both = "type: orchestration.LoraFoundryPipeline\nattributes:\n  spec_file: x.yaml\n  spec: {base_model: x}\n"
    _project(tmp_path / "proj", "lf_both", {"both": both})
    assert "give exactly one of `spec` (inline) and `spec_file` (a path); got both" in _load_error(
        tmp_path / "proj", monkeypatch
    )


def test_a_spec_that_is_not_a_mapping_gets_the_spec_message(tmp_path, monkeypatch):
    text = "type: orchestration.LoraFoundryPipeline\nattributes:\n  spec: just a string\n"
    _project(tmp_path / "proj", "lf_not_mapping", {"odd": text})
    error = _load_error(tmp_path / "proj", monkeypatch)
    assert "spec.(top level): expected a mapping with base_model, datasets, adapters; got str" in error
    assert "validation error for LoraFoundryPipeline" not in error  # validate_spec's words, not pydantic's


def test_an_invalid_key_prefix_is_refused(tmp_path, random_base, monkeypatch):
    spec = {"base_model": str(random_base), "datasets": {"qa": {"path": "d.jsonl"}}, "adapters": {"x": {}}}
    yaml_text = f"type: orchestration.LoraFoundryPipeline\nattributes:\n  spec: {json.dumps(spec)}\n"
    defs_dir = _project(tmp_path / "proj", "lf_prefix", {"my-pipeline": yaml_text + "  key_prefix: 'a/b'\n"})
    (defs_dir / "my-pipeline" / "d.jsonl").write_text(json.dumps(_rows(1, "x")[0]) + "\n")
    text = _load_error(tmp_path / "proj", monkeypatch)
    assert "key_prefix: 'a/b' is not a valid Dagster name" in text
    assert "spec.adapters.x" in text and "exactly one of `dataset`" in text  # the spec's problems, same message


@pytest.mark.slow
def test_dg_scaffold_writes_a_working_instance(tmp_path, materialized, session_home, monkeypatch):
    """The scaffolded instance (builtin:tiny, a generated dataset) loads with `dg check defs` and materializes.
    It reuses the session's built tiny base (copied), in a home of its own."""
    import dagster as dg

    project = tmp_path / "proj"
    _project(project, "lf_scaffolded", {})
    scaffolded = _dg(["scaffold", "defs", "orchestration.LoraFoundryPipeline", "my-colors"], project, tmp_path)
    assert scaffolded.returncode == 0, scaffolded.stdout + scaffolded.stderr
    folder = project / "lf_scaffolded" / "defs" / "my-colors"
    assert (folder / "defs.yaml").exists() and (folder / "data.jsonl").exists()
    assert "key_prefix: my_colors" in (folder / "defs.yaml").read_text()

    home = tmp_path / "home"
    shutil.copytree(session_home / "models", home / "models")
    checked = _dg(["check", "defs"], project, home)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    monkeypatch.setenv(envs.HOME.name, str(home))
    monkeypatch.syspath_prepend(str(project))
    defs = dg.load_from_defs_folder(path_within_project=project)
    result = dg.materialize(list(defs.assets), resources=defs.resources, raise_on_error=False)
    assert result.success
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "my_colors/adapter/colors/register" in done
