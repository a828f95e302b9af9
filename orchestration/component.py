"""The spec as a Dagster Component: ``orchestration.LoraFoundryPipeline``, instantiated by ``defs.yaml`` files.

A ``dg`` project holds any number of instances, one per folder under its ``defs/``::

    # defs/support/defs.yaml
    type: orchestration.LoraFoundryPipeline
    attributes:
      spec_file: support.yaml        # or `spec:` with the spec inline
      key_prefix: support            # default: the folder's name

Each instance is validated by the same :func:`lora_assets.spec.validate_spec` as ``lorafoundry validate`` (every
problem at once, each with its fix), its relative dataset and model paths resolve from its own folder, and its
definitions are named by its key prefix (orchestration/keys.py). State lives under the code location's home
(LORAFOUNDRY_HOME), shared by all instances with its registry, resources and home-level sensors.
``dg scaffold defs orchestration.LoraFoundryPipeline NAME`` writes a working instance on ``builtin:tiny``.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import dagster as dg
from dagster.components import Scaffolder, ScaffoldRequest
from pydantic import Field

from lora_assets.spec import SpecError, load_spec, validate_spec
from orchestration.keys import AssetKeys
from orchestration.location import build_definitions

#: The dataset ``dg scaffold`` writes next to a new instance: enough rows for the tiny base to train on.
SCAFFOLD_ROWS = 64


class LoraFoundryScaffolder(Scaffolder):
    """``dg scaffold defs orchestration.LoraFoundryPipeline NAME``: a defs.yaml with an inline spec on the
    embedded ``builtin:tiny`` base and a generated dataset next to it, ready to materialize."""

    def scaffold(self, request: ScaffoldRequest) -> None:
        folder = Path(request.target_path)
        folder.mkdir(parents=True, exist_ok=True)
        colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
        with (folder / "data.jsonl").open("w") as f:
            for i in range(SCAFFOLD_ROWS):
                color = colors[i % len(colors)]
                row = {"instruction": f"Item {i} is {color}. What colour is item {i}?", "output": color}
                f.write(json.dumps(row) + "\n")
        (folder / "defs.yaml").write_text(
            textwrap.dedent(
                f"""\
                type: {request.type_name}
                attributes:
                  # the lorafoundry spec, inline (or `spec_file: path.yaml`); paths resolve from this folder
                  spec:
                    base_model: builtin:tiny
                    datasets:
                      colors:
                        path: data.jsonl
                    adapters:
                      colors:
                        dataset: colors
                  # asset keys start with this (default: the folder's name)
                  key_prefix: {re.sub(r"[^A-Za-z0-9_]", "_", folder.name)[:64]}
                  # also materialize <prefix>/serving/deployment: a vLLM server for the home's adapters
                  deploy: false
                """
            )
        )


@dg.scaffold_with(LoraFoundryScaffolder)
class LoraFoundryPipeline(dg.Component, dg.Resolvable, dg.Model):
    """A lorafoundry pipeline: clean each dataset, train, evaluate and register each adapter, and (optionally)
    deploy them on vLLM, from one spec. Give the spec inline (``spec``) or as a file (``spec_file``)."""

    spec: Any = Field(  # not dict[str, Any]: a non-mapping gets validate_spec's message, not a raw schema error
        default=None,
        description="The spec inline: base_model, datasets, adapters, serving (see `lorafoundry validate`). "
        "Relative paths resolve from this defs.yaml's folder.",
    )
    spec_file: str | None = Field(
        default=None, description="A spec YAML file, relative to this defs.yaml's folder (instead of `spec`)."
    )
    key_prefix: str | None = Field(
        default=None,
        description="Put before every asset key and group/job/sensor name of this pipeline, so several share a "
        "code location; letters, digits, underscores. Default: the instance folder's name.",
    )
    deploy: bool = Field(
        default=True,
        description="Also define <prefix>/serving/deployment (a vLLM server for the home's registered adapters). "
        "A home runs one deployment: give it to one instance.",
    )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        """Validate the instance (its attributes and its spec, every problem at once), then build."""
        folder = Path(context.path)
        source = str(folder / "defs.yaml")
        problems: list[str] = []
        prefix = self.key_prefix if self.key_prefix is not None else folder.name
        try:
            keys = AssetKeys(prefix)
        except ValueError as e:
            problems.append(str(e) if self.key_prefix is not None else f"{e} (the default is the folder's name)")
        spec = None
        if (self.spec is None) == (self.spec_file is None):
            problems.append(
                "attributes: give exactly one of `spec` (inline) and `spec_file` (a path); got "
                f"{'both' if self.spec is not None else 'neither'}. Fix: keep one of them."
            )
        else:
            try:
                if self.spec_file is not None:
                    path = Path(self.spec_file)
                    spec = load_spec(path if path.is_absolute() else folder / path)
                else:
                    spec = validate_spec(self.spec, folder.resolve(), source)
            except SpecError as e:
                problems += [
                    f"{'spec_file ' + self.spec_file + ': ' if self.spec_file else 'spec.'}{p}" for p in e.problems
                ]
        if problems:
            raise SpecError(problems, source)
        return build_definitions(spec, keys=keys, deploy=self.deploy)
