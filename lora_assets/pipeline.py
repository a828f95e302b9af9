"""The pipeline's stages over one home dir, as plain functions (Dagster assets and the CLI wrap these). The home's
layout is :class:`lora_assets.home.Home`'s."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from lora_assets.base_model import BaseModelRef, resolve_base_model
from lora_assets.clean import CleanReport, clean_dataset, current_clean
from lora_assets.distributed import MANIFEST, DistributedTrainingError, TrainingLaunch, TrainRequest, plan_launch
from lora_assets.evaluate import EvalResult, evaluate_adapter, load_eval
from lora_assets.evidence import compare_with_champion
from lora_assets.files import write_json_atomic
from lora_assets.home import Home
from lora_assets.mixture import describe as describe_mixture
from lora_assets.mixture import mix_datasets
from lora_assets.spec import AdapterSpec, PipelineSpec, SpecError
from lora_assets.train import TrainResult, preflight, run_key, train_adapter
from registry.metrics import DEFAULT_RANK_METRIC
from registry.records import AdapterRecord, NewAdapter
from registry.store import AdapterRegistry

CODE_VERSION = "0.1.0"


@dataclass(frozen=True)
class AdapterJob:
    """One adapter to train: a spec entry, or one point of its sweep. ``key`` names its assets and dirs."""

    key: str
    name: str
    spec: AdapterSpec
    point: dict


def adapter_jobs(spec: PipelineSpec) -> dict[str, AdapterJob]:
    """Every adapter to train, by key: the adapter name, or ``<name>.p<i>`` for the points of a sweep."""
    jobs: dict[str, AdapterJob] = {}
    for name, ad in spec.adapters.items():
        points = ad.sweep_points()
        if not ad.sweep:
            jobs[name] = AdapterJob(key=name, name=name, spec=ad, point={})
            continue
        for i, p in enumerate(points):
            point = {k: getattr(p, k) for k in sorted(ad.sweep)}
            jobs[f"{name}.p{i}"] = AdapterJob(key=f"{name}.p{i}", name=name, spec=p, point=point)
    return jobs


class Pipeline:
    """The stages of one spec over one home dir.

    Args:
        spec: the validated spec.
        home: the home dir holding all state (created as needed).
        progress: optional callable(str) for progress lines (Dagster's logger in assets).
        registry_path: the registry file; default the home's (:meth:`Home.at`).
    """

    def __init__(
        self, spec: PipelineSpec, home: Path | str | None = None, progress=None, registry_path: Path | str | None = None
    ) -> None:
        self.spec = spec
        self.progress = progress
        self.layout = Home.at(home, registry_path)
        self.home, self.registry_path = self.layout.root, self.layout.registry
        self.jobs = adapter_jobs(spec)

    @property
    def datasets_dir(self) -> Path:
        return self.layout.datasets

    @property
    def adapters_dir(self) -> Path:
        return self.layout.adapters

    @property
    def registry(self) -> AdapterRegistry:
        return self.layout.open_registry()

    @cached_property
    def base(self) -> BaseModelRef:
        return resolve_base_model(self.spec.base_model, self.home, self.spec.spec_dir, progress=self.progress)

    def _tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.base.path)

    def preflight(self) -> None:
        """Raise :class:`SpecError` listing every problem that needs the base model to see (target modules that
        do not exist, QLoRA without bitsandbytes), before any dataset is cleaned or weights are loaded."""
        problems = []
        for key, job in self.jobs.items():
            field = f"adapters.{job.name}" + (f" (sweep point {key})" if job.point else "")
            problems += preflight(field, job.spec, self.base)
        if problems:
            raise SpecError(sorted(set(problems)), "spec")

    def clean(self, dataset: str) -> CleanReport:
        """Clean one dataset (the base model's tokenizer measures lengths)."""
        return clean_dataset(
            dataset,
            self.spec.datasets[dataset],
            self.spec.dataset_path(dataset),
            self.datasets_dir,
            tokenizer=self._tokenizer(),
        )

    def training_data(self, key: str) -> CleanReport:
        """What one adapter job trains and evaluates on: its dataset's last cleaning, or for a mixture
        (`datasets: {a: 0.7, b: 0.3}`) the rows it selects from each source's last cleaning (written once)."""
        spec = self.jobs[key].spec
        if spec.datasets is None:
            return current_clean(self.datasets_dir, spec.dataset)
        reports = {name: current_clean(self.datasets_dir, name) for name in spec.datasets}
        report = mix_datasets(reports, spec.sources(), spec.seed, self.datasets_dir)
        if self.progress:
            self.progress(f"{key}: mixture {report.fingerprint}: {describe_mixture(report)}")
        return report

    def train(self, key: str) -> TrainResult:
        """Train one adapter job on its dataset's last cleaning: in this process, or with `processes` > 1 by
        torchrun in a subprocess (the train asset starts the same command through Dagster Pipes instead)."""
        job = self.jobs[key]
        if job.spec.processes > 1:
            launch = self.plan_training(key)
            if not launch.finished:
                launch.check_machine()
                done = subprocess.run(launch.command, check=False)
                if done.returncode != 0:
                    raise DistributedTrainingError(launch.failure(done.returncode))
            return self.trained(key, launch)
        clean = self.training_data(key)
        result = train_adapter(key, job.spec, self.base, clean, self.layout, progress=self.progress)
        write_json_atomic(self.adapters_dir / key / "current.json", {"dir": result.adapter_dir})
        return result

    def plan_training(self, key: str) -> TrainingLaunch:
        """The data-parallel run of one adapter job: its request written under ``<home>/launch/<job>/<run key>``
        and the torchrun command that trains it (nothing started)."""
        job = self.jobs[key]
        clean = self.training_data(key)
        adapter_dir = self.adapters_dir / key / run_key(job.spec, self.base, clean)
        request = TrainRequest(job_key=key, spec=job.spec, base=self.base, clean=clean, home=self.layout)
        return plan_launch(request, self.layout.launches / key / adapter_dir.name, adapter_dir)

    def trained(self, key: str, launch: TrainingLaunch) -> TrainResult:
        """The result of a finished data-parallel run, read back from its manifest, made the job's current one."""
        manifest = json.loads((launch.adapter_dir / MANIFEST).read_text())
        write_json_atomic(self.adapters_dir / key / "current.json", {"dir": str(launch.adapter_dir)})
        return TrainResult(**manifest["result"])

    def adapter_dir(self, key: str) -> Path:
        pointer = self.adapters_dir / key / "current.json"
        if not pointer.exists():
            raise FileNotFoundError(
                f"adapter {key!r} has not been trained yet. Fix: materialize "
                f"adapter/{key}/train first (or run `lorafoundry run SPEC`)."
            )
        return Path(json.loads(pointer.read_text())["dir"])

    def evaluate(self, key: str) -> EvalResult:
        """Evaluate the last trained version of one adapter job against the base."""
        job = self.jobs[key]
        clean = self.training_data(key)
        dtype = self.spec.serving.compute_dtype
        return evaluate_adapter(self.adapter_dir(key), job.spec, self.base, clean, dtype=dtype)

    def register(self, key: str, run_id: str | None = None) -> AdapterRecord:
        """Register the last trained and evaluated version; `rejected` when its gate failed."""
        job = self.jobs[key]
        adir = self.adapter_dir(key)
        ev = load_eval(adir)
        manifest = json.loads((adir / "training_manifest.json").read_text())
        status = "rejected" if ev.gate is not None and not ev.gate.passed else "candidate"
        result = manifest["result"]
        return self.registry.register(
            NewAdapter(
                name=job.name,
                path=adir,
                status=status,
                base_model=self.spec.base_model,
                base_model_hash=self.base.content_hash,
                method=manifest["method"]["method"],
                training_config={
                    **manifest["config"],
                    "sweep_point": job.point,
                    "job": key,
                    "train_wall_s": result["wall_s"],
                    "peak_memory_mb": round(result.get("peak_memory_bytes", 0) / 2**20, 1),
                    **launch_record(manifest),
                    "compute": manifest.get("compute"),  # number format, device, CPU, GPU; None: an older manifest
                    **({"mixture": manifest["mixture"]} if manifest.get("mixture") else {}),  # sources, counts
                },
                dataset=job.spec.data_name(),
                dataset_fingerprint=manifest["dataset"]["fingerprint"],
                trainable_params=result["trainable_params"],
                metrics=ev.metrics,
                run_id=run_id,
                code_version=CODE_VERSION,
                promote=job.spec.promote,
                rank_metric=rank_metric(job.spec),
                evidence=self._evidence(job, ev, adir),
            )
        )

    def _evidence(self, job: AdapterJob, ev: EvalResult, adapter_dir: Path) -> dict | None:
        """For ``promote: if_significantly_better``: this version against the name's current champion, paired on
        the held-out rows both were scored on (None for another rule, or with no champion to beat)."""
        if job.spec.promote != "if_significantly_better":
            return None
        champion = self.registry.champion(job.name)
        if champion is None or Path(champion.path).resolve() == adapter_dir.resolve():
            return None
        metric = rank_metric(job.spec)
        confidence = job.spec.gate.confidence if job.spec.gate and job.spec.gate.confidence else 0.95
        try:
            theirs = load_eval(Path(champion.path)).per_row
        except (OSError, ValueError):
            theirs = None
        if ev.per_row is None or theirs is None:
            missing = "this version's" if ev.per_row is None else f"champion v{champion.version}'s"
            return {
                "champion_version": champion.version,
                "significant": False,
                "detail": f"not promoted: {missing} per-row scores are missing (registered or imported from "
                "elsewhere); re-evaluate it to compare",
            }
        return compare_with_champion(ev.per_row, theirs, champion.version, metric, confidence).model_dump()


def launch_record(manifest: dict) -> dict:
    """How a run was trained, for the registry: its world size and launcher command (`in-process` for one process;
    manifests from before data-parallel training say nothing, and neither does this)."""
    dp = manifest.get("data_parallel")
    return {"world_size": dp["world_size"], "launcher": dp["launcher"]} if dp else {}


def rank_metric(spec: AdapterSpec) -> str:
    """The metric versions of an adapter are ranked by: its gate's, else eval loss."""
    return spec.gate.metric if spec.gate else DEFAULT_RANK_METRIC
