"""The limits that protect the machine live in the code location, not in an instance file: every job, the UI's
implicit asset job included, runs on an executor that runs one step at a time, so never two model steps (base
build, training, evaluation) at once, and each model step gives torch its share of the CPUs."""

from __future__ import annotations

import dagster as dg
import pytest

from lora_assets import hardware
from lora_assets.hardware import limit_torch_threads, usable_cpus
from lora_assets.spec import load_spec, validate_spec
from orchestration.assets import MODEL_STEP_TAG, build_assets
from orchestration.definitions import DEMO_SPEC
from orchestration.keys import AssetKeys
from orchestration.location import EXECUTOR, build_definitions, home_resources, pipeline_definitions


def test_every_job_runs_one_step_at_a_time_without_instance_config(tmp_path):
    """The UI's "Materialize all" (the implicit asset job) and `all_adapters` run on the location's executor, which
    runs the steps of a run one after the other in the run's process: never two model steps at once."""
    defs = build_definitions(load_spec(DEMO_SPEC), tmp_path)
    jobs = [defs.resolve_implicit_global_asset_job_def(), defs.resolve_job_def("all_adapters")]
    for job in jobs:
        assert job.executor_def is EXECUTOR is dg.in_process_executor


def test_model_steps_carry_the_limited_tag_and_light_steps_do_not(tmp_path):
    job = build_definitions(load_spec(DEMO_SPEC), tmp_path).resolve_implicit_global_asset_job_def()
    tagged = {n.name for n in job.graph.nodes if all(n.tags.get(k) == v for k, v in MODEL_STEP_TAG.items())}
    assert tagged == {
        "base_model__builtin_smollm2_135m_instruct",
        *(f"adapter__{a}__{stage}" for a in ("categories", "sentiment") for stage in ("train", "eval")),
    }


def test_pipelines_merged_into_one_location_share_the_executor(tmp_path):
    spec = load_spec(DEMO_SPEC)
    merged = dg.Definitions.merge(
        pipeline_definitions(spec, AssetKeys("one")),
        pipeline_definitions(spec, AssetKeys("two")),
        dg.Definitions(resources=home_resources(tmp_path)),
    )
    assert merged.resolve_job_def("two_all_adapters").executor_def is EXECUTOR


@pytest.fixture
def torch_threads():
    """Torch's thread count, restored after the test (the tests below change it)."""
    import torch

    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("cpus", "concurrent", "threads"),
    [(8, 1, 8), (8, 2, 4), (8, 3, 2), (8, 64, 1), (3, 2, 1), (1, 1, 1), (8, 0, 8)],
)
def test_model_step_threads_are_a_share_of_the_usable_cpus(monkeypatch, torch_threads, cpus, concurrent, threads):
    """`concurrent` steps at once on `cpus` CPUs: each gets an equal whole share, at least one thread, and a
    nonsense count of 0 is taken as one step."""
    monkeypatch.setattr(hardware, "usable_cpus", lambda: cpus)
    torch_threads.set_num_threads(5)
    assert limit_torch_threads(concurrent) == threads
    assert torch_threads.get_num_threads() == threads


def test_usable_cpus_are_the_affinity_mask_not_the_machines_count(monkeypatch):
    """In a container limited to a cpuset, the process may use the CPUs of its mask, not every CPU it can see."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 5, 9}, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert usable_cpus() == 3


def test_a_model_step_gives_torch_every_usable_cpu(random_base, tmp_path, monkeypatch, torch_threads):
    """The executor runs one step at a time, so a model step (here the base model's) takes every usable CPU: on a
    machine of 3 usable CPUs, torch runs 3 threads after it, whatever it ran before."""
    data = tmp_path / "qa.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n')
    spec = validate_spec(
        {"base_model": str(random_base), "datasets": {"qa": {"path": str(data)}}, "adapters": {"a": {"dataset": "qa"}}}
    )
    base = next(a for a in build_assets(spec, deployment=False) if a.key.path[0] == "base_model")
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 3)
    torch_threads.set_num_threads(1)
    assert dg.materialize([base], resources=home_resources(tmp_path / "home")).success
    assert torch_threads.get_num_threads() == 3
