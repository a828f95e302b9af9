"""Dagster resources: where state lives, the registry, and how to reach the vLLM server.

Each is a ``ConfigurableResource`` (shown with its values on the UI's Resources page, overridable in a run's
config). :func:`resources_from_env` builds them from the environment; the admin key is passed as an ``EnvVar``
so the UI shows the variable's name, never the key.

=========================  ===========================================================================
environment variable       meaning
=========================  ===========================================================================
``LORAFOUNDRY_HOME``       the home dir (datasets, adapters, logs); default ``./.lorafoundry``
``LORAFOUNDRY_REGISTRY``   the registry file, e.g. on shared storage; default ``<home>/registry.duckdb``
``LORAFOUNDRY_SERVING_URL`` the server the promotion sensor updates, e.g. a load balancer in front of
                           replicas; default the URL the ``serving/deployment`` asset recorded
``LORAFOUNDRY_ADMIN_KEY``  the key for vLLM's runtime adapter endpoints (given to the server it starts)
=========================  ===========================================================================
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from lora_assets import envs
from lora_assets.home import Home
from lora_assets.pipeline import Pipeline
from lora_assets.spec import PipelineSpec
from registry.store import AdapterRegistry


class LoraFoundryHome(dg.ConfigurableResource):
    """Where all lorafoundry state lives (datasets, adapters, built-in models, logs)."""

    home: str = Field(description="The home dir; LORAFOUNDRY_HOME, default ./.lorafoundry.")


class RegistryResource(dg.ConfigurableResource):
    """The adapter registry that the assets write and the server reads: a DuckDB file, or a registry and an
    adapter store that several machines share (docs/scale-out.md)."""

    path: str = Field(
        description="The registry: LORAFOUNDRY_REGISTRY_URL (postgresql://USER@HOST:PORT/DB, no password), else "
        "the file LORAFOUNDRY_REGISTRY, default <home>/registry.duckdb."
    )
    store: str | None = Field(
        default=None,
        description="The adapter store, s3://BUCKET/PREFIX (LORAFOUNDRY_ARTIFACTS); unset: the home's dirs.",
    )

    def open(self, actor: str = "dagster") -> AdapterRegistry:
        """The registry, with ``actor`` recorded on the events it writes."""
        return AdapterRegistry(self.path, actor=actor, store=self.store)


class ServingResource(dg.ConfigurableResource):
    """How the orchestration reaches the vLLM server."""

    url: str | None = Field(
        default=None,
        description="Base URL of the server the promotion sensor updates "
        "(LORAFOUNDRY_SERVING_URL); unset: the URL the serving/deployment asset recorded.",
    )
    admin_key: str | None = Field(
        default=None,
        description="Key for the server's runtime adapter endpoints "
        "(LORAFOUNDRY_ADMIN_KEY); the deployment starts vLLM with it and the promotion "
        "sensor sends it. Unset: those endpoints are closed.",
    )


def pipeline(spec: PipelineSpec, home: LoraFoundryHome, registry: RegistryResource, progress=None) -> Pipeline:
    """The pipeline over the resources' home dir and registry file."""
    return Pipeline(spec, home.home, progress=progress, registry_path=registry.path)


def resources_from_env(home: Path | str | None = None) -> dict[str, dg.ConfigurableResource]:
    """The three resources, configured from the environment (``home`` overrides LORAFOUNDRY_HOME)."""
    home = Home.at(home).root
    key = dg.EnvVar(envs.ADMIN_KEY.name) if envs.ADMIN_KEY.is_set() else None
    return {
        "lorafoundry": LoraFoundryHome(home=str(home)),
        "registry": RegistryResource(path=str(Home.at(home).registry), store=Home.at(home).store),
        "serving": ServingResource(url=envs.SERVING_URL.get(), admin_key=key),
    }
