"""The Definitions of a code location: one pipeline's (assets, job, dataset sensor, named by its AssetKeys) and
the resources of the home every pipeline of the location shares.

No side effects on import: ``orchestration.definitions`` (what workspace.yaml loads) and the
``LoraFoundryPipeline`` component (orchestration/component.py) both build from here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import dagster as dg

from lora_assets import envs
from lora_assets.home import Home
from lora_assets.spec import PipelineSpec
from orchestration.assets import build_assets
from orchestration.keys import AssetKeys
from orchestration.resources import resources_from_env
from orchestration.sensors import build_automation_sensor, build_dataset_sensor, build_promotion_sensor

#: A run of the whole graph that takes longer than this is stopped (Dagster run monitoring).
RUN_TIMEOUT_S = 6 * 3600

#: The executor of every job of the location, Dagster's implicit asset job (the UI's "Materialize all") included,
#: so the limits hold with no instance config: every step of a run in the run's own process, one after the other,
#: as `lorafoundry run` does. One step that runs a model already uses every core (MODEL_STEPS_LIMIT is 1), and a
#: step process of the multiprocess executor would import torch, transformers and peft again (~20 s of CPU on
#: 2 cores; forked from a preloading server, still ~1-3 s per step for 19 steps): measured in docs/benchmarks.md
#: ("The UI against the CLI"). An executor that runs steps in parallel (k8s, several GPUs) limits the steps tagged
#: MODEL_STEP_TAG with its `tag_concurrency_limits` (docs/scale-out.md). One object: Definitions of several
#: pipelines merge into one location only when their executors are the same object.
EXECUTOR = dg.in_process_executor


@functools.cache
def _home_resources(home: str, registry: str, serving_url: str | None, admin_key_set: bool) -> dict:
    """The resources of a home, built once per configuration: every pipeline of a code location hands Dagster
    the same objects (it accepts a resource key from several Definitions only when it is the same object)."""
    del registry, serving_url, admin_key_set  # the cache key: resources_from_env reads them from the environment
    return resources_from_env(home)


def home_resources(home: Path | str | None = None) -> dict:
    """The resources for ``home`` (default LORAFOUNDRY_HOME) and the current environment."""
    home = Home.at(home).root
    return dict(
        _home_resources(
            str(home),
            str(Home.at(home).registry),
            envs.SERVING_URL.get(),
            envs.ADMIN_KEY.is_set(),
        )
    )


def pipeline_definitions(spec: PipelineSpec, keys: AssetKeys | None = None, deploy: bool = True) -> dg.Definitions:
    """One pipeline's assets, its `all_adapters` job and its sensors, named by ``keys``; the location's
    :data:`EXECUTOR`."""
    keys = keys or AssetKeys()
    return dg.Definitions(
        executor=EXECUTOR,
        assets=build_assets(spec, deployment=deploy, keys=keys),
        jobs=[
            dg.define_asset_job(
                keys.name("all_adapters"),
                selection=keys.selection(),
                description="Clean every dataset, train, evaluate and register every adapter, then deploy.",
                tags={"dagster/max_runtime": RUN_TIMEOUT_S},  # enforced when run monitoring is on (make ui)
            )
        ],
        sensors=[
            build_dataset_sensor(spec, keys),
            build_promotion_sensor(spec, keys),
            build_automation_sensor(keys),
        ],
    )


def build_definitions(
    spec: PipelineSpec, home: Path | str | None = None, keys: AssetKeys | None = None, deploy: bool = True
) -> dg.Definitions:
    """Definitions for one spec over one home dir (default LORAFOUNDRY_HOME); resources from the environment."""
    return dg.Definitions.merge(
        pipeline_definitions(spec, keys, deploy), dg.Definitions(resources=home_resources(home))
    )
