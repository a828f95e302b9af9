"""The `lorafoundry` command line: validate, run, serve, demo, and the registry commands."""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, ParamSpec

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lora_assets import envs
from lora_assets.home import Home  # stdlib only: every command resolves its home without torch or dagster
from orchestration import render
from registry.errors import (
    AdapterNotFoundError,
    RegistryBusyError,
    RegistryConflictError,
    RegistryCorruptError,
    RegistryError,
    RegistryFileError,
    RegistryInputError,
    RegistrySchemaError,
    RegistryUnavailableError,
)

if TYPE_CHECKING:  # the spec's models are built when a command reads a spec, not for --help or `registry`
    from lora_assets.spec import PipelineSpec

P = ParamSpec("P")

app = typer.Typer(
    help="lorafoundry: a YAML spec -> cleaned datasets -> one-epoch LoRA adapters -> a DuckDB "
    "registry -> a vLLM multi-LoRA server.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
registry_app = typer.Typer(help="Query and manage the adapter registry.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")


# Piped output is not squeezed to 80 columns, so tables stay one row per adapter in logs and tests.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


@app.callback()
def _environment() -> None:
    # Every LORAFOUNDRY_* variable is checked before any command runs: all refused values at once, exit 2.
    problems = envs.problems()
    if problems:
        for problem in problems:
            err.print(f"[red]error[/red] {escape(problem)}", highlight=False)
        raise typer.Exit(2)


HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home", help="State dir (datasets, adapters, registry). Default: $LORAFOUNDRY_HOME, else ./.lorafoundry."
    ),
]
SpecArg = Annotated[Path, typer.Argument(help="The pipeline spec (YAML).")]
RefArg = Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME:ALIAS.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON instead of a table.")]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Also print Dagster's event log (DEBUG included) as it happens; it always goes to "
        "<home>/logs/run-<run id>.log.",
    ),
]


def _home(home: Path | None) -> Path:
    """The home dir of every command: ``--home``, else the default; exit 1 when it, or a dir above it, is a file
    (a home there would hold nothing, and every write to it fails)."""
    h = (home or Home.at().root).resolve()
    existing = next((p for p in (h, *h.parents) if os.path.exists(p)), None)
    if existing is not None and not os.path.isdir(existing):
        _fail(
            f"home {h}: {'it' if existing == h else existing} is a file, not a directory. Fix: pass --home a "
            "directory (created if missing), or point LORAFOUNDRY_HOME at one."
        )
    return h


def _load(spec_path: Path) -> PipelineSpec:
    from lora_assets.spec import SpecError, load_spec

    try:
        return load_spec(spec_path)
    except SpecError as e:
        err.print(f"[red]invalid spec[/red] {escape(str(e))}", highlight=False)  # a spec's text is not markup
        raise typer.Exit(2) from None


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@app.command()
def validate(spec: SpecArg) -> None:
    """Check a spec without loading anything heavy; exit 2 listing every problem."""
    s = _load(spec)
    out.print(f"ok: {spec} — base {s.base_model}, {len(s.datasets)} dataset(s), {len(s.adapters)} adapter(s)")


def materialize_all(spec: PipelineSpec, home: Path, deploy: bool = True, verbose: bool = False) -> None:
    """Prepare the base model and check the spec against it, then materialize the whole asset graph in-process,
    recorded in the home's Dagster instance: one live row per asset on ``out``, every Dagster event in
    ``<home>/logs/run-<run id>.log`` (and on ``out`` too when ``verbose``)."""
    from lora_assets.pipeline import Pipeline
    from lora_assets.spec import SpecError
    from orchestration.assets import build_assets
    from orchestration.progress import RunLog, RunTracker, RunView, materialize_logged, rows_of_assets
    from orchestration.resources import resources_from_env

    assets = build_assets(spec, deployment=deploy)
    rows, steps, check_steps = rows_of_assets(assets)
    base_row = f"base model {spec.base_model}"
    view = RunView(out, RunTracker([(base_row, "phase"), *rows], steps, check_steps))
    log = RunLog(Home.at(home).logs, view, verbose=verbose)
    try:
        with view:
            with view.phase(base_row) as phase:
                pipe = Pipeline(spec, home)
                pipe.preflight()
                phase["headline"] = f"{pipe.base.parameters / 1e6:,.1f} M parameters" + (
                    f" in {pipe.base.path}" if spec.base_model.startswith("builtin:") else ""
                )
            with _dagster_instance(home) as instance:
                result = materialize_logged(assets, resources_from_env(home), instance, log)
    except SpecError as e:
        err.print(f"[red]invalid spec[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    finally:
        log.end()
    out.print(f"event log: {log.path}", highlight=False)
    if not result.success:
        failed = [r.name for r in view.tracker.rows() if r.status == "failed"]
        err.print(f"[red]run failed[/red]: {', '.join(failed) or 'see the event log'}", highlight=False)
        raise typer.Exit(1)


def _dagster_instance(home: Path):
    """The home's Dagster instance (created on first use, telemetry off), where the UI finds the CLI's runs."""
    import dagster as dg

    dagster_home = Home.at(home).dagster_home
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return dg.DagsterInstance.get()


def _summary_table(spec: PipelineSpec, home: Path) -> Table:
    from lora_assets.pipeline import Pipeline

    pipe = Pipeline(spec, home)
    table = Table(title="adapters (metric: base → adapter)")
    for col in ("adapter", "version", "status", *render.SUMMARY_METRICS):
        table.add_column(col)
    for rec in pipe.registry.list():
        if rec.name not in spec.adapters or rec.base_model_hash != pipe.base.content_hash:
            continue
        m = rec.metrics

        def cell(metric: str, m=m) -> str:  # versions registered before a metric existed lack it
            v = m.get(metric)
            return f"{v['base']:.3f} → {v['adapter']:.3f}" if v else "-"

        table.add_row(rec.name, str(rec.version), rec.status, *(cell(k) for k in render.SUMMARY_METRICS))
    return table


def _datasets(spec: PipelineSpec, wanted: list[str] | None) -> list[str]:
    """The datasets a command works on: ``wanted`` (exit 2 naming any the spec lacks), else all of the spec's."""
    unknown = sorted(set(wanted or []) - set(spec.datasets))
    if unknown:
        err.print(f"[red]unknown dataset(s) {unknown}[/red]; the spec declares {sorted(spec.datasets)}")
        raise typer.Exit(2)
    return wanted or list(spec.datasets)


@app.command()
def clean(
    spec: SpecArg,
    home: HomeOpt = None,
    dataset: Annotated[list[str] | None, typer.Option(help="Only this dataset (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON.")] = False,
) -> None:
    """Run only the cleaning stage and print each dataset's report."""
    from lora_assets.clean import CleanError
    from lora_assets.pipeline import Pipeline

    _offline()
    s = _load(spec)
    pipe = Pipeline(s, _home(home))
    for name in _datasets(s, dataset):
        try:
            report = pipe.clean(name)
        except CleanError as e:
            err.print(f"[red]cleaning {name} failed[/red]: {e}", highlight=False)
            raise typer.Exit(1) from None
        if as_json:
            render.json_lines([report], compact=True)
            continue
        out.print(render.clean_report_table(name, report))
        out.print(f"format: {report.format_reason}; fingerprint {report.fingerprint}", highlight=False)


@app.command()
def run(
    spec: SpecArg,
    home: HomeOpt = None,
    deploy: Annotated[
        bool,
        typer.Option(
            help="Also materialize serving/deployment: leave a vLLM server running "
            "with the registered adapters (stop it with `lorafoundry stop`)."
        ),
    ] = True,
    verbose: VerboseOpt = False,
) -> None:
    """Materialize everything: clean each dataset, train, evaluate and register each adapter, deploy vLLM."""
    from serving import deployment

    _offline()
    s = _load(spec)
    h = _home(home)
    t0 = time.time()
    materialize_all(s, h, deploy=deploy, verbose=verbose)
    out.print(_summary_table(s, h))
    state = deployment.current(h) if deploy else None
    if state:
        out.print(
            f"serving {', '.join(state['models'])} at {state['url']}/v1 (pid {state['pid']}); "
            f"stop it with `lorafoundry stop --home {h}`"
        )
    out.print(f"done in {time.time() - t0:.0f} s; state in {h}")


@app.command()
def stop(home: HomeOpt = None) -> None:
    """Stop what serves this home: the vLLM server (or, with serving.replicas > 1, the fleet) the serving/deployment
    asset left running, and a `lorafoundry serve` running in the foreground (with --replicas N: its router and every
    replica, by the PIDs it started)."""
    from serving import deployment

    h = _home(home)
    stopped = [what for what, done in (("the deployment", deployment.stop(h)),
                                       ("`lorafoundry serve`", deployment.stop_foreground(h))) if done]  # fmt: skip
    out.print(f"stopped {' and '.join(stopped)}" if stopped else f"nothing is serving {h}")


def start_server(spec: PipelineSpec, home: Path, port: int | None = None):
    """Start vLLM in the foreground with this spec's registered adapters; return (server, served names)."""
    from orchestration.progress import RunTracker, RunView
    from serving.launch import VLLMServer, plan_server

    plan = plan_server(spec, home, port)
    for line in plan.left_out:
        err.print(f"left out {line}", highlight=False, markup=False)
    err.print("starting: " + " ".join(plan.cmd), highlight=False, markup=False)
    server = VLLMServer(plan.cmd, plan.env, Home.at(home).logs / "vllm.log", plan.url).start()
    row = "vLLM start-up"
    with RunView(err, RunTracker([(row, "phase")], {}, set())) as view, view.phase(row) as phase:
        server.wait_ready(spec.serving.startup_timeout_s)  # reports each second waited to the view
        phase["headline"] = f"answering at {plan.url}/v1"
    return server, plan.names


@app.command()
def serve(
    spec: SpecArg,
    home: HomeOpt = None,
    port: Annotated[int | None, typer.Option(help="Port (default: serving.port in the spec).")] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar=envs.API_KEY.name,
            help="Require this client key (Authorization: Bearer) on every route but /health; passed "
            "to vLLM through its environment, never on the command line.",
        ),
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=64,
            help="vLLM replicas behind vllm-router, each on its share of the CPUs; the port is then the guard in "
            "front of them (default: serving.replicas in the spec, 1).",
        ),
    ] = None,
) -> None:
    """Serve the base model and each adapter name's champion (else latest candidate) until Ctrl-C or SIGTERM;
    other registered versions load on first use as NAME@VERSION or NAME:ALIAS."""
    from serving import deployment
    from serving.launch import ServerError

    _offline()
    if api_key:
        os.environ[envs.API_KEY.name] = api_key
    s = _load(spec)
    h = _home(home)
    if (replicas or s.serving.replicas) > 1:
        return _serve_fleet(s, h, port, replicas or s.serving.replicas)
    try:
        server, names = start_server(s, h, port)
    except ServerError as e:
        err.print(f"[red]vLLM failed to start[/red]\n{e}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    out.print(f"serving {', '.join(names)} at {server.url}/v1 (OpenAI-compatible); Ctrl-C stops")
    with deployment.foreground(h, server.url, 1):
        _serve_until_signal(server)
    out.print("stopped")


def _serve_fleet(spec: PipelineSpec, home: Path, port: int | None, replicas: int) -> None:
    """`serve --replicas N`: N vLLM replicas and vllm-router on loopback, the guard on the public port
    (serving/fleet_serve.py), until Ctrl-C or SIGTERM; a replica that dies is restarted."""
    from serving import deployment, fleet_serve
    from serving.launch import ServerError, plan_server

    plan = plan_server(spec, home, port)
    for line in plan.left_out:
        err.print(f"left out {line}", highlight=False, markup=False)
    port = port or spec.serving.port
    url = f"http://{spec.serving.host}:{port}"

    def listening(fleet) -> None:
        out.print(
            f"serving {', '.join(plan.names)} at {url}/v1 (OpenAI-compatible; {replicas} replicas behind "
            f"vllm-router at {fleet.router_url}); Ctrl-C stops"
        )

    err.print(f"starting {replicas} replicas: " + " ".join(plan.cmd), highlight=False, markup=False)
    try:
        fleet_serve.run(
            plan, replicas, spec.serving.router_policy, (spec.serving.host, port), Home.at(home).logs,
            spec.serving.startup_timeout_s, listening, deployment.foreground(home, url, replicas),
        )  # fmt: skip
    except ServerError as e:
        err.print(f"[red]vLLM failed to start[/red]\n{e}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    out.print("stopped")


def _serve_until_signal(server) -> None:
    """Wait for SIGINT, SIGTERM or SIGHUP, then stop ``server``; exit 1 with its log's tail if it dies first."""
    stopping = {"sig": None}

    def on_signal(signum, frame):  # installed explicitly: we may have been started with these ignored
        stopping["sig"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    while stopping["sig"] is None:
        code = server.proc.poll()
        if code is not None:
            err.print(f"[red]vLLM exited unexpectedly with code {code}[/red]. Last log lines:\n{server.log_tail()}")
            server.stop()  # its engine and worker processes go too
            raise typer.Exit(1)
        time.sleep(0.5)
    server.stop()


@app.command()
def demo(
    home: HomeOpt = None,
    port: Annotated[int | None, typer.Option(help="Port for the demo server (default: the spec's).")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the embedded demo end to end: train, deploy, ask each adapter and the base one question, stop."""
    from orchestration.definitions import DEMO_SPEC
    from serving import deployment

    _offline()
    s = _load(DEMO_SPEC)
    if port:
        s = s.model_copy(update={"serving": s.serving.model_copy(update={"port": port})})
    h = _home(home)
    t0 = time.time()
    try:
        materialize_all(s, h, verbose=verbose)
        state = deployment.current(h)
        if state is None:
            err.print("[red]the deployment is not answering[/red]; see " + str(Home.at(h).logs))
            raise typer.Exit(1)
        out.print(_ask_each_adapter(s, h, state))
        out.print(_summary_table(s, h))
    finally:
        deployment.stop(h)
    out.print(f"demo done in {time.time() - t0:.0f} s (server stopped); state in {h}")


def _ask_each_adapter(spec: PipelineSpec, home: Path, state: dict) -> Table:
    """Ask each served adapter and the base one held-out question of the adapter's eval set; the answers as a
    table."""
    from openai import OpenAI

    from lora_assets.evaluate import load_eval
    from lora_assets.pipeline import Pipeline

    client = OpenAI(base_url=f"{state['url']}/v1", api_key="not-needed")
    answers = Table(title=f"one held-out question per adapter, asked at {state['url']}/v1")
    for col in ("adapter", "question", "reference", "adapter answer", f"base ({spec.served_base_name}) answer"):
        answers.add_column(col, overflow="fold")
    pipe = Pipeline(spec, home)
    for name in state["models"][1:]:
        sample = load_eval(pipe.adapter_dir(name)).samples[0]
        msgs = [{"role": "user", "content": sample["prompt"]}]
        got = {
            m: client.chat.completions.create(model=m, messages=msgs, max_tokens=32, temperature=0)
            .choices[0]
            .message.content
            for m in (name, spec.served_base_name)
        }
        answers.add_row(name, sample["prompt"], sample["reference"], got[name], got[spec.served_base_name])
    return answers


def _bounds(values: list[str] | None, option: str) -> dict[str, float]:
    bounds = {}
    for v in values or []:
        metric, sep, bound = v.partition("=")
        try:
            bounds[metric] = float(bound)
        except ValueError:
            sep = ""
        if not sep:
            err.print(f"{option} {v!r}: expected METRIC=NUMBER, e.g. {option} exact_match=0.5")
            raise typer.Exit(2)
    return bounds


# -- registry commands: errors become exit codes in one place ------------------------------------------------------

#: The exit code of each error a registry command reports, by type: an error takes the entry of the nearest class in
#: its MRO (never its message), so a registry error added later gets its parent's code until it has its own; a DuckDB
#: error counts as an OSError (see :func:`_exit_code`). Anything else is a bug and keeps its traceback. Every entry
#: is 1 today: the docs and scripts rely on "every registry error is one message on stderr and exit 1".
EXIT_CODES: dict[type[BaseException], int] = {
    RegistryError: 1,
    RegistryInputError: 1,
    AdapterNotFoundError: 1,
    RegistryConflictError: 1,
    RegistryBusyError: 1,
    RegistryFileError: 1,
    RegistryCorruptError: 1,
    RegistrySchemaError: 1,
    RegistryUnavailableError: 1,
    OSError: 1,
}


def _exit_code(error: BaseException) -> int | None:
    """The exit code of ``error`` from :data:`EXIT_CODES`, or None for an error the CLI does not report."""
    import duckdb  # loaded already by the registry that raised; the CLI itself starts without it

    if isinstance(error, duckdb.Error):
        error_type: type[BaseException] = OSError  # the registry's file, read by DuckDB, failed
    else:
        error_type = type(error)
    return next((EXIT_CODES[c] for c in error_type.__mro__ if c in EXIT_CODES), None)


def _fail(e: Exception | str, code: int = 1) -> NoReturn:
    err.print(f"[red]error[/red] {escape(str(e))}", highlight=False)
    raise typer.Exit(code) from None


def registry_command(name: str) -> Callable[[Callable[P, None]], Callable[P, None]]:
    """Declare the `registry NAME` command; the errors it raises become a message and an exit code by
    :data:`EXIT_CODES`, never a traceback."""

    def declare(fn: Callable[P, None]) -> Callable[P, None]:
        @functools.wraps(fn)
        def command(*args: P.args, **kwargs: P.kwargs) -> None:
            try:
                fn(*args, **kwargs)
            except Exception as e:
                code = _exit_code(e)
                if code is None:
                    raise
                _fail(e, code)

        return registry_app.command(name)(command)

    return declare


def _registry(home: Path | None, actor: str = "cli"):
    """The registry of ``home`` (or the file named by LORAFOUNDRY_REGISTRY)."""

    return Home.at(_home(home)).open_registry(actor=actor)


def _show(items: list, as_json: bool, table: Callable[[], Table], compact: bool = False) -> None:
    """Print ``items`` as JSON lines, or as the table ``table()`` builds."""
    if as_json:
        render.json_lines(items, compact=compact)
    else:
        out.print(table())


@registry_command("list")
def registry_list(
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    name: Annotated[str | None, typer.Option(help="Only this adapter name.")] = None,
    status: Annotated[str | None, typer.Option(help="Only this status.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Only adapters of this base model.")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Only adapters trained on this dataset (alone or in a mixture).")
    ] = None,
    min_metric: Annotated[
        list[str] | None, typer.Option("--min", help="METRIC=VALUE: adapter's metric at least VALUE (repeatable).")
    ] = None,
    max_metric: Annotated[
        list[str] | None, typer.Option("--max", help="METRIC=VALUE: adapter's metric at most VALUE (repeatable).")
    ] = None,
    order_by: Annotated[str | None, typer.Option(help="Order by this metric (adapter's value).")] = None,
    desc: Annotated[bool, typer.Option(help="Descending order (with --order-by).")] = False,
    limit: Annotated[int | None, typer.Option(help="At most this many rows.")] = None,
) -> None:
    """List registered adapter versions, filtered and ordered."""
    records = _registry(home).list(
        name=name,
        status=status,
        base_model=base_model,
        dataset=dataset,
        min_metric=_bounds(min_metric, "--min"),
        max_metric=_bounds(max_metric, "--max"),
        order_by=order_by,
        descending=desc,
        limit=limit,
    )
    _show(records, as_json, lambda: render.records_table(records))


@registry_command("leaderboard")
def registry_leaderboard(
    name: Annotated[str, typer.Argument(help="Adapter (or sweep) name.")],
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    across_seeds: Annotated[
        bool,
        typer.Option("--across-seeds", help="Group sweep points that differ only in seed: mean and 95% CI per point."),
    ] = False,
) -> None:
    """Versions of NAME ranked by their gate metric (eval_loss without a gate), best first; the winner marked."""
    from registry import leaderboard

    rows = _registry(home).leaderboard(name)
    if not rows:
        raise AdapterNotFoundError(
            f"no adapter {name!r} in the registry. Fix: `lorafoundry registry list` shows the names."
        )
    if across_seeds:
        groups = leaderboard.across_seeds(rows)
        _show(groups, as_json, lambda: render.seeds_table(name, groups))
    else:
        _show(rows, as_json, lambda: render.leaderboard_table(name, rows))


@registry_command("promote")
def registry_promote(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    version: Annotated[int, typer.Argument(help="The version to make champion.")],
    home: HomeOpt = None,
    notify: Annotated[
        str | None,
        typer.Option(
            help="URL of a running server (e.g. http://127.0.0.1:8000) to reload NAME with this version "
            "without a restart; needs LORAFOUNDRY_ADMIN_KEY."
        ),
    ] = None,
) -> None:
    """Make NAME@VERSION the champion (served under the plain name); the previous champion becomes a candidate."""
    from serving.launch import ServerError
    from serving.notify import notify_promotion

    rec = _registry(home).promote(name, version)
    out.print(f"{rec.name}@{rec.version} is now {rec.status}")
    if notify:
        try:
            notify_promotion(notify, rec.name, rec.path)
        except ServerError as e:
            _fail(f"promoted in the registry, but the server was not updated: {e}")
        out.print(f"{notify} now serves {rec.name} as version {rec.version}")


@registry_command("show")
def registry_show(ref: RefArg, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """One version with its metrics, training config, lineage and the name's aliases."""
    reg = _registry(home)
    rec = reg.get(ref)
    aliases = reg.aliases(rec.name)
    _show([rec.model_dump(mode="json") | {"aliases": aliases}], as_json, lambda: render.record_table(rec, aliases))


def _base_hash(base_model: str, home: Path) -> str | None:
    """The content hash of ``base_model`` when it is on this machine; else None, with a note on what that means."""
    from lora_assets.base_model import resolve_base_model

    try:
        return resolve_base_model(base_model, home).content_hash
    except Exception as e:  # not on this machine, or not loadable: register anyway, say what it means
        err.print(
            f"[yellow]note[/yellow]: base model {base_model!r}: {e}\nRegistered without the base's hash, so no "
            "server will load it. Fix: register again with --base-model set to the local model dir.",
            highlight=False,
        )
        return None


@registry_command("register")
def registry_register(
    adapter_dir: Annotated[
        Path, typer.Argument(help="A peft LoRA adapter dir (adapter_config.json + adapter_model.safetensors).")
    ],
    name: Annotated[str, typer.Option("--name", help="Name to register it under.")],
    base_model: Annotated[
        str | None,
        typer.Option(
            help="Base model: a local model dir, a builtin: "
            "name (builtin:smollm2-135m-instruct, builtin:tiny) or a hub id "
            "(default: base_model_name_or_path in adapter_config.json)."
        ),
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset it was trained on (lineage).")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Bring in an adapter trained elsewhere, as a candidate (idempotent: the same files give the same version).

    The files are copied under <home>/adapters/imported/ (the server reads adapters only from <home>/adapters), and
    the base model's content hash is recorded when the base is on this machine (a local dir, a builtin: model, or the
    Hugging Face cache), which is what lets the server load it. Files the server could not serve are refused, naming
    the file and the fix: not a peft LoRA dir, pickled weights, a safetensors header that does not parse, tensors that
    do not fit the config or the base, weights that hold NaN or infinity.
    """
    from registry.portable import external_adapter, register_copy

    _offline()
    h = _home(home)
    new = external_adapter(adapter_dir, name, base_model=base_model, dataset=dataset)
    new = new.model_copy(update={"base_model_hash": _base_hash(new.base_model, h)})
    rec = register_copy(_registry(home), new, Home.at(h).adapters, Home.at(h).imported)
    if as_json:
        render.json_lines([rec])
    else:
        out.print(
            f"registered {rec.name}@{rec.version} ({rec.status}), sha256 {rec.adapter_sha256[:12]}, files in {rec.path}"
        )


@registry_command("archive")
def registry_archive(ref: Annotated[str, typer.Argument(help="NAME@VERSION to retire.")], home: HomeOpt = None) -> None:
    """Retire a version: status archived, never served again; its aliases are removed (history kept)."""
    from registry.rules import parse_versioned_ref

    rec = _registry(home).archive(*parse_versioned_ref(ref))
    out.print(f"{rec.name}@{rec.version} is now {rec.status}")


@registry_command("alias")
def registry_alias(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION the alias should point at.")],
    alias: Annotated[str, typer.Argument(help="Alias, e.g. prod or staging.")],
    home: HomeOpt = None,
) -> None:
    """Point NAME:ALIAS at a version (the move is kept in alias_history)."""
    from registry.rules import parse_versioned_ref

    name, version = parse_versioned_ref(ref)
    _registry(home).set_alias(name, alias, version)
    out.print(f"{name}:{alias} → v{version}")


@registry_command("verify")
def registry_verify(
    name: Annotated[str | None, typer.Argument(help="Only this name (or NAME@VERSION).")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompute every adapter's sha256; exit 1 if any files changed after registration. Also removes what
    registers killed mid-copy left under <home>/adapters/imported (only when no register is at work, and only for the
    home's own registry file)."""
    from registry.portable import remove_orphans
    from registry.rules import parse_ref

    n, v, _ = parse_ref(name) if name else (None, None, None)
    reg = _registry(home)
    removed = remove_orphans(reg, Home.at(_home(home)).imported)
    results = reg.verify(n, v)
    for d in removed:
        err.print(f"removed {d} (left by an interrupted register or import)", highlight=False)
    _show(results, as_json, lambda: render.verify_table(results), compact=True)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@registry_command("card")
def registry_card(ref: RefArg, home: HomeOpt = None) -> None:
    """Write a Hugging Face model card (README.md with YAML front matter) into the adapter dir."""
    from registry.card import write_card

    path = write_card(_registry(home).get(ref))
    out.print(f"wrote {path}")


@registry_command("sql")
def registry_sql(
    query: Annotated[str, typer.Argument(help="A read-only SQL statement.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Stop the query after this many seconds.")] = 30.0,
    memory_limit: Annotated[
        str, typer.Option("--memory-limit", help="The most memory the query may use, e.g. 512MB or 4GiB.")
    ] = "1GiB",
) -> None:
    """Run a read-only SQL query on the registry (tables adapters, aliases, alias_history, events; views
    latest_adapters, champions, leaderboard). It can read nothing else: no files, no other databases, no settings;
    it stops at its time and memory limits (exit 1, naming the limit)."""
    cols, rows = _registry(home).query(query, timeout_s=timeout, memory_limit=memory_limit)
    _show([dict(zip(cols, r, strict=True)) for r in rows], as_json, lambda: render.rows_table(cols, rows))


@registry_command("export")
def registry_export(
    out_dir: Annotated[Path, typer.Argument(help="A new (or empty) dir.")], home: HomeOpt = None
) -> None:
    """Write a portable copy: every table as parquet plus the adapter dirs."""
    from registry.portable import export_registry

    counts = export_registry(_registry(home), out_dir)
    out.print(f"exported to {out_dir}: " + ", ".join(f"{t} {n}" for t, n in counts.items()))


@registry_command("import")
def registry_import(
    src: Annotated[Path, typer.Argument(help="A dir written by `registry export`.")], home: HomeOpt = None
) -> None:
    """Bring an exported registry in (adapter dirs copied under <home>/adapters/imported, hashes checked)."""
    from registry.portable import import_registry

    counts = import_registry(_registry(home, actor="import"), src, Home.at(_home(home)).imported)
    out.print(f"imported from {src}: " + ", ".join(f"{t} {n}" for t, n in counts.items()))


@registry_command("migrate")
def registry_migrate(
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="The shared registry: postgresql://USER@HOST:PORT/DATABASE; its password in PGPASSWORD or "
            "PGPASSFILE, never in the URL.",
        ),
    ],
    artifacts: Annotated[
        str | None, typer.Option(help="The adapter store: s3://BUCKET/PREFIX. Default: $LORAFOUNDRY_ARTIFACTS.")
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Copy this home's registry file into a shared registry (docs/scale-out.md): every version, its aliases and
    their history, its events, and its weights (put in the adapter store); then every sha256 is checked there,
    reading the stored objects back. What is there already is skipped: running it again adds nothing."""
    from registry.portable import migrate_registry
    from registry.store import AdapterRegistry

    h = Home.at(_home(home))
    if not h.registry_file.is_file():
        raise RegistryInputError(f"no registry file at {h.registry_file}. Fix: pass the --home that holds it.")
    src = AdapterRegistry(h.registry_file, actor="migrate")
    dest = AdapterRegistry(to, actor="migrate", store=artifacts or h.store)
    counts = migrate_registry(src, dest)
    added = ", ".join(f"{t} {n}" for t, n in counts.items() if t != "verified")
    out.print(f"migrated {src.shown} to {dest.shown}: added {added}; {counts['verified']} versions verified there")


@registry_command("export-merged")
def registry_export_merged(
    ref: RefArg,
    out_dir: Annotated[Path, typer.Argument(help="A new (or empty) dir for the merged model.")],
    home: HomeOpt = None,
    dtype: Annotated[str, typer.Option(help="Weights dtype: bfloat16, float16 or float32.")] = "bfloat16",
) -> None:
    """Merge one version into its base (peft merge_and_unload): a complete Hugging Face model dir with tokenizer,
    chat template and a model card carrying the lineage, usable as a `base_model` or as `vllm serve OUT_DIR`.
    The adapter's sha256 and its base's hash are checked first; the export is recorded as an event on the
    version. This is how a DoRA adapter is served."""
    from lora_assets.export import ExportError, export_merged

    _offline()
    reg = _registry(home)
    rec = reg.get(ref)
    try:
        done = export_merged(rec, _home(home), out_dir, dtype=dtype, progress=lambda line: err.print(line))
    except ExportError as e:
        _fail(e)
    reg.record_event(
        rec.name,
        rec.version,
        "export_merged",
        {"out_dir": str(done.path), "dtype": done.dtype, "weights_sha256": done.weights_sha256},
    )
    out.print(f"{done.ref} merged into {rec.base_model} ({done.dtype}): {done.path}", highlight=False)


if __name__ == "__main__":
    app()
