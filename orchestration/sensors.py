"""Sensors: a changed dataset file re-runs its chain; a promotion reaches the running server.

The change detection and the notification are plain functions (tested without Dagster); the sensors wrap them.
"""

import glob
import hashlib
import json
from pathlib import Path

import dagster as dg

from lora_assets.pipeline import Pipeline, adapter_jobs
from lora_assets.spec import PipelineSpec
from orchestration.assets import LoraFoundryHome
from serving import deployment
from serving.launch import ServerError
from serving.notify import notify_promotion


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


def downstream_of_dataset(spec: PipelineSpec, dataset: str) -> list[dg.AssetKey]:
    """The clean asset of ``dataset`` and every train/eval/register asset of the adapters that use it, plus the
    sweeps' leaderboards and the deployment, so one run carries the change to the server (blocking checks
    still apply inside that run)."""
    keys = [dg.AssetKey(["dataset", dataset, "clean"])]
    names = set()
    for job in adapter_jobs(spec).values():
        if job.spec.dataset == dataset:
            keys += [dg.AssetKey(["adapter", job.key, stage]) for stage in ("train", "eval", "register")]
            names.add(job.name)
    keys += [dg.AssetKey(["adapter", n, "leaderboard"]) for n in sorted(names) if spec.adapters[n].sweep]
    return keys + [dg.AssetKey(["serving", "deployment"])]


def build_dataset_sensor(spec: PipelineSpec) -> dg.SensorDefinition:
    @dg.sensor(name="dataset_files_changed", minimum_interval_seconds=30,
               target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.STOPPED,
               description="When a dataset file changes (size or mtime), run clean -> train -> eval -> register "
               "for the adapters that use it, then update the deployment. The first tick only records the files.")
    def dataset_files_changed(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        seen = json.loads(context.cursor) if context.cursor else None
        now = {name: dataset_signature(spec.dataset_path(name)) for name in spec.datasets}
        if seen is None:
            return dg.SensorResult(skip_reason="recorded the dataset files; changes from now on start runs",
                                   cursor=json.dumps(now))
        changed = sorted(n for n in now if seen.get(n) != now[n])
        requests = [dg.RunRequest(run_key=f"{n}:{now[n]}", asset_selection=downstream_of_dataset(spec, n),
                                  tags={"lorafoundry/dataset": n}) for n in changed]
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(now),
                               skip_reason=None if requests else "no dataset file changed")

    return dataset_files_changed


def notify_new_promotions(spec: PipelineSpec, home: Path, after: str | None) -> tuple[list[str], str | None]:
    """Reload every name promoted since ``after`` (an event timestamp) on the running deployment.

    Returns (one line per promotion handled, the new cursor).
    """
    pipe = Pipeline(spec, home)
    sql = "SELECT occurred_at::VARCHAR, name, version FROM events WHERE action = 'promote'"
    _, rows = pipe.registry.query(sql + (" AND occurred_at > ?::TIMESTAMP" if after else "") + " ORDER BY 1",
                                  [after] if after else [])
    if not rows:
        return [], after
    state = deployment.current(home)
    lines, cursor = [], after
    latest: dict[str, int] = {}
    for at, name, version in rows:
        latest[name] = version
        cursor = at
    for name, version in latest.items():
        if state is None or name not in state["models"]:
            lines.append(f"{name}@{version}: promoted; no running deployment serves {name}")
            continue
        rec = pipe.registry.get(name, version)
        if rec.status != "champion":
            lines.append(f"{name}@{version}: no longer the champion, skipped")
            continue
        try:
            notify_promotion(state["url"], name, rec.path)
            lines.append(f"{name}@{version}: the server at {state['url']} now serves it as {name}")
        except ServerError as e:
            lines.append(f"{name}@{version}: could not update the server: {e}")
    return lines, cursor


def build_promotion_sensor(spec: PipelineSpec) -> dg.SensorDefinition:
    @dg.sensor(name="promotions_to_server", minimum_interval_seconds=15,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description="When a version becomes a name's champion, reload that name on the running vLLM "
               "server in place (no restart); needs LORAFOUNDRY_ADMIN_KEY.")
    def promotions_to_server(context: dg.SensorEvaluationContext, lorafoundry: LoraFoundryHome) -> dg.SkipReason:
        lines, cursor = notify_new_promotions(spec, Path(lorafoundry.home), context.cursor)
        for line in lines:
            context.log.info(line)
        if cursor:
            context.update_cursor(cursor)
        return dg.SkipReason("; ".join(lines) if lines else "no new promotion")

    return promotions_to_server
