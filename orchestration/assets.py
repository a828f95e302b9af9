"""Dagster assets built from a spec: thin wrappers around :class:`lora_assets.pipeline.Pipeline` stages.

Keys: ``base_model/<name>``, ``dataset/<name>/clean``, ``adapter/<job>/train``, ``adapter/<job>/eval``,
``adapter/<job>/register``, and ``serving/deployment``.
"""

import hashlib
import json
import re
from pathlib import Path

import dagster as dg

from lora_assets import envs
from lora_assets.clean import (
    CLEANER_VERSION,
    CheckOutcome,
    CleanReport,
    check_min_eval_rows,
    check_min_train_rows,
    check_no_duplicates,
    check_no_leakage,
    current_clean,
    read_split,
)
from lora_assets.evaluate import load_eval
from lora_assets.hardware import limit_torch_threads, resolve_dtype
from lora_assets.pipeline import CODE_VERSION, AdapterJob, Pipeline, adapter_jobs
from lora_assets.plot import markdown_image
from lora_assets.spec import AdapterSpec, PipelineSpec
from lora_assets.train import LOSS_PLOT, TRAINER_VERSION, run_config
from orchestration import metadata_keys as mk
from orchestration.keys import AssetKeys
from orchestration.resources import LoraFoundryHome, RegistryResource, ServingResource, pipeline
from registry import leaderboard
from registry.metrics import METRICS
from registry.rules import SERVABLE_STATUSES
from serving.deployment import deploy
from serving.launch import plan_server

#: Training and evaluation run in this Dagster pool: an instance that limits it (`make ui` gives every pool one
#: slot; or `dagster instance concurrency set training N`) keeps two *runs* from training at once. Within one
#: run the executor's limit below holds with no instance config at all.
TRAINING_POOL = "training"

#: The op tag of the steps that run a model (building the base, training, evaluating): at most MODEL_STEPS_LIMIT of
#: them run at once within a run (the location's executor runs one step at a time, orchestration/location.py; an
#: executor that runs steps in parallel limits this tag), and each gives its torch that share of the CPUs: several
#: torch processes at once on one machine thrash (docs/benchmarks.md, "Thread oversubscription").
MODEL_STEP_TAG = {"lorafoundry/compute": "model"}
MODEL_STEPS_LIMIT = 1


#: Registry events that record a promotion decision on a version (shown on its register asset).
PROMOTION_EVENTS = ("promote", "keep_champion")

#: Declarative automation for everything downstream of cleaning: when an upstream asset is updated (and nothing
#: upstream is missing or running), materialize, but only once every blocking check on the parents has passed, so
#: a failed leakage check or quality gate stops the chain here exactly as it does inside one run. Acted on by
#: the `follow_upstream` sensor (off by default; switch it on in the UI's Automation page).
FOLLOW_UPSTREAM = (
    dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
).with_label("eager, once upstream blocking checks passed")


def code_version(*parts) -> str:
    """A short hash of what determines an asset's output: a changed spec shows the affected assets as stale."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    lines = ["| metric | base | adapter | gain (positive = better) | 95% CI of gain |", "|---|---|---|---|---|"]
    for m, v in metrics.items():
        ci = f"[{v['gain_ci_low']:+.4f}, {v['gain_ci_high']:+.4f}]" if "gain_ci_low" in v else ""
        gain = f"{v['gain']:+.4f}" if "gain" in v else ""
        lines.append(f"| {m} | {v['base']:.4f} | {v['adapter']:.4f} | {gain} | {ci} |")
    return "\n".join(lines)


def _rows_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v) -> str:
        text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        return text.replace("|", "\\|").replace("\n", " ")[:160]

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _loss_plot(adapter_dir: str, curve: list[tuple[int, float]]) -> str:
    """The loss plot as an inline image, with the numbers under it (the image alone is not searchable)."""
    png = Path(adapter_dir) / LOSS_PLOT
    image = (
        markdown_image(png.read_bytes(), "training loss")
        if png.exists()
        else "(no plot: an adapter registered or imported from elsewhere)"
    )
    return image + "\n\n" + _rows_table([{"step": s, "loss": f"{v:.4f}"} for s, v in curve], ["step", "loss"])


def base_model_name(base_model: str) -> str:
    """The asset-key part for a spec's ``base_model``: `builtin:tiny` -> `builtin_tiny`; a local dir or hub id ->
    its last part (a key part allows letters, digits, `_`, `-` and `.`)."""
    name = base_model.replace(":", "_", 1) if base_model.startswith("builtin:") else Path(base_model).name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "base_model"


def base_model_key(spec: PipelineSpec, keys: AssetKeys) -> dg.AssetKey:
    return keys.base_model(base_model_name(spec.base_model))


def _base_model_asset(spec: PipelineSpec, keys: AssetKeys) -> dg.AssetsDefinition:
    @dg.asset(
        key=base_model_key(spec, keys),
        group_name=keys.group("models"),
        kinds={"pytorch"},
        op_tags=MODEL_STEP_TAG,
        code_version=code_version(spec.base_model),
        description=f"Base model `{spec.base_model}` as a local model dir: built once for `builtin:` bases (under "
        "a file lock, published by a rename), else located on disk. Its data version is its content hash.",
    )
    def base_model_asset(context: dg.AssetExecutionContext, lorafoundry: LoraFoundryHome) -> dg.MaterializeResult:
        limit_torch_threads(MODEL_STEPS_LIMIT)
        ref = Pipeline(spec, lorafoundry.home, progress=context.log.info).base
        return dg.MaterializeResult(
            data_version=dg.DataVersion(ref.content_hash),
            metadata={
                "content_hash": ref.content_hash,
                mk.BASE_OBTAINED: ref.obtained,
                mk.BASE_PARAMETERS: ref.parameters,
                "architecture": ", ".join(ref.config.get("architectures", [])),
                "path": dg.MetadataValue.path(str(ref.path)),
                "build_record": dg.MetadataValue.json(ref.build_record()),
            },
        )

    return base_model_asset


def _clean_asset(spec: PipelineSpec, keys: AssetKeys, ds_name: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=keys.clean(ds_name),
        deps=[base_model_key(spec, keys)],  # its tokenizer measures lengths
        group_name=keys.group("datasets"),
        kinds={"duckdb"},
        code_version=code_version(spec.datasets[ds_name].model_dump(mode="json"), spec.base_model, CLEANER_VERSION),
        description=f"Dataset `{ds_name}` parsed, normalized to chat messages, PII-redacted, deduplicated "
        "(exact and near) and split train/eval with DuckDB; every dropped row kept in quarantine.jsonl "
        "with its reason.",
    )
    def clean_asset(context: dg.AssetExecutionContext, lorafoundry: LoraFoundryHome) -> dg.MaterializeResult:
        report = Pipeline(spec, lorafoundry.home, progress=context.log.info).clean(ds_name)
        counts = {
            mk.CLEAN_ROWS_IN: report.rows_in,
            mk.CLEAN_ROWS_TRAIN: report.rows_train,
            mk.CLEAN_ROWS_EVAL: report.rows_eval,
            mk.CLEAN_ROWS_QUARANTINED: report.rows_quarantined,
            "leakage_moved_to_train": report.leakage_moved_to_train,
        }
        reasons = [{"reason": k, "rows": v} for k, v in report.by_reason.items()] or [{"reason": "(none)", "rows": 0}]
        cleaned = [{"source": r["source"], "messages": r["messages"]} for r in read_split(report, "train")[:5]]
        return dg.MaterializeResult(
            metadata={
                **counts,
                "counts": dg.MetadataValue.md(_rows_table([counts], list(counts))),
                "quarantined_by_reason": dg.MetadataValue.md(_rows_table(reasons, ["reason", "rows"])),
                "pii_redactions": dg.MetadataValue.json(report.pii_redactions),
                "detected_format": f"{report.detected_format} ({report.format_reason})",
                "cleaned_rows_sample": dg.MetadataValue.md(_rows_table(cleaned, ["source", "messages"])),
                "quarantined_rows_sample": dg.MetadataValue.md(
                    _rows_table(read_split(report, "quarantine")[:5], ["reason", "source", "raw"])
                ),
                "fingerprint": report.fingerprint,
                "output_dir": dg.MetadataValue.path(report.output_dir),
            }
        )

    return clean_asset


def _clean_checks(spec: PipelineSpec, keys: AssetKeys, ds_name: str) -> list[dg.AssetChecksDefinition]:
    """Blocking checks on the written splits: a failure keeps training from starting in the same run."""
    key = keys.clean(ds_name)
    minimum = spec.datasets[ds_name].min_train_rows
    eval_minimum = spec.datasets[ds_name].min_eval_rows

    def result(outcome: CheckOutcome) -> dg.AssetCheckResult:
        return dg.AssetCheckResult(
            passed=outcome.passed,
            description=outcome.detail,
            metadata={"offenders": dg.MetadataValue.json(outcome.offenders)},
        )

    def report_of(lorafoundry: LoraFoundryHome) -> CleanReport:
        return current_clean(Pipeline(spec, lorafoundry.home).datasets_dir, ds_name)

    @dg.asset_check(
        asset=key,
        name="no_train_eval_leakage",
        blocking=True,
        description="No eval row shares its content or prompt with a train row.",
    )
    def no_leakage(lorafoundry: LoraFoundryHome) -> dg.AssetCheckResult:
        return result(check_no_leakage(report_of(lorafoundry)))

    @dg.asset_check(
        asset=key,
        name="no_duplicates_left",
        blocking=True,
        description="No two kept rows have the same normalized content.",
    )
    def no_duplicates(lorafoundry: LoraFoundryHome) -> dg.AssetCheckResult:
        return result(check_no_duplicates(report_of(lorafoundry)))

    @dg.asset_check(
        asset=key,
        name="min_train_rows",
        blocking=True,
        description=f"At least {minimum} train rows (datasets.{ds_name}.min_train_rows).",
    )
    def min_train(lorafoundry: LoraFoundryHome) -> dg.AssetCheckResult:
        return result(check_min_train_rows(report_of(lorafoundry), minimum))

    @dg.asset_check(
        asset=key,
        name="min_eval_rows",
        blocking=True,
        description=f"At least {eval_minimum} eval rows (datasets.{ds_name}.min_eval_rows): evaluation needs them, "
        "so an empty held-out split stops the run before training, not after it.",
    )
    def min_eval(lorafoundry: LoraFoundryHome) -> dg.AssetCheckResult:
        return result(check_min_eval_rows(report_of(lorafoundry), eval_minimum))

    return [no_leakage, no_duplicates, min_train, min_eval]


def _mixture_metadata(adapter_dir: str) -> dict:
    """For an adapter trained on a mixture: each source's weight, rows selected of available, and fingerprint."""
    manifest = json.loads((Path(adapter_dir) / "training_manifest.json").read_text())
    sources = manifest.get("mixture") or []
    if not sources:
        return {}
    rows = "\n".join(
        f"| {s['dataset']} | {s['weight']:.2f} | {s['rows_selected']} | {s['rows_available']} | {s['rows_eval']} "
        f"| `{s['fingerprint']}` |"
        for s in sources
    )
    head = "| source | weight | train rows selected | available | eval rows | fingerprint |\n" + "|---" * 6 + "|\n"
    return {"mixture": dg.MetadataValue.md(head + rows)}


def _data_words(spec: AdapterSpec) -> str:
    """What an adapter trains on, for descriptions: `name`, or the mixture with its normalized weights."""
    if spec.datasets is None:
        return f"`{spec.dataset}`"
    return "a mixture of " + ", ".join(f"`{n}` ({w:.2f})" for n, w in spec.sources().items())


def _train_asset(spec: PipelineSpec, keys: AssetKeys, job: AdapterJob) -> dg.AssetsDefinition:
    @dg.asset(
        key=keys.adapter(job.key, "train"),
        deps=[*(keys.clean(ds) for ds in job.spec.sources()), base_model_key(spec, keys)],
        group_name=keys.group("adapters"),
        kinds={"peft", "pytorch"},
        pool=TRAINING_POOL,
        op_tags=MODEL_STEP_TAG,
        retry_policy=dg.RetryPolicy(max_retries=1, delay=10),
        automation_condition=FOLLOW_UPSTREAM,
        code_version=code_version(run_config(job.spec), spec.base_model, TRAINER_VERSION),
        description=f"LoRA adapter `{job.key}` trained for exactly one epoch on {_data_words(job.spec)} "
        f"(r={job.spec.r}, alpha={job.spec.alpha}).",
    )
    def train_asset(context: dg.AssetExecutionContext, lorafoundry: LoraFoundryHome) -> dg.MaterializeResult:
        from orchestration.training_launch import launch_metadata, train_with_torchrun

        limit_torch_threads(MODEL_STEPS_LIMIT)
        pipe = Pipeline(spec, lorafoundry.home, progress=context.log.info)
        # processes > 1: torchrun through Dagster Pipes (orchestration/training_launch.py); else in this process
        r = train_with_torchrun(context, pipe, job.key) if job.spec.processes > 1 else pipe.train(job.key)
        return dg.MaterializeResult(
            metadata={
                "method": r.method,
                "method_reason": r.method_reason,
                mk.TRAIN_REUSED: r.reused,
                mk.TRAIN_LOSS: r.train_loss,
                mk.TRAIN_STEPS: r.steps,
                "examples": r.examples,
                "tokens": r.tokens,
                mk.TRAIN_TOKENS_PER_S: r.tokens_per_s,
                "wall_s": r.wall_s,
                "trainable_params": r.trainable_params,
                "trainable_percent": round(100 * r.trainable_params / r.total_params, 3),
                "peak_memory_mb": round(r.peak_memory_bytes / 2**20, 1),
                "peak_memory_kind": r.peak_memory_kind,
                "loss_curve": dg.MetadataValue.md(_loss_plot(r.adapter_dir, r.loss_curve)),
                "adapter_dir": dg.MetadataValue.path(r.adapter_dir),
                **launch_metadata(r.adapter_dir),  # world_size, launcher
                **_mixture_metadata(r.adapter_dir),
            }
        )

    return train_asset


def _eval_asset(spec: PipelineSpec, keys: AssetKeys, job: AdapterJob) -> dg.AssetsDefinition:
    @dg.asset(
        key=keys.adapter(job.key, "eval"),
        deps=[keys.adapter(job.key, "train")],
        group_name=keys.group("adapters"),
        kinds={"peft"},
        pool=TRAINING_POOL,
        op_tags=MODEL_STEP_TAG,
        automation_condition=FOLLOW_UPSTREAM,
        code_version=code_version(
            job.spec.max_eval_rows,
            job.spec.gate and job.spec.gate.model_dump(),
            resolve_dtype(spec.serving.compute_dtype),
        ),
        description=f"Adapter `{job.key}` against the base on the held-out split of {_data_words(job.spec)}: "
        "exact match, chrF, eval loss and perplexity with 95% bootstrap CIs on the gains, and sample answers.",
    )
    def eval_asset(context: dg.AssetExecutionContext, lorafoundry: LoraFoundryHome) -> dg.MaterializeResult:
        limit_torch_threads(MODEL_STEPS_LIMIT)
        ev = Pipeline(spec, lorafoundry.home).evaluate(job.key)
        meta: dict = {
            "metrics": dg.MetadataValue.md(_metrics_table(ev.metrics)),
            "samples": dg.MetadataValue.md(_rows_table(ev.samples, ["prompt", "reference", "base", "adapter"])),
            mk.EVAL_ROWS: ev.rows,
            "generation": dg.MetadataValue.json(ev.generation),
        }
        for metric, v in ev.metrics.items():
            meta[mk.eval_metric(metric, "base")] = v["base"]
            meta[mk.eval_metric(metric, "adapter")] = v["adapter"]
        if ev.gate is not None:
            meta["gate"] = ev.gate.detail
        if ev.precision_agreement is not None:
            meta["precision_agreement"] = dg.MetadataValue.json(ev.precision_agreement)
        if ev.tool_calls is not None:  # rows whose reference is a tool call: name and arguments matched
            meta["tool_calls"] = dg.MetadataValue.json(ev.tool_calls)
        for source, table in ev.by_source.items():  # a mixture: each source's rows on their own
            meta[f"metrics of {source}"] = dg.MetadataValue.md(_metrics_table(table))
        return dg.MaterializeResult(metadata=meta)

    return eval_asset


def _register_asset(spec: PipelineSpec, keys: AssetKeys, job: AdapterJob) -> dg.AssetsDefinition:
    @dg.asset(
        key=keys.adapter(job.key, "register"),
        deps=[keys.adapter(job.key, "eval")],
        group_name=keys.group("adapters"),
        kinds={"duckdb"},
        code_version=code_version(job.spec.promote, CODE_VERSION),
        automation_condition=FOLLOW_UPSTREAM,
        description=f"Registry row for adapter `{job.name}`: version, status, sha256, metrics, lineage.",
    )
    def register_asset(
        context: dg.AssetExecutionContext, lorafoundry: LoraFoundryHome, registry: RegistryResource
    ) -> dg.MaterializeResult:
        pipe = pipeline(spec, lorafoundry, registry)
        rec = pipe.register(job.key, run_id=context.run.run_id)
        meta = {
            "name": rec.name,
            mk.REGISTER_VERSION: rec.version,
            mk.REGISTER_STATUS: rec.status,
            "adapter_sha256": rec.adapter_sha256,
            "path": dg.MetadataValue.path(rec.path),
            "dataset_fingerprint": rec.dataset_fingerprint or "",
        }
        decision = next(
            (e for e in reversed(pipe.registry.events(rec.name, rec.version)) if e["action"] in PROMOTION_EVENTS), None
        )
        if decision is not None:  # the promotion rule's verdict, with its evidence when it was decided on one
            meta["promotion"] = f"{decision['action']}: {decision['detail'].get('reason')}"
            if decision["detail"].get("evidence"):
                meta["promotion_evidence"] = dg.MetadataValue.json(decision["detail"]["evidence"])
        return dg.MaterializeResult(metadata=meta)

    return register_asset


def _gate_check(spec: PipelineSpec, keys: AssetKeys, job: AdapterJob) -> dg.AssetChecksDefinition:
    """The adapter's quality gate as a blocking check on its registry row. A failure keeps the run from deploying
    (the rejected version stays in the registry for inspection). For a sweep point a failure is a result of the
    sweep, not an incident: it is reported as a warning and is not blocking (Dagster blocks only on ERROR)."""
    gate = job.spec.gate
    what = (
        f"{gate.metric} "
        + (
            f"gain >= {gate.min_gain}"
            if gate.min_gain is not None
            else f"{METRICS[gate.metric].bound_op} {gate.min_value}"
        )
        if gate
        else "no gate set (always passes)"
    )

    @dg.asset_check(
        asset=keys.adapter(job.key, "register"),
        name="quality_gate",
        blocking=not job.point,
        description=f"Quality gate: {what}. A failing adapter is registered as `rejected`, never served.",
    )
    def quality_gate(lorafoundry: LoraFoundryHome) -> dg.AssetCheckResult:
        ev = load_eval(Pipeline(spec, lorafoundry.home).adapter_dir(job.key))
        passed = ev.gate is None or ev.gate.passed
        severity = dg.AssetCheckSeverity.WARN if job.point else dg.AssetCheckSeverity.ERROR
        return dg.AssetCheckResult(
            passed=passed,
            severity=severity,
            description=ev.gate.detail if ev.gate else "no gate set",
            metadata={"metrics": dg.MetadataValue.json(ev.metrics)},
        )

    return quality_gate


def _leaderboard_asset(spec: PipelineSpec, keys: AssetKeys, name: str, job_keys: list[str]) -> dg.AssetsDefinition:
    @dg.asset(
        key=keys.adapter(name, "leaderboard"),
        deps=[keys.adapter(k, "register") for k in job_keys],
        group_name=keys.group("adapters"),
        kinds={"duckdb"},
        automation_condition=FOLLOW_UPSTREAM,
        description=f"Every registered version of sweep `{name}` ranked by its gate metric, with trainable "
        "parameters, training wall time and peak memory; the winner is marked.",
    )
    def leaderboard_asset(context: dg.AssetExecutionContext, registry: RegistryResource) -> dg.MaterializeResult:
        rows = registry.open().leaderboard(name)
        best = next((r for r in rows if r["status"] in SERVABLE_STATUSES), None)
        meta = {"leaderboard": dg.MetadataValue.md(leaderboard.markdown(rows)), mk.LEADERBOARD_VERSIONS: len(rows)}
        if best is not None:
            meta |= {
                mk.LEADERBOARD_WINNER_VERSION: best["version"],
                "winner_point": leaderboard.point_label(
                    json.loads(best["sweep_point"]) if isinstance(best["sweep_point"], str) else best["sweep_point"]
                ),
                mk.LEADERBOARD_WINNER_METRIC: f"{best['rank_metric']} = {best['metric_value']:.4f}",
            }
        if "seed" in spec.adapters[name].sweep:
            groups = leaderboard.across_seeds(rows)
            meta["across_seeds"] = dg.MetadataValue.md(
                _rows_table(
                    [
                        {
                            "point": g["label"],
                            "seeds": g["seeds"],
                            "mean": f"{g['mean']:.4f}",
                            "95% CI": f"[{g['ci_low']:.4f}, {g['ci_high']:.4f}]",
                        }
                        for g in groups
                    ],
                    ["point", "seeds", "mean", "95% CI"],
                )
            )
        return dg.MaterializeResult(metadata=meta)

    return leaderboard_asset


def _deployment_asset(spec: PipelineSpec, keys: AssetKeys, upstream: list[dg.AssetKey]) -> dg.AssetsDefinition:
    @dg.asset(
        key=keys.deployment(),
        deps=upstream,
        group_name=keys.group("serving"),
        kinds={"vllm"},
        code_version=code_version(spec.serving.model_dump(mode="json")),
        automation_condition=FOLLOW_UPSTREAM,
        description="The vLLM server for the base and every servable registered adapter (serving.replicas of them "
        "behind vllm-router when above 1), started (or replaced when the adapter set changed) and left running; "
        "recorded in <home>/serving/deployment.json.",
    )
    def deployment_asset(
        context: dg.AssetExecutionContext,
        lorafoundry: LoraFoundryHome,
        registry: RegistryResource,
        serving: ServingResource,
    ) -> dg.MaterializeResult:
        home = Path(lorafoundry.home)
        cmd, env, url, names, left_out = plan_server(spec, home, registry_path=registry.path)
        for line in left_out:
            context.log.warning(f"left out {line}")
        if serving.admin_key:
            env[envs.ADMIN_KEY.name] = serving.admin_key
        context.log.info("deploying: " + " ".join(cmd))
        replicas = spec.serving.replicas
        timeout_s = spec.serving.startup_timeout_s
        state, changed = deploy(home, cmd, env, url, names, timeout_s, None, replicas, spec.serving.router_policy)
        context.log.info(f"{'started' if changed else 'unchanged'}: {url}/v1 serving {', '.join(names)}")
        return dg.MaterializeResult(
            metadata={
                mk.DEPLOYMENT_URL: dg.MetadataValue.url(f"{url}/v1/models"),
                "served_models": dg.MetadataValue.md("\n".join(f"- `{n}`" for n in names)),
                "pid": state["pid"],
                "replicas": replicas,
                mk.DEPLOYMENT_RESTARTED: changed,
                "left_out": dg.MetadataValue.md("\n".join(f"- {line}" for line in left_out) or "none"),
                "command": dg.MetadataValue.md(f"```\n{' '.join(cmd)}\n```"),
            }
        )

    return deployment_asset


def build_assets(
    spec: PipelineSpec, deployment: bool = True, keys: AssetKeys | None = None
) -> list[dg.AssetsDefinition]:
    """The base model, upstream of everything; one clean asset (and its blocking checks) per dataset;
    train/eval/register assets and a blocking quality gate check per adapter (per sweep point); a leaderboard per
    sweep; and the deployment. ``keys`` names them (default: no prefix)."""
    keys = keys or AssetKeys()
    assets: list[dg.AssetsDefinition] = [_base_model_asset(spec, keys)]
    for name in spec.datasets:
        assets += [_clean_asset(spec, keys, name), *_clean_checks(spec, keys, name)]
    jobs = adapter_jobs(spec)
    for job in jobs.values():
        assets += [
            _train_asset(spec, keys, job),
            _eval_asset(spec, keys, job),
            _register_asset(spec, keys, job),
            _gate_check(spec, keys, job),
        ]
    for name, ad in spec.adapters.items():
        if ad.sweep:
            assets.append(_leaderboard_asset(spec, keys, name, [k for k, j in jobs.items() if j.name == name]))
    if deployment:
        upstream = [
            a.key
            for a in assets
            if not isinstance(a, dg.AssetChecksDefinition) and a.key.path[-1] in ("register", "leaderboard")
        ]
        assets.append(_deployment_asset(spec, keys, upstream))
    return assets
