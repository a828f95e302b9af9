"""The code location `workspace.yaml` loads: one pipeline from the spec named by LORAFOUNDRY_SPEC.

The spec defaults to the embedded demo (examples/demo.yaml); its asset keys have no prefix. All state lives under
LORAFOUNDRY_HOME (default ./.lorafoundry); the resources read the environment (orchestration/resources.py).
Several pipelines in one code location are instances of the `LoraFoundryPipeline` component instead
(orchestration/component.py). Both build their Definitions with orchestration/location.py.
"""

from __future__ import annotations

from pathlib import Path

from lora_assets import envs
from lora_assets.spec import load_spec
from orchestration.location import RUN_TIMEOUT_S, build_definitions

__all__ = ["DEMO_SPEC", "RUN_TIMEOUT_S", "build_definitions", "defs", "spec_path_from_env"]

DEMO_SPEC = Path(__file__).resolve().parents[1] / "examples" / "demo.yaml"


def spec_path_from_env() -> Path:
    return Path(envs.SPEC.get() or DEMO_SPEC)


defs = build_definitions(load_spec(spec_path_from_env()))
