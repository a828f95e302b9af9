"""`lorafoundry run`'s progress view: events -> rows -> lines without a terminal, and the real command in a pipe (no
Dagster DEBUG stream, no control characters, each asset named, the full event log in a file)."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from lora_assets import progress
from lora_assets.progress import ProgressReport
from lora_assets.spec import load_spec
from orchestration import metadata_keys as mk
from orchestration.assets import build_assets
from orchestration.progress import (
    RunEvent,
    RunTracker,
    RunView,
    _error_line,
    eta_seconds,
    headline,
    plain_line,
    progress_text,
    render,
    row_detail,
    rows_of_assets,
)

ANSI = re.compile(r"\x1b[\[\]()]")

ROWS = [
    ("base model builtin:tiny", "phase"),
    ("dataset/d/clean", "clean"),
    ("adapter/a/train", "train"),
    ("adapter/a/register", "register"),
    ("serving/deployment", "deployment"),
]
STEPS = {
    "dataset__d__clean": "dataset/d/clean",
    "dataset__d__clean_min_train_rows": "dataset/d/clean",
    "dataset__d__clean_no_duplicates_left": "dataset/d/clean",
    "adapter__a__train": "adapter/a/train",
    "adapter__a__register": "adapter/a/register",
    "adapter__a__register_quality_gate": "adapter/a/register",
    "serving__deployment": "serving/deployment",
}
CHECK_STEPS = {"dataset__d__clean_min_train_rows", "dataset__d__clean_no_duplicates_left"}
CHECK_STEPS |= {"adapter__a__register_quality_gate"}


def tracker() -> RunTracker:
    return RunTracker(ROWS, STEPS, CHECK_STEPS)


def row(t: RunTracker, name: str):
    return next(r for r in t.rows() if r.name == name)


def clean_metadata() -> dict:
    return {mk.CLEAN_ROWS_TRAIN: 1800, mk.CLEAN_ROWS_EVAL: 200, mk.CLEAN_ROWS_QUARANTINED: 21, mk.CLEAN_ROWS_IN: 2021}


def test_row_ends_when_its_last_step_ends():
    t = tracker()
    events = [
        RunEvent("start", "dataset__d__clean", 100.0),
        RunEvent("materialized", "dataset__d__clean", 100.5, metadata=clean_metadata()),
        RunEvent("success", "dataset__d__clean", 101.0),
        RunEvent("start", "dataset__d__clean_min_train_rows", 101.1),
        RunEvent("check", "dataset__d__clean_min_train_rows", 101.2, check="min_train_rows", detail="1800 rows"),
        RunEvent("success", "dataset__d__clean_min_train_rows", 101.3),
        RunEvent("start", "dataset__d__clean_no_duplicates_left", 101.4),
        RunEvent("check", "dataset__d__clean_no_duplicates_left", 101.5, check="no_duplicates_left"),
    ]
    for e in events:
        assert t.apply(e) == []
    (ended,) = t.apply(RunEvent("success", "dataset__d__clean_no_duplicates_left", 102.0))
    assert ended.status == "done" and ended.started == 100.0 and ended.finished == 102.0
    line = plain_line(ended, now=200.0, name_width=20)
    assert line.startswith("done    dataset/d/clean ")
    assert "2.0 s" in line
    assert "2,000 rows kept (1,800 train, 200 eval), 21 quarantined; 2 checks passed" in line


def test_blocking_check_failure_shows_its_reason_and_downstream_is_skipped():
    t = tracker()
    t.apply(RunEvent("start", "adapter__a__register", 10.0))
    t.apply(
        RunEvent(
            "materialized",
            "adapter__a__register",
            10.1,
            metadata={mk.REGISTER_VERSION: 3, mk.REGISTER_STATUS: "rejected"},
        )
    )
    t.apply(RunEvent("success", "adapter__a__register", 10.2))
    t.apply(RunEvent("start", "adapter__a__register_quality_gate", 10.3))
    reason = "fail: exact_match gain +0.0100 vs required +0.1000"
    t.apply(
        RunEvent("check", "adapter__a__register_quality_gate", 10.4, check="quality_gate", passed=False, detail=reason)
    )
    failure = "DagsterAssetCheckFailedError: 1 blocking asset check failed with ERROR severity:"
    (ended,) = t.apply(RunEvent("failure", "adapter__a__register_quality_gate", 10.5, detail=failure))
    assert ended.status == "failed"
    assert row_detail(ended) == f"v3 rejected; check quality_gate failed: {reason}"
    skipped = {r.name: r for r in t.finish(11.0)}
    assert skipped["serving/deployment"].status == "skipped"
    assert "not run" in plain_line(skipped["serving/deployment"], 11.0)


def test_a_failed_step_shows_the_users_error_not_dagsters_wrapper():
    inner = SimpleNamespace(message="ValueError: r must be positive\nmore", cause=None, cls_name="ValueError")
    outer = SimpleNamespace(message="DagsterExecutionStepExecutionError: Error occurred", cause=inner, cls_name="X")
    assert _error_line(outer) == "ValueError: r must be positive"
    t = tracker()
    t.apply(RunEvent("start", "adapter__a__train", 1.0))
    (ended,) = t.apply(RunEvent("failure", "adapter__a__train", 2.0, detail=_error_line(outer)))
    assert ended.status == "failed" and plain_line(ended, 3.0).endswith("ValueError: r must be positive")


def test_progress_goes_to_the_running_row_with_an_eta():
    t = tracker()
    t.on_progress(ProgressReport("training", 1, 10), at=0.0)  # nothing runs: ignored
    assert all(r.progress is None for r in t.rows())
    t.apply(RunEvent("start", "adapter__a__train", 100.0))
    t.on_progress(ProgressReport("training", 2, 10, details={"loss": float("nan"), "tokens_per_s": 2400.0}), 100.0)
    t.on_progress(ProgressReport("training", 4, 10, details={"loss": 1.2345, "tokens_per_s": 2400.0}), 104.0)
    r = row(t, "adapter/a/train")
    assert eta_seconds(r, now=104.0) == pytest.approx(12.0)  # 2 steps in 4 s, 6 to go
    assert progress_text(r.progress) == "training 4/10 steps, loss 1.234, 2,400 tokens/s"
    t.apply(RunEvent("success", "adapter__a__train", 110.0))
    assert row(t, "adapter/a/train").progress is None


def test_phase_rows_take_progress_and_a_wait_without_total_has_no_eta():
    t = tracker()
    t.begin_phase("base model builtin:tiny", 0.0)
    t.on_progress(ProgressReport("waiting for vLLM", 3, None, unit="s", details={"timeout_s": 300.0}), 3.0)
    r = row(t, "base model builtin:tiny")
    assert eta_seconds(r, 5.0) is None
    assert progress_text(r.progress) == "waiting for vLLM 3 s (gives up after 300 s)"
    ended = t.end_phase("base model builtin:tiny", 7.5, headline="4.2 M parameters")
    assert plain_line(ended, 8.0).split() == [
        "done",
        "base",
        "model",
        "builtin:tiny",
        "7.5",
        "s",
        "4.2",
        "M",
        "parameters",
    ]


def test_headlines_from_materialization_metadata():
    train = {mk.TRAIN_REUSED: False, mk.TRAIN_LOSS: 0.5, mk.TRAIN_TOKENS_PER_S: 2400.4, mk.TRAIN_STEPS: 252}
    assert headline("train", train) == "loss 0.500, 2,400 tokens/s, 252 steps"
    assert headline("train", {**train, mk.TRAIN_REUSED: True, mk.TRAIN_STEPS: 9}).startswith("reused")
    em_base, em_adapter = mk.eval_metric("exact_match", "base"), mk.eval_metric("exact_match", "adapter")
    assert headline("eval", {em_base: 0.0, em_adapter: 0.77, mk.EVAL_ROWS: 30}) == (
        "exact match 0.00 → 0.77 on 30 rows"
    )
    assert headline("register", {mk.REGISTER_VERSION: 2, mk.REGISTER_STATUS: "champion"}) == "v2 champion"
    base = {mk.BASE_PARAMETERS: 4_200_000, mk.BASE_OBTAINED: "cached"}
    assert headline("base_model", base) == "4.2 M parameters (cached)"
    deployment = {mk.DEPLOYMENT_URL: "http://127.0.0.1:8000/v1/models", mk.DEPLOYMENT_RESTARTED: True}
    assert headline("deployment", deployment) == "http://127.0.0.1:8000/v1 (started)"
    assert headline("leaderboard", {mk.LEADERBOARD_VERSIONS: 3}) == "3 versions, none servable"  # no winner: no key
    assert headline("no-such-stage", {"x": 1}) == ""


def test_a_headline_missing_its_key_fails_loudly():
    """A metadata key renamed on one side only is a bug: the view says so instead of showing an empty headline."""
    with pytest.raises(KeyError, match=mk.EVAL_ROWS):
        headline("eval", {mk.eval_metric("exact_match", "base"): 0.0, mk.eval_metric("exact_match", "adapter"): 1.0})


def _metadata_keys_used(module: Path) -> set[str]:
    """The names of ``orchestration.metadata_keys`` (imported as ``mk``) that a module's source uses."""
    tree = ast.parse(module.read_text())
    return {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "mk"
    }


def test_every_key_a_headline_reads_is_one_the_assets_write():
    orchestration = Path(__file__).resolve().parents[1] / "orchestration"
    read = _metadata_keys_used(orchestration / "progress.py")
    written = _metadata_keys_used(orchestration / "assets.py")
    assert read and read <= written, sorted(read - written)


def test_render_without_a_terminal_shows_bars_and_eta():
    t = tracker()
    t.apply(RunEvent("start", "adapter__a__train", 100.0))
    t.on_progress(ProgressReport("training", 2, 10), 100.0)
    t.on_progress(ProgressReport("training", 4, 10), 104.0)
    console = Console(file=io.StringIO(), width=140, force_terminal=False)
    console.print(render(t.rows(), now=104.0))
    text = console.file.getvalue()
    assert "adapter/a/train" in text and "ETA 12 s" in text and "training 4/10 steps" in text
    assert "serving/deployment" in text and not ANSI.search(text)


def test_view_without_a_terminal_prints_one_plain_line_per_finished_row():
    buffer = io.StringIO()
    view = RunView(Console(file=buffer, width=160), tracker())
    with view:
        assert progress.listening()
        with view.phase("base model builtin:tiny") as phase:
            progress.report("pretraining builtin:tiny", 5, 400)
            phase["headline"] = "4.2 M parameters"
        view.event(RunEvent("start", "adapter__a__train", 1.0))
        view.event(RunEvent("success", "adapter__a__train", 2.0))
    assert not progress.listening()
    lines = buffer.getvalue().splitlines()
    assert [ln.split()[:2] for ln in lines] == [
        ["done", "base"],
        ["done", "adapter/a/train"],
        ["skipped", "dataset/d/clean"],
        ["skipped", "adapter/a/register"],
        ["skipped", "serving/deployment"],
    ]
    assert not ANSI.search(buffer.getvalue())


def test_reporting_to_restores_the_previous_sink():
    outer: list[ProgressReport] = []
    inner: list[ProgressReport] = []
    progress.report("nobody listens", 1, 2)
    with progress.reporting_to(outer.append):
        with progress.reporting_to(inner.append):
            progress.report("inner", 1, 2)
        progress.report("outer", 2, 2, unit="phase", loss=0.5)
    assert [r.task for r in inner] == ["inner"] and outer == [ProgressReport("outer", 2, 2, "phase", {"loss": 0.5})]
    assert not progress.listening()


# -- the real command -----------------------------------------------------------------------------------------------


def write_spec(tmp_path: Path, base: Path) -> Path:
    """Adapter `a` passes (no gate); `b`'s gate cannot pass on a random base, so its blocking check fails."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question number {i} about item {i * 7}"},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        }
        for i in range(40)
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = {
        "base_model": str(base),
        "datasets": {"d": {"path": "d.jsonl", "eval_fraction": 0.2}},
        "adapters": {
            "a": {"dataset": "d", "max_steps": 2, "batch_size": 2, "max_eval_rows": 4},
            "b": {
                "dataset": "d",
                "max_steps": 2,
                "batch_size": 2,
                "max_eval_rows": 4,
                "gate": {"metric": "exact_match", "min_gain": 0.5},
            },
        },
    }
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory, random_base):
    """`lorafoundry run` with stdout and stderr piped, as CI runs it."""
    tmp = tmp_path_factory.mktemp("cli-progress")
    spec, home = write_spec(tmp, random_base), tmp / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env |= {"OMP_NUM_THREADS": "1", "DAGSTER_HOME": str(home / "dagster_home")}
    cmd = [sys.executable, "-m", "orchestration.cli", "run", str(spec), "--home", str(home), "--no-deploy"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return SimpleNamespace(proc=proc, spec=spec, home=home)


@pytest.mark.slow
def test_piped_run_shows_one_plain_line_per_asset_and_no_debug_stream(piped_run):
    proc = piped_run.proc
    assert proc.returncode == 1, proc.stdout + proc.stderr  # b's blocking quality gate fails
    out = proc.stdout
    for text in (out, proc.stderr):
        assert " - DEBUG - " not in text and "STEP_OUTPUT" not in text
        assert not ANSI.search(text) and "\r" not in text
    lines = out.splitlines()
    status = {ln.split()[1]: ln.split()[0] for ln in lines if ln.split() and ln.split()[0] in ("done", "failed")}
    assets = build_assets(load_spec(piped_run.spec), deployment=False)
    expected = {name: "done" for name, _ in rows_of_assets(assets)[0]}
    assert {"dataset/d/clean", "adapter/a/train", "adapter/a/eval", "adapter/b/register"} <= expected.keys()
    assert status == {"base": "done", **expected, "adapter/b/register": "failed"}  # "base model <dir>" first
    (b_register,) = [ln for ln in lines if " adapter/b/register " in ln]
    assert "rejected; blocking check quality_gate failed: fail: exact_match gain" in b_register
    assert "run failed: adapter/b/register" in proc.stderr
    assert len(lines) <= 12, out
    # only the view's own lines: what libraries log (bitsandbytes, transformers) goes to the event log
    assert all(ln.split()[0] in ("done", "failed", "skipped") or ln.startswith("event log: ") for ln in lines), out
    assert proc.stderr.strip().splitlines() == ["run failed: adapter/b/register"], proc.stderr


@pytest.mark.slow
def test_piped_run_writes_the_full_event_log(piped_run):
    (line,) = [ln for ln in piped_run.proc.stdout.splitlines() if ln.startswith("event log: ")]
    log = Path(line.removeprefix("event log: "))
    assert log.parent == piped_run.home / "logs" and log.name.startswith("run-")
    text = log.read_text()
    assert " - DEBUG - " in text and "STEP_OUTPUT" in text and "RUN_START" in text
    assert "DagsterAssetCheckFailedError" in text  # the failure's stack trace is in the log, not on the terminal


@pytest.mark.slow
def test_verbose_streams_the_event_log(piped_run, monkeypatch):
    """Run again on the same home (every asset reused) with --verbose: the DEBUG events come out too."""
    from typer.testing import CliRunner

    from orchestration.cli import app

    monkeypatch.setenv("DAGSTER_HOME", str(piped_run.home / "dagster_home"))  # restored after the test
    args = ["run", str(piped_run.spec), "--home", str(piped_run.home), "--no-deploy", "--verbose"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert " - DEBUG - " in res.stdout and "STEP_SUCCESS" in res.stdout
    assert "reused the finished run" in res.stdout


def test_a_phase_that_raises_fails_its_row_and_the_error_goes_on():
    buffer = io.StringIO()
    view = RunView(Console(file=buffer, width=160), RunTracker([("vLLM start-up", "phase")], {}, set()))
    with pytest.raises(RuntimeError, match="vLLM exited"), view, view.phase("vLLM start-up"):
        raise RuntimeError("vLLM exited with code 1 while starting. Last log lines:\n...")
    (line,) = buffer.getvalue().splitlines()
    assert line.split()[:3] == ["failed", "vLLM", "start-up"]
    assert line.endswith("vLLM exited with code 1 while starting. Last log lines:")


def test_without_a_terminal_a_long_wait_prints_a_running_line_now_and_then():
    buffer = io.StringIO()
    now = [0.0]
    view = RunView(
        Console(file=buffer, width=160), RunTracker([("base model builtin:tiny", "phase")], {}, set()), lambda: now[0]
    )
    view.plain_interval_s = 30.0
    with view, view.phase("base model builtin:tiny"):  # begins at 0 s
        for now[0], step in ((10, 100), (20, 200), (40, 300), (50, 350), (75, 400)):
            progress.report("pretraining builtin:tiny", step, 400)
        now[0] = 80.0
    lines = buffer.getvalue().splitlines()
    assert lines[0].split()[:5] == ["running", "base", "model", "builtin:tiny", "40"]  # 30 s after the start
    assert lines[0].endswith("pretraining builtin:tiny 300/400 steps, ETA 15 s")  # 200 steps in 30 s, 100 to go
    assert lines[1].split()[:5] == ["running", "base", "model", "builtin:tiny", "75"]
    assert lines[2].split()[:5] == ["done", "base", "model", "builtin:tiny", "80"] and len(lines) == 3


def test_render_a_wait_without_total_as_a_pulse_with_the_timeout():
    t = tracker()
    t.apply(RunEvent("start", "serving__deployment", 0.0))
    wait = ProgressReport("waiting for vLLM to answer on /v1/models", 12.3, None, "s", {"timeout_s": 300.0})
    t.on_progress(wait, 12.3)
    console = Console(file=io.StringIO(), width=150, force_terminal=False)
    console.print(render(t.rows(), now=13.0))
    (line,) = [ln for ln in console.file.getvalue().splitlines() if "serving/deployment" in ln]
    assert "13 s" in line and "waiting for vLLM to answer on /v1/models 12 s (gives up after 300 s)" in line
    assert "ETA" not in line
