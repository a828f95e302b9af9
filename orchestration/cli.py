"""The `lorafoundry` command line: validate, run, serve, demo, and the registry commands."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lora_assets.spec import PipelineSpec, SpecError, load_spec

app = typer.Typer(help="lorafoundry: a YAML spec -> cleaned datasets -> one-epoch LoRA adapters -> a DuckDB "
                  "registry -> a vLLM multi-LoRA server.", no_args_is_help=True, pretty_exceptions_enable=False)
registry_app = typer.Typer(help="Query and manage the adapter registry.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")

# Piped output is not squeezed to 80 columns, so tables stay one row per adapter in logs and tests.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

HomeOpt = Annotated[Path | None, typer.Option(
    "--home", help="State dir (datasets, adapters, registry). Default: $LORAFOUNDRY_HOME, else ./.lorafoundry.")]
SpecArg = Annotated[Path, typer.Argument(help="The pipeline spec (YAML).")]


def _home(home: Path | None) -> Path:
    from lora_assets.pipeline import default_home

    return (home or default_home()).resolve()


def _load(spec_path: Path) -> PipelineSpec:
    try:
        return load_spec(spec_path)
    except SpecError as e:
        err.print(f"[red]invalid spec[/red] {e}", highlight=False, markup=True)
        raise typer.Exit(2) from None


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@app.command()
def validate(spec: SpecArg) -> None:
    """Check a spec without loading anything heavy; exit 2 listing every problem."""
    s = _load(spec)
    out.print(f"ok: {spec} — base {s.base_model}, {len(s.datasets)} dataset(s), {len(s.adapters)} adapter(s)")


def materialize_all(spec: PipelineSpec, home: Path, deploy: bool = True) -> None:
    """Check the spec against the base model, then materialize the whole asset graph in-process, recorded in the
    home's Dagster instance."""
    import dagster as dg

    from lora_assets.pipeline import Pipeline
    from orchestration.assets import LoraFoundryHome, build_assets

    try:
        Pipeline(spec, home).preflight()
    except SpecError as e:
        err.print(f"[red]invalid spec[/red] {e}", highlight=False)
        raise typer.Exit(2) from None

    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(build_assets(spec, deployment=deploy),
                                resources={"lorafoundry": LoraFoundryHome(home=str(home))},
                                instance=instance, raise_on_error=False)
    if not result.success:
        failed = [e.step_key for e in result.all_events if e.is_step_failure]
        err.print(f"[red]run failed[/red] in {failed}; see the log above.")
        raise typer.Exit(1)


def _summary_table(spec: PipelineSpec, home: Path) -> Table:
    from lora_assets.pipeline import Pipeline

    pipe = Pipeline(spec, home)
    table = Table(title="adapters (metric: base → adapter)")
    for col in ("adapter", "version", "status", "exact_match", "eval_loss"):
        table.add_column(col)
    for rec in pipe.registry.list():
        if rec.name not in spec.adapters or rec.base_model_hash != pipe.base.content_hash:
            continue
        m = rec.metrics
        table.add_row(rec.name, str(rec.version), rec.status,
                      f"{m['exact_match']['base']:.3f} → {m['exact_match']['adapter']:.3f}",
                      f"{m['eval_loss']['base']:.3f} → {m['eval_loss']['adapter']:.3f}")
    return table


@app.command()
def clean(spec: SpecArg, home: HomeOpt = None,
          dataset: Annotated[list[str] | None, typer.Option(help="Only this dataset (repeatable).")] = None,
          as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON.")] = False) -> None:
    """Run only the cleaning stage and print each dataset's report."""
    from lora_assets.clean import CleanError
    from lora_assets.pipeline import Pipeline

    _offline()
    s = _load(spec)
    unknown = sorted(set(dataset or []) - set(s.datasets))
    if unknown:
        err.print(f"[red]unknown dataset(s) {unknown}[/red]; the spec declares {sorted(s.datasets)}")
        raise typer.Exit(2)
    pipe = Pipeline(s, _home(home))
    for name in dataset or list(s.datasets):
        try:
            report = pipe.clean(name)
        except CleanError as e:
            err.print(f"[red]cleaning {name} failed[/red]: {e}", highlight=False)
            raise typer.Exit(1) from None
        if as_json:
            sys.stdout.write(report.model_dump_json() + "\n")
            continue
        table = Table(title=f"dataset {name} ({report.detected_format}) → {report.output_dir}")
        table.add_column("count")
        table.add_column("rows", justify="right")
        for label, value in (("in", report.rows_in), ("train", report.rows_train), ("eval", report.rows_eval),
                             ("quarantined", report.rows_quarantined),
                             ("moved eval → train (leakage)", report.leakage_moved_to_train)):
            table.add_row(label, str(value))
        for reason, n in report.by_reason.items():
            table.add_row(f"  quarantined: {reason}", str(n))
        for kind, n in report.pii_redactions.items():
            table.add_row(f"  redacted: {kind}", str(n))
        out.print(table)
        out.print(f"format: {report.format_reason}; fingerprint {report.fingerprint}", highlight=False)


@app.command()
def run(spec: SpecArg, home: HomeOpt = None,
        deploy: Annotated[bool, typer.Option(help="Also materialize serving/deployment: leave a vLLM server running "
                                             "with the registered adapters (stop it with `lorafoundry stop`).")] = True,
        ) -> None:
    """Materialize everything: clean each dataset, train, evaluate and register each adapter, deploy vLLM."""
    from serving import deployment

    _offline()
    s = _load(spec)
    h = _home(home)
    t0 = time.time()
    materialize_all(s, h, deploy=deploy)
    out.print(_summary_table(s, h))
    state = deployment.current(h) if deploy else None
    if state:
        out.print(f"serving {', '.join(state['models'])} at {state['url']}/v1 (pid {state['pid']}); "
                  f"stop it with `lorafoundry stop --home {h}`")
    out.print(f"done in {time.time() - t0:.0f} s; state in {h}")


@app.command()
def stop(home: HomeOpt = None) -> None:
    """Stop the vLLM server that the serving/deployment asset left running for this home."""
    from serving import deployment

    h = _home(home)
    out.print("stopped the deployment" if deployment.stop(h) else f"no deployment is running for {h}")


def start_server(spec: PipelineSpec, home: Path, port: int | None = None):
    """Start vLLM in the foreground with this spec's registered adapters; return (server, served names)."""
    from serving.launch import VLLMServer, plan_server

    cmd, env, url, names = plan_server(spec, home, port)
    err.print("starting: " + " ".join(cmd), highlight=False, markup=False)
    server = VLLMServer(cmd, env, home / "logs" / "vllm.log", url).start()
    with err.status("waiting for vLLM to answer on /v1/models …") as status:
        server.wait_ready(spec.serving.startup_timeout_s,
                          on_wait=lambda s: status.update(f"waiting for vLLM to answer on /v1/models … {s:.0f} s"))
    return server, names


@app.command()
def serve(spec: SpecArg, home: HomeOpt = None,
          port: Annotated[int | None, typer.Option(help="Port (default: serving.port in the spec).")] = None) -> None:
    """Serve the base model and each adapter name's champion (else latest candidate) until Ctrl-C or SIGTERM."""
    from serving.launch import ServerError

    _offline()
    s = _load(spec)
    h = _home(home)
    try:
        server, names = start_server(s, h, port)
    except ServerError as e:
        err.print(f"[red]vLLM failed to start[/red]\n{e}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    stopping = {"sig": None}

    def on_signal(signum, frame):  # installed explicitly: we may have been started with these ignored
        stopping["sig"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    out.print(f"serving {', '.join(names)} at {server.url}/v1 (OpenAI-compatible); Ctrl-C stops")
    while stopping["sig"] is None:
        code = server.proc.poll()
        if code is not None:
            err.print(f"[red]vLLM exited unexpectedly with code {code}[/red]. Last log lines:\n{server.log_tail()}")
            raise typer.Exit(1)
        time.sleep(0.5)
    server.stop()
    out.print("stopped")


@app.command()
def demo(home: HomeOpt = None,
         port: Annotated[int | None, typer.Option(help="Port for the demo server (default: the spec's).")] = None
         ) -> None:
    """Run the embedded demo end to end: train, deploy, ask each adapter and the base one question, stop."""
    from openai import OpenAI

    from lora_assets.evaluate import load_eval
    from lora_assets.pipeline import Pipeline
    from orchestration.definitions import DEMO_SPEC
    from serving import deployment

    _offline()
    s = _load(DEMO_SPEC)
    if port:
        s = s.model_copy(update={"serving": s.serving.model_copy(update={"port": port})})
    h = _home(home)
    t0 = time.time()
    try:
        materialize_all(s, h)
        state = deployment.current(h)
        if state is None:
            err.print("[red]the deployment is not answering[/red]; see " + str(h / "logs"))
            raise typer.Exit(1)
        client = OpenAI(base_url=f"{state['url']}/v1", api_key="not-needed")
        answers = Table(title=f"one held-out question per adapter, asked at {state['url']}/v1")
        for col in ("adapter", "question", "reference", "adapter answer", f"base ({s.served_base_name}) answer"):
            answers.add_column(col, overflow="fold")
        pipe = Pipeline(s, h)
        for name in state["models"][1:]:
            sample = load_eval(pipe.adapter_dir(name)).samples[0]
            msgs = [{"role": "user", "content": sample["prompt"]}]
            got = {m: client.chat.completions.create(model=m, messages=msgs, max_tokens=32, temperature=0)
                   .choices[0].message.content for m in (name, s.served_base_name)}
            answers.add_row(name, sample["prompt"], sample["reference"], got[name], got[s.served_base_name])
        out.print(answers)
        out.print(_summary_table(s, h))
    finally:
        deployment.stop(h)
    out.print(f"demo done in {time.time() - t0:.0f} s (server stopped); state in {h}")


@registry_app.command("list")
def registry_list(home: HomeOpt = None,
                  as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
                  name: Annotated[str | None, typer.Option(help="Only this adapter name.")] = None,
                  status: Annotated[str | None, typer.Option(help="Only this status.")] = None) -> None:
    """List registered adapter versions."""
    from registry.store import AdapterRegistry

    records = AdapterRegistry(_home(home) / "registry.duckdb").list(name=name, status=status)
    if as_json:
        for r in records:
            sys.stdout.write(json.dumps(r.model_dump(mode="json")) + "\n")
        return
    table = Table(title=f"{len(records)} adapter version(s)")
    for col in ("name", "version", "status", "method", "r", "alpha", "exact_match", "sha256", "created"):
        table.add_column(col)
    for r in records:
        em = r.metrics.get("exact_match", {})
        table.add_row(r.name, str(r.version), r.status, r.method, str(r.r), str(r.lora_alpha),
                      f"{em.get('base', float('nan')):.3f} → {em.get('adapter', float('nan')):.3f}",
                      r.adapter_sha256[:12], r.created_at.strftime("%Y-%m-%d %H:%M"))
    out.print(table)


@registry_app.command("leaderboard")
def registry_leaderboard(
        name: Annotated[str, typer.Argument(help="Adapter (or sweep) name.")], home: HomeOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
        across_seeds: Annotated[bool, typer.Option(
            "--across-seeds", help="Group sweep points that differ only in seed: mean and 95% CI per point.")] = False,
) -> None:
    """Versions of NAME ranked by their gate metric (eval_loss without a gate), best first; the winner marked."""
    from registry import leaderboard
    from registry.store import AdapterRegistry

    rows = AdapterRegistry(_home(home) / "registry.duckdb").leaderboard(name)
    if not rows:
        err.print(f"no adapter {name!r} in the registry. Fix: `lorafoundry registry list` shows the names.")
        raise typer.Exit(1)
    if across_seeds:
        groups = leaderboard.across_seeds(rows)
        if as_json:
            for g in groups:
                sys.stdout.write(json.dumps(g, default=str) + "\n")
            return
        table = Table(title=f"{name}: {groups[0]['metric']} per sweep point across seeds (mean, 95% t CI)")
        for col in ("rank", "point", "seeds", "mean", "95% CI", "trainable params"):
            table.add_column(col)
        for i, g in enumerate(groups, 1):
            table.add_row(str(i), g["label"], str(g["seeds"]), f"{g['mean']:.4f}",
                          f"[{g['ci_low']:.4f}, {g['ci_high']:.4f}]", f"{g['trainable_params'] or 0:,}")
        out.print(table)
        return
    if as_json:
        for r in rows:
            sys.stdout.write(json.dumps(r, default=str) + "\n")
        return
    table = Table(title=f"{name}: versions ranked by {rows[0]['rank_metric']}")
    for col in ("rank", "version", "point", rows[0]["rank_metric"], "status", "trainable params", "train s",
                "peak MB"):
        table.add_column(col)
    for r in rows:
        winner = r["rank"] == 1 and r["status"] in ("candidate", "champion")
        point = json.loads(r["sweep_point"]) if isinstance(r["sweep_point"], str) else r["sweep_point"]
        table.add_row(f"{r['rank']}{' winner' if winner else ''}", str(r["version"]),
                      leaderboard.point_label(point or {}),
                      "" if r["metric_value"] is None else f"{r['metric_value']:.4f}", r["status"],
                      f"{r['trainable_params'] or 0:,}", f"{r['train_wall_s'] or 0:.1f}",
                      f"{r['peak_memory_mb'] or 0:.0f}")
    out.print(table)


@registry_app.command("promote")
def registry_promote(name: Annotated[str, typer.Argument(help="Adapter name.")],
                     version: Annotated[int, typer.Argument(help="The version to make champion.")],
                     home: HomeOpt = None) -> None:
    """Make NAME@VERSION the champion (served under the plain name); the previous champion becomes a candidate."""
    from registry.store import AdapterRegistry, RegistryError

    try:
        rec = AdapterRegistry(_home(home) / "registry.duckdb", actor="cli").promote(name, version)
    except RegistryError as e:
        err.print(str(e), highlight=False)
        raise typer.Exit(1) from None
    out.print(f"{rec.name}@{rec.version} is now {rec.status}")


if __name__ == "__main__":
    app()
