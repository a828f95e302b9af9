"""The limits that protect the machine live in the code location, not in an instance file: every job, the UI's
implicit asset job included, runs on an executor that runs one step at a time, so never two model steps (base
build, training, evaluation) at once, and each model step gives torch its share of the CPUs."""

from __future__ import annotations

import dagster as dg
import pytest

from lora_assets.hardware import limit_torch_threads, usable_cpus
from lora_assets.spec import load_spec
from orchestration.assets import MODEL_STEP_TAG, MODEL_STEPS_LIMIT
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
    assert MODEL_STEPS_LIMIT == 1  # the thread share a model step takes: every usable CPU


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


@pytest.mark.parametrize("concurrent", [1, 2, 64])
def test_model_step_threads_are_a_share_of_the_usable_cpus(concurrent):
    import torch

    before = torch.get_num_threads()
    try:
        assert limit_torch_threads(concurrent) == max(1, usable_cpus() // concurrent) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
