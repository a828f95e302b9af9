"""Sensors: a changed dataset file re-runs its chain; a promotion reaches the running server; declarative
automation follows upstream changes.

The change detection and the notification are plain functions (tested without Dagster); the sensors wrap them.
"""

import glob
import hashlib
import json
from pathlib import Path

import dagster as dg

from lora_assets.pipeline import adapter_jobs
from lora_assets.spec import PipelineSpec
from orchestration.keys import AssetKeys
from orchestration.resources import LoraFoundryHome, RegistryResource, ServingResource
from registry.store import AdapterRegistry
from serving import deployment
from serving.launch import ServerError
from serving.notify import ServerUnavailable, notify_promotion, notify_unload


def dataset_signature(path: Path) -> str:
    """Size and modification time of every file a dataset path (or glob) names: cheap, and any edit changes it."""
    files = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else [str(path)]
    parts = []
    for f in files:
        try:
            st = Path(f).stat()
            parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{f}:missing")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def downstream_of_dataset(spec: PipelineSpec, dataset: str, keys: AssetKeys | None = None) -> list[dg.AssetKey]:
    """The clean asset of ``dataset`` and every train/eval/register asset of the adapters that use it, plus the
    sweeps' leaderboards and the deployment, so one run carries the change to the server (blocking checks
    still apply inside that run)."""
    keys = keys or AssetKeys()
    selected = [keys.clean(dataset)]
    names = set()
    for job in adapter_jobs(spec).values():
        if dataset in job.spec.sources():
            selected += [keys.adapter(job.key, stage) for stage in ("train", "eval", "register")]
            names.add(job.name)
    selected += [keys.adapter(n, "leaderboard") for n in sorted(names) if spec.adapters[n].sweep]
    return selected + [keys.deployment()]


def build_dataset_sensor(spec: PipelineSpec, keys: AssetKeys | None = None) -> dg.SensorDefinition:
    keys = keys or AssetKeys()

    @dg.sensor(
        name=keys.name("dataset_files_changed"),
        minimum_interval_seconds=30,
        target=keys.selection(),
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="When dataset files change (size or mtime), run clean -> train -> eval -> register "
        "for the adapters that use them, then update the deployment, in one run per tick. The first tick "
        "only records the files.",
    )
    def dataset_files_changed(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        seen = json.loads(context.cursor) if context.cursor else None
        now = {name: dataset_signature(spec.dataset_path(name)) for name in spec.datasets}
        if seen is None:
            return dg.SensorResult(
                skip_reason="recorded the dataset files; changes from now on start runs", cursor=json.dumps(now)
            )
        changed = sorted(n for n in now if seen.get(n) != now[n])
        if not changed:
            return dg.SensorResult(cursor=json.dumps(now), skip_reason="no dataset file changed")
        # one run for everything that changed in this tick: one deployment at the end, not one per dataset
        selection = list(dict.fromkeys(k for n in changed for k in downstream_of_dataset(spec, n, keys)))
        request = dg.RunRequest(
            run_key=",".join(f"{n}:{now[n]}" for n in changed),
            asset_selection=selection,
            tags={"lorafoundry/datasets": ",".join(changed)},
        )
        return dg.SensorResult(run_requests=[request], cursor=json.dumps(now))

    return dataset_files_changed


def notify_new_promotions(
    registry: AdapterRegistry,
    home: Path,
    after: str | None,
    url: str | None = None,
    admin_key: str | None = None,
    names: set[str] | None = None,
) -> tuple[list[str], str | None]:
    """Bring the running server up to date with every name whose champion changed since ``after`` (an event
    timestamp): promoted, or rejected on re-evaluation. The plain name is reloaded in place with what a fresh
    deployment would serve (the champion, else the latest candidate), or unloaded when nothing is servable.

    With no cursor yet (``after`` None) nothing is sent: the server started with the champions of that moment, so
    only the newest event's time is recorded (the epoch when there is none, so the first promotion counts).
    When the server cannot be reached or fails (5xx) the cursor does not move and the next call tries again
    (reloading in place is idempotent); a refusal (no admin key, 4xx) is reported once and not retried.

    Args:
        registry: the registry whose events are read.
        home: the home dir whose running deployment (``serving/deployment.json``) is updated.
        after: the cursor: the time of the last event handled.
        url: send to this server instead of the deployment's own URL (e.g. a load balancer).
        admin_key: the server's admin key (default LORAFOUNDRY_ADMIN_KEY).
        names: only these adapter names (one pipeline's, when several share the home); default all.

    Returns (one line per name handled, the new cursor).
    """
    rows = registry.champion_changes(after)
    if after is None:
        return [], rows[-1][0] if rows else "1970-01-01 00:00:00"
    if not rows:
        return [], after
    state = deployment.current(home)
    target = url or (state["url"] if state else None)
    lines, failed = [], False
    latest: dict[str, int] = {}
    for _, name, version in rows:
        if names is None or name in names:
            latest[name] = version
    base = state.get("base_hash") if state and url is None else None  # only versions trained on its base
    servable = [r for r in registry.servable() if base is None or r.base_model_hash == base]
    for name, version in latest.items():
        if target is None or (url is None and name not in state["models"]):
            lines.append(f"{name}@{version}: promoted; no running deployment serves {name}")
            continue
        pick = next((r for r in servable if r.name == name), None)
        try:
            if pick is None:
                notify_unload(target, name, admin_key=admin_key)
                lines.append(f"{name}: no servable version left; unloaded from {target}")
            else:
                notify_promotion(target, name, pick.path, admin_key=admin_key)
                lines.append(f"{name}@{pick.version}: the server at {target} now serves it as {name}")
        except ServerUnavailable as e:
            failed = True
            lines.append(f"{name}: could not update the server (will retry): {e}")
        except ServerError as e:
            lines.append(f"{name}: the server refused the update (not retried): {e}")
    return lines, after if failed else rows[-1][0]


def build_promotion_sensor(spec: PipelineSpec, keys: AssetKeys | None = None) -> dg.SensorDefinition:
    keys = keys or AssetKeys()
    names = set(spec.adapters) if keys.prefix else None  # alone in its code location: every name in the home

    @dg.sensor(
        name=keys.name("promotions_to_server"),
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="When a name's champion changes (a promotion, or a champion rejected on "
        "re-evaluation), reload that name on the running vLLM server in place (no restart), or unload it "
        "when nothing is servable; needs the serving resource's admin key (LORAFOUNDRY_ADMIN_KEY). An "
        "unreachable server is retried on the next tick.",
    )
    def promotions_to_server(
        context: dg.SensorEvaluationContext,
        lorafoundry: LoraFoundryHome,
        registry: RegistryResource,
        serving: ServingResource,
    ) -> dg.SkipReason:
        lines, cursor = notify_new_promotions(
            registry.open(actor="sensor"),
            Path(lorafoundry.home),
            context.cursor,
            url=serving.url,
            admin_key=serving.admin_key,
            names=names,
        )
        for line in lines:
            context.log.info(line)
        if cursor:
            context.update_cursor(cursor)
        return dg.SkipReason("; ".join(lines) if lines else "no new promotion")

    return promotions_to_server


def build_automation_sensor(keys: AssetKeys | None = None) -> dg.AutomationConditionSensorDefinition:
    """Evaluates the assets' automation conditions (orchestration.assets.FOLLOW_UPSTREAM)."""
    keys = keys or AssetKeys()
    return dg.AutomationConditionSensorDefinition(
        keys.name("follow_upstream"),
        target=keys.selection(),
        default_status=dg.DefaultSensorStatus.STOPPED,
        minimum_interval_seconds=30,
        description="Declarative automation: when an asset is updated, materialize what depends on it once every "
        "blocking check upstream has passed (a failed leakage check or quality gate stops the chain).",
    )
