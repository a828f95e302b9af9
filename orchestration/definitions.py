"""All Dagster wiring: the Definitions built from the spec named by LORAFOUNDRY_SPEC.

`workspace.yaml` loads this module. The spec defaults to the embedded demo (examples/demo.yaml); all state lives
under LORAFOUNDRY_HOME (default ./.lorafoundry); the resources read the environment (orchestration/resources.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from lora_assets.spec import PipelineSpec, load_spec
from orchestration.assets import build_assets
from orchestration.resources import resources_from_env
from orchestration.sensors import build_automation_sensor, build_dataset_sensor, build_promotion_sensor

#: A run of the whole graph that takes longer than this is stopped (Dagster run monitoring).
RUN_TIMEOUT_S = 6 * 3600
DEMO_SPEC = Path(__file__).resolve().parents[1] / "examples" / "demo.yaml"


def build_definitions(spec: PipelineSpec, home: Path | str | None = None) -> dg.Definitions:
    """Definitions for one spec over one home dir (default LORAFOUNDRY_HOME); resources from the environment."""
    assets = build_assets(spec)
    return dg.Definitions(
        assets=assets,
        jobs=[
            dg.define_asset_job(
                "all_adapters",
                selection=dg.AssetSelection.all(),
                description="Clean every dataset, train, evaluate and register every adapter, then deploy.",
                tags={"dagster/max_runtime": RUN_TIMEOUT_S},
            )
        ],  # enforced when run monitoring is on (make ui)
        sensors=[build_dataset_sensor(spec), build_promotion_sensor(), build_automation_sensor()],
        resources=resources_from_env(home),
    )


def spec_path_from_env() -> Path:
    return Path(os.environ.get("LORAFOUNDRY_SPEC") or DEMO_SPEC)


defs = build_definitions(load_spec(spec_path_from_env()))
