"""All Dagster wiring: the Definitions built from the spec named by LORAFOUNDRY_SPEC.

`workspace.yaml` loads this module. The spec defaults to the embedded demo (examples/demo.yaml) and all state
lives under LORAFOUNDRY_HOME (default ./.lorafoundry).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from lora_assets.pipeline import default_home
from lora_assets.spec import PipelineSpec, load_spec
from orchestration.assets import LoraFoundryHome, build_assets
from orchestration.sensors import build_dataset_sensor, build_promotion_sensor

#: A run of the whole graph that takes longer than this is stopped (Dagster run monitoring).
RUN_TIMEOUT_S = 6 * 3600
DEMO_SPEC = Path(__file__).resolve().parents[1] / "examples" / "demo.yaml"


def build_definitions(spec: PipelineSpec, home: Path | str) -> dg.Definitions:
    """Definitions for one spec over one home dir."""
    assets = build_assets(spec)
    return dg.Definitions(
        assets=assets,
        jobs=[dg.define_asset_job(
            "all_adapters", selection=dg.AssetSelection.all(),
            description="Clean every dataset, train, evaluate and register every adapter, then deploy.",
            tags={"dagster/max_runtime": RUN_TIMEOUT_S})],  # enforced when run monitoring is on (make ui)
        sensors=[build_dataset_sensor(spec), build_promotion_sensor(spec)],
        resources={"lorafoundry": LoraFoundryHome(home=str(Path(home).resolve()))},
    )


def spec_path_from_env() -> Path:
    return Path(os.environ.get("LORAFOUNDRY_SPEC") or DEMO_SPEC)


defs = build_definitions(load_spec(spec_path_from_env()), default_home())
