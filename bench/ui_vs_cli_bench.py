"""The whole graph launched from the UI (`dagster dev`, no instance config) against `lorafoundry run`, same spec.

    python bench/ui_vs_cli_bench.py [--spec examples/demo.yaml] [--models-home DIR] [--repeats N]

Both paths start from an empty home that shares only the built base model (`models/`, built once under
--models-home, outside the timings), so both clean, train, evaluate and register every adapter from scratch; the
deployment is left out (`--no-deploy`; a vLLM start either way).

- CLI: `lorafoundry run SPEC --no-deploy --home H`, from the command's start to its exit.
- UI: `dagster dev -w workspace.yaml` with LORAFOUNDRY_SPEC=SPEC and a DAGSTER_HOME whose dagster.yaml sets
  nothing but telemetry (what `dagster dev` gives a user without `make ui`), started and ready before the clock
  starts; the graph is launched through GraphQL as the UI's "Materialize all" does (`__ASSET_JOB`, every asset
  but serving/deployment, their checks included), from the launch to the run's end.

The runs alternate (CLI first in even rounds); the ratio of the medians is reported (goal <= 1.10x). The UI run's
steps are listed, and the bench fails if two model steps (tag lorafoundry/compute=model) overlapped in time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_assets import envs  # noqa: E402 (after the path is set)
from lora_assets.home import Home  # noqa: E402

BIN = Path(sys.executable).parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

LAUNCH = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } ... on InvalidSubsetError { message }
  ... on RunConfigValidationInvalid { errors { message } } } }"""
STATUS = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"""
RUN = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status startTime endTime
  stepStats { stepKey status startTime endTime } } } }"""
#: How often the bench asks for the run's status: the wall time is known to this, and asking more often loads the
#: webserver on the 2 cores the run trains on (every 0.5 s with the step stats cost ~6% of a core).
POLL_S = 2.0
GRAPH = """{ repositoriesOrError { __typename ... on RepositoryConnection { nodes { name location { name } } } }
  assetNodes { assetKey { path } opNames } }"""


def fresh_home(kind: str, models_home: Path) -> Path:
    home = Path(tempfile.mkdtemp(prefix=f"ui-vs-cli-{kind}-"))
    Home.at(home).models.symlink_to(Home.at(models_home).models)
    return home


def run_cli(spec: Path, home: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [str(BIN / "lorafoundry"), "run", str(spec), "--no-deploy", "--home", str(home)],
        check=True,
        env=os.environ | OFFLINE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gql(url: str, query: str, variables: dict | None = None) -> dict:
    body = httpx.post(f"{url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60).json()
    if body.get("errors"):
        raise RuntimeError(f"GraphQL error: {body['errors']}")
    return body["data"]


def start_dagster_dev(spec: Path, home: Path) -> tuple[subprocess.Popen, str]:
    """`dagster dev` on a free port over ``home``, with no concurrency config in its instance; returns when the
    code location answers."""
    dagster_home = Home.at(home).dagster_home
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = _free_port()
    env = os.environ | OFFLINE | {envs.SPEC.name: str(spec), envs.HOME.name: str(home)}
    env["DAGSTER_HOME"] = str(dagster_home)
    log = (home / "dagster-dev.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("dagster dev exited: " + (home / "dagster-dev.log").read_text()[-3000:])
        try:
            if "RepositoryConnection" in httpx.post(f"{url}/graphql", json={"query": GRAPH}, timeout=5).text:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError("dagster dev did not come up in 300 s")


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL the process group we started (SIGTERM may be ignored where this runs) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(60)


def run_ui(url: str) -> tuple[float, list[dict]]:
    """Launch every asset but the deployment as the UI's "Materialize all" does; its wall time and steps."""
    graph = _gql(url, GRAPH)
    (repo,) = graph["repositoriesOrError"]["nodes"]
    keys = [n["assetKey"] for n in graph["assetNodes"] if n["assetKey"]["path"] != ["serving", "deployment"]]
    params = {
        "selector": {
            "repositoryLocationName": repo["location"]["name"],
            "repositoryName": repo["name"],
            "jobName": "__ASSET_JOB",
            "assetSelection": keys,
        },
        "mode": "default",
        "executionMetadata": {"tags": []},
    }
    t0 = time.time()  # wall clock: compared with the run's endTime
    launched = _gql(url, LAUNCH, {"params": params})["launchRun"]
    if launched["__typename"] != "LaunchRunSuccess":
        raise RuntimeError(f"launch failed: {launched}")
    run_id = launched["run"]["runId"]
    while _gql(url, STATUS, {"id": run_id})["runOrError"]["status"] not in ("SUCCESS", "FAILURE", "CANCELED"):
        time.sleep(POLL_S)
    run = _gql(url, RUN, {"id": run_id})["runOrError"]
    wall = run["endTime"] - t0  # the run's own end (same clock), not when the poll noticed it
    if run["status"] != "SUCCESS":
        raise RuntimeError(f"run {run_id} ended {run['status']}: {run['stepStats']}")
    return wall, run["stepStats"]


def model_steps(spec_path: Path) -> set[str]:
    """The step keys of the steps that run a model (the executor's limited tag)."""
    from lora_assets.spec import load_spec
    from orchestration.assets import MODEL_STEP_TAG, build_assets

    return {
        a.node_def.name
        for a in build_assets(load_spec(spec_path), deployment=False)
        if hasattr(a, "node_def") and all(a.node_def.tags.get(k) == v for k, v in MODEL_STEP_TAG.items())
    }


def overlaps(steps: list[dict], names: set[str]) -> list[tuple[str, str]]:
    """Pairs of the named steps whose runs overlapped in time."""
    spans = sorted((s["startTime"], s["endTime"], s["stepKey"]) for s in steps if s["stepKey"] in names)
    return [(a[2], b[2]) for i, a in enumerate(spans) for b in spans[i + 1 :] if b[0] < a[1]]


def training_speeds(home: Path) -> str:
    """Each trained adapter's tokens/s from its manifest: the same work's speed on either path, so that a
    difference in wall time can be told from the machine's own drift between runs."""
    speeds = []
    for manifest in sorted(home.glob("adapters/*/*/training_manifest.json")):
        result = json.loads(manifest.read_text())["result"]
        speeds.append(f"{manifest.parent.parent.name} {result['tokens_per_s']:.0f} tok/s")
    return ", ".join(speeds)


def print_steps(steps: list[dict]) -> None:
    t0 = min(s["startTime"] for s in steps)
    for s in sorted(steps, key=lambda s: s["startTime"]):
        print(f"    {s['startTime'] - t0:6.1f} .. {s['endTime'] - t0:6.1f} s  {s['stepKey']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=ROOT / "examples" / "demo.yaml")
    ap.add_argument("--models-home", type=Path, default=ROOT / ".lorafoundry", help="where the base is built once")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--only", choices=["cli", "ui"], help="run one path (to check it; no ratio)")
    args = ap.parse_args()
    spec = args.spec.resolve()
    os.environ.update(OFFLINE)

    from lora_assets.base_model import resolve_base_model
    from lora_assets.spec import load_spec

    s = load_spec(spec)
    base = resolve_base_model(s.base_model, args.models_home, s.spec_dir)  # built once, outside the timings
    print(f"spec {spec.relative_to(ROOT) if spec.is_relative_to(ROOT) else spec}: base {s.base_model} at {base.path}")
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min average), {os.cpu_count()} CPUs")
    limited = model_steps(spec)
    times: dict[str, list[float]] = {"cli": [], "ui": []}
    for i in range(args.repeats):
        for kind in [args.only] if args.only else ("cli", "ui") if i % 2 == 0 else ("ui", "cli"):
            home = fresh_home(kind, args.models_home)
            if kind == "cli":
                times["cli"].append(run_cli(spec, home))
                print(f"  CLI run {i + 1}: {times['cli'][-1]:.1f} s; training {training_speeds(home)}")
                continue
            proc, url = start_dagster_dev(spec, home)
            try:
                wall, steps = run_ui(url)
            finally:
                stop(proc)
            times["ui"].append(wall)
            print(f"  UI run {i + 1}: {wall:.1f} s; training {training_speeds(home)}; steps (start .. end):")
            print_steps(steps)
            if clash := overlaps(steps, limited):
                raise SystemExit(f"model steps ran at once: {clash}")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.only:
        print(f"  {args.only}: {', '.join(f'{t:.1f}' for t in times[args.only])} s")
        return
    cli, ui = statistics.median(times["cli"]), statistics.median(times["ui"])
    print("whole graph without deployment, from a fresh home sharing the built base")
    print(f"  lorafoundry run --no-deploy:         {', '.join(f'{t:.1f}' for t in times['cli'])} s (median {cli:.1f})")
    print(f"  dagster dev, Materialize all (GQL):  {', '.join(f'{t:.1f}' for t in times['ui'])} s (median {ui:.1f})")
    print(f"  ratio UI/CLI: {ui / cli:.2f}x (goal <= 1.10x)")


if __name__ == "__main__":
    main()
