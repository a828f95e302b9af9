"""The home dir's layout, in one place: every path under a lorafoundry home comes from :class:`Home`.

A home (``$LORAFOUNDRY_HOME``, default ``./.lorafoundry``) holds all state::

    models/builtin-tiny-<recipe>/       the embedded base models, built once per recipe
    datasets/<name>/<fingerprint>/      train.jsonl, eval.jsonl, quarantine.jsonl, report.json
    datasets/<name>/current.json        which fingerprint the last cleaning produced
    adapters/<job>/<run key>/           peft adapter dir + training_manifest.json + eval_results.json
    adapters/<job>/current.json         which run the last training produced
    adapters/imported/                  adapters brought in by `registry register` / `registry import`
    tokenized/<key>.npz                 train splits tokenized once per (data, tokenizer, template, length)
    launch/<job>/<run key>/             a data-parallel training's launch request and its ranks' files
    registry.duckdb                     the adapter registry (unless $LORAFOUNDRY_REGISTRY names another file)
    serving/verified/<sha256>/          read-only adapter copies that vLLM reads (serving/integrity.py)
    serving/deployment.json             the vLLM server the serving/deployment asset left running
    serving/serve.json                  the `lorafoundry serve` running in the foreground (its pid), for `stop`
    serving/metrics/worker-<port>.prom  each server's vLLM worker's adapter loads and evictions (serving/observe.py)
    logs/                               run logs and vLLM logs
    dagster_home/                       Dagster's instance (runs, event logs) for the CLI and the UI
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_assets import envs
from registry.location import is_shared

if TYPE_CHECKING:
    from registry.store import AdapterRegistry

#: The home when neither ``--home`` nor ``$LORAFOUNDRY_HOME`` says one.
DEFAULT_HOME = ".lorafoundry"


@dataclass(frozen=True)
class Home:
    """The paths of one home dir.

    Args:
        root: the home dir (absolute).
        registry: the registry: a shared registry's URL (``$LORAFOUNDRY_REGISTRY_URL``, registry/shared.py), else
            the file ``$LORAFOUNDRY_REGISTRY``, else ``<root>/registry.duckdb``.
        store: the adapter store several machines share (``$LORAFOUNDRY_ARTIFACTS``, ``s3://BUCKET/PREFIX``,
            registry/objects.py); None: adapters stay in this home's dirs.
    """

    root: Path
    registry: Path | str
    store: str | None = None

    @classmethod
    def at(cls, root: Path | str | None = None, registry: Path | str | None = None) -> Home:
        """The home at ``root`` (default ``$LORAFOUNDRY_HOME``, else ``./.lorafoundry``), its registry at
        ``registry`` (default ``$LORAFOUNDRY_REGISTRY_URL``, else ``$LORAFOUNDRY_REGISTRY``, else inside the
        home)."""
        home = Path(root or envs.HOME.get() or DEFAULT_HOME).resolve()
        where = registry or envs.REGISTRY_URL.get() or _registry_file(home)
        return cls(home, str(where) if is_shared(str(where)) else Path(where).resolve(), envs.ARTIFACTS.get())

    @property
    def registry_file(self) -> Path:
        """The home's own registry file, whatever :attr:`registry` names (a shared registry's URL, maybe): what
        `registry migrate` copies to a shared registry."""
        return _registry_file(self.root)

    def open_registry(self, actor: str = "lorafoundry", max_wait_s: float = 60.0) -> AdapterRegistry:
        """This home's registry (a file or a shared one), with its adapter store."""
        from registry.store import AdapterRegistry

        return AdapterRegistry(self.registry, max_wait_s=max_wait_s, actor=actor, store=self.store)

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def imported(self) -> Path:
        """Where `registry register` and `registry import` copy adapters brought in (under :attr:`adapters`, which
        a server reads from)."""
        return self.adapters / "imported"

    @property
    def tokenized(self) -> Path:
        return self.root / "tokenized"

    @property
    def launches(self) -> Path:
        return self.root / "launch"

    @property
    def verified(self) -> Path:
        """The verified store: content-addressed, read-only copies of the adapters this home's servers load."""
        return self.root / "serving" / "verified"

    @property
    def deployment_state(self) -> Path:
        return self.root / "serving" / "deployment.json"

    @property
    def serve_state(self) -> Path:
        """The `lorafoundry serve` running in the foreground on this home, for `lorafoundry stop`."""
        return self.root / "serving" / "serve.json"

    def worker_metrics(self, port: int) -> Path:
        """Where the vLLM worker of the server on ``port`` writes its adapter counters (serving/observe.py)."""
        return worker_metrics_file(self.root / "serving" / "metrics", port)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"


def worker_metrics_file(metrics_dir: Path, port: int) -> Path:
    """The adapter-counter file of the server on ``port`` in ``metrics_dir`` (a fleet's replicas: one each, in the
    single server's dir)."""
    return metrics_dir / f"worker-{port}.prom"


def _registry_file(root: Path) -> Path:
    """``$LORAFOUNDRY_REGISTRY``, else ``<root>/registry.duckdb``."""
    return Path(envs.REGISTRY.get() or root / "registry.duckdb").resolve()
