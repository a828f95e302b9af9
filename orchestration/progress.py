"""The live view of `lorafoundry run` and `demo`, and where the run's Dagster event log goes.

One row per asset (and per phase outside Dagster, such as preparing the base model) goes pending -> running ->
done / failed / skipped, with its duration and a headline from its materialization's metadata (rows kept, loss and
tokens/s, exact match base -> adapter, version and status, the URL); a running row shows the bar and ETA of what it
waits on, from :mod:`lora_assets.progress`; a failed blocking asset check shows its reason on its asset's row.
Every Dagster event, DEBUG included, goes to ``<home>/logs/run-<run id>.log`` and to the terminal only when asked.

The parts that decide what is shown are plain: :func:`run_event` keeps what the view needs of a Dagster event,
:class:`RunTracker` turns events into :class:`Row` states, and :func:`plain_line` / :func:`render` turn rows into
text; they run without a terminal. :class:`RunView` draws them with rich: a live table on a terminal, else one
plain line per row as it finishes (no control characters, no bars).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from lora_assets.progress import ProgressReport, reporting_to
from orchestration import metadata_keys as mk

if TYPE_CHECKING:  # Dagster is imported where a run starts: `lorafoundry serve` draws its start-up without it
    import dagster as dg

#: The step events the view follows (Dagster's ``DagsterEventType`` values), as the kind of :class:`RunEvent` each
#: becomes.
STEP_EVENT_KINDS: dict[str, str] = {
    "STEP_START": "start",
    "STEP_RESTARTED": "start",
    "STEP_SUCCESS": "success",
    "STEP_FAILURE": "failure",
    "STEP_UP_FOR_RETRY": "retry",
    "STEP_SKIPPED": "skipped",
}


@dataclass(frozen=True)
class RunEvent:
    """What the view needs of one Dagster event of a step."""

    kind: str
    """start, success, failure, retry, skipped (the step's own events), materialized or check."""
    step_key: str
    at: float
    """When it happened (seconds since the epoch)."""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """A materialization's metadata, as plain values."""
    check: str | None = None
    """A check evaluation's check name."""
    passed: bool = True
    """A check evaluation's outcome."""
    severity: str = "ERROR"
    """A failed check's severity: ERROR, or WARN for one that reports without stopping anything."""
    blocking: bool = False
    """A check that stops the run's downstream steps when it fails at ERROR."""
    detail: str = ""
    """A failure's error (the innermost cause's first line) or a check's description."""


def _error_line(error) -> str:
    """The first line of the innermost cause of a Dagster ``SerializableErrorInfo``: the user's exception, not
    Dagster's wrapper around it."""
    while error.cause is not None:
        error = error.cause
    lines = error.message.strip().splitlines()
    return lines[0] if lines else error.cls_name or "error"


def run_event(event: dg.DagsterEvent, at: float) -> RunEvent | None:
    """The :class:`RunEvent` of a Dagster event, or None for what the view ignores (run, engine, resource and output
    events, log lines)."""
    step = event.step_key
    if step is None:
        return None
    kind = event.event_type_value
    if kind in STEP_EVENT_KINDS:
        error = getattr(event.event_specific_data, "error", None)
        return RunEvent(STEP_EVENT_KINDS[kind], step, at, detail=_error_line(error) if error else "")
    if kind == "ASSET_MATERIALIZATION":
        metadata = event.step_materialization_data.materialization.metadata
        return RunEvent("materialized", step, at, metadata={k: v.value for k, v in metadata.items()})
    if kind == "ASSET_CHECK_EVALUATION":
        ev = event.asset_check_evaluation_data
        return RunEvent(
            "check",
            step,
            at,
            check=ev.check_name,
            passed=ev.passed,
            severity=ev.severity.value,
            blocking=bool(ev.blocking),
            detail=ev.description or "",
        )
    return None


# -- headlines: one line of what each kind of asset produced, from its materialization's metadata ------------------


def _clean_headline(m: Mapping[str, Any]) -> str:
    train, held_out, quarantined = m[mk.CLEAN_ROWS_TRAIN], m[mk.CLEAN_ROWS_EVAL], m[mk.CLEAN_ROWS_QUARANTINED]
    return f"{train + held_out:,} rows kept ({train:,} train, {held_out:,} eval), {quarantined:,} quarantined"


def _train_headline(m: Mapping[str, Any]) -> str:
    if m[mk.TRAIN_REUSED]:
        return f"reused the finished run: loss {m[mk.TRAIN_LOSS]:.3f}, {m[mk.TRAIN_STEPS]} steps"
    return f"loss {m[mk.TRAIN_LOSS]:.3f}, {m[mk.TRAIN_TOKENS_PER_S]:,.0f} tokens/s, {m[mk.TRAIN_STEPS]} steps"


def _eval_headline(m: Mapping[str, Any]) -> str:
    base, adapter = m[mk.eval_metric("exact_match", "base")], m[mk.eval_metric("exact_match", "adapter")]
    return f"exact match {base:.2f} → {adapter:.2f} on {m[mk.EVAL_ROWS]} rows"


def _register_headline(m: Mapping[str, Any]) -> str:
    return f"v{m[mk.REGISTER_VERSION]} {m[mk.REGISTER_STATUS]}"


def _leaderboard_headline(m: Mapping[str, Any]) -> str:
    if mk.LEADERBOARD_WINNER_VERSION not in m:  # legitimately absent: no version is servable
        return f"{m[mk.LEADERBOARD_VERSIONS]} versions, none servable"
    winner, metric = m[mk.LEADERBOARD_WINNER_VERSION], m[mk.LEADERBOARD_WINNER_METRIC]
    return f"winner v{winner} ({metric}) of {m[mk.LEADERBOARD_VERSIONS]} versions"


def _deployment_headline(m: Mapping[str, Any]) -> str:
    url = str(m[mk.DEPLOYMENT_URL]).removesuffix("/models")
    return f"{url} ({'started' if m[mk.DEPLOYMENT_RESTARTED] else 'already running'})"


def _base_model_headline(m: Mapping[str, Any]) -> str:
    return f"{m[mk.BASE_PARAMETERS] / 1e6:,.1f} M parameters ({m[mk.BASE_OBTAINED]})"


#: The headline of each kind of asset, by the last part of its key (``base_model/<name>``: by its first).
HEADLINES = {
    "base_model": _base_model_headline,
    "clean": _clean_headline,
    "train": _train_headline,
    "eval": _eval_headline,
    "register": _register_headline,
    "leaderboard": _leaderboard_headline,
    "deployment": _deployment_headline,
}


def headline(stage: str, metadata: Mapping[str, Any]) -> str:
    """The headline of an asset of kind ``stage`` from its materialization's metadata; empty for a kind without one.

    Raises:
        KeyError: the metadata lacks a key the headline reads. The assets of this run wrote it with the same keys
            (:mod:`orchestration.metadata_keys`), so that is a bug, not something to hide behind an empty headline.
    """
    return HEADLINES[stage](metadata) if stage in HEADLINES else ""


# -- rows -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckOutcome:
    """One asset check's evaluation, as shown on its asset's row."""

    name: str
    passed: bool
    severity: str
    blocking: bool
    detail: str


@dataclass
class Row:
    """One asset (or phase) of the view."""

    name: str
    stage: str
    """The kind of asset (``clean``, ``train``...: the last part of its key), or ``phase``."""
    status: str = "pending"
    """pending, running, done, failed or skipped."""
    started: float | None = None
    finished: float | None = None
    headline: str = ""
    error: str = ""
    note: str = ""
    """A passing remark while running, e.g. a retry's reason."""
    checks: list[CheckOutcome] = field(default_factory=list)
    progress: ProgressReport | None = None
    """The last report of what the row waits on (None when it waits on nothing measurable)."""
    progress_since: tuple[float, float] = (0.0, 0.0)
    """(time, units done) of the first report of the current task: the rate the ETA extrapolates."""
    open_steps: set[str] = field(default_factory=set)
    """Steps of this row (the asset's and its checks') that have not finished; the row ends with the last."""
    failed: bool = False

    @property
    def final(self) -> bool:
        return self.status in ("done", "failed", "skipped")


class RunTracker:
    """Rows and their states, fed by :class:`RunEvent` s, phases and progress reports from any thread.

    Args:
        rows: (name, stage) of each row, in display order.
        steps: the row of each step key (an asset's step and its checks' steps).
        check_steps: the step keys that evaluate checks: their start does not make a row start.
    """

    def __init__(self, rows: Sequence[tuple[str, str]], steps: Mapping[str, str], check_steps: set[str]) -> None:
        self._lock = threading.Lock()
        self._rows = {name: Row(name, stage) for name, stage in rows}
        self._steps = dict(steps)
        self._check_steps = set(check_steps)
        for step, name in self._steps.items():
            self._rows[name].open_steps.add(step)
        self._current: str | None = None

    def rows(self) -> list[Row]:
        """A copy of every row, in display order."""
        with self._lock:
            return [replace(r, checks=list(r.checks), open_steps=set(r.open_steps)) for r in self._rows.values()]

    def apply(self, event: RunEvent) -> list[Row]:
        """Update the row of ``event``'s step; return it (a copy) when the event finished it, else nothing."""
        with self._lock:
            name = self._steps.get(event.step_key)
            if name is None:
                return []
            row = self._rows[name]
            own_step = event.step_key not in self._check_steps
            if event.kind == "start":
                row.status, row.started = "running", event.at if row.started is None else row.started
                self._current = name if own_step else self._current
            elif event.kind == "materialized":
                row.headline = headline(row.stage, event.metadata)
            elif event.kind == "check":
                row.checks.append(
                    CheckOutcome(event.check or "?", event.passed, event.severity, event.blocking, event.detail)
                )
            elif event.kind == "retry":
                row.note = f"retrying after: {event.detail}"
            elif event.kind in ("success", "failure", "skipped"):
                return self._step_ended(row, event, own_step)
            return []

    def _step_ended(self, row: Row, event: RunEvent, own_step: bool) -> list[Row]:
        row.open_steps.discard(event.step_key)
        if event.kind == "failure":
            row.failed = True
            row.error = row.error or (event.detail if own_step or not _failed_checks(row) else "")
        if own_step:
            row.progress, row.note = None, ""
            self._current = None if self._current == row.name else self._current
        if row.open_steps or row.final:
            return []
        return [self._end(row, event.at)]

    def _end(self, row: Row, at: float) -> Row:
        row.status = "failed" if row.failed else ("done" if row.started is not None else "skipped")
        row.finished = at if row.started is not None else None
        row.progress = None
        return replace(row, checks=list(row.checks), open_steps=set())

    def begin_phase(self, name: str, at: float) -> None:
        """Start the row ``name`` of a phase outside Dagster; progress reports go to it until it ends."""
        with self._lock:
            row = self._rows[name]
            row.status, row.started = "running", at
            self._current = name

    def end_phase(self, name: str, at: float, headline: str = "", error: str = "") -> Row:
        """End the phase ``name`` (failed when ``error`` is set); return its row (a copy)."""
        with self._lock:
            row = self._rows[name]
            row.headline, row.error, row.failed = headline, error, bool(error)
            self._current = None if self._current == name else self._current
            return self._end(row, at)

    def on_progress(self, report: ProgressReport, at: float) -> Row | None:
        """Attach ``report`` to the running row (the last started asset step or phase) and return that row (a copy);
        None when no row runs (the report is dropped)."""
        with self._lock:
            row = self._rows.get(self._current) if self._current else None
            if row is None:
                return None
            if row.progress is None or row.progress.task != report.task or report.done < row.progress.done:
                row.progress_since = (at, report.done)
            row.progress = report
            return replace(row, checks=list(row.checks), open_steps=set(row.open_steps))

    def finish(self, at: float) -> list[Row]:
        """End every row still open when the run is over: never started means skipped (an upstream step failed or
        a blocking check stopped it), started means failed unless its own step succeeded. Returns those rows."""
        with self._lock:
            ended = []
            for row in self._rows.values():
                if row.final:
                    continue
                own_open = any(s not in self._check_steps for s in row.open_steps)
                if row.started is not None and own_open:
                    row.failed, row.error = True, row.error or "did not finish"
                ended.append(self._end(row, at))
            return ended


def _failed_checks(row: Row) -> list[CheckOutcome]:
    return [c for c in row.checks if not c.passed]


def rows_of_assets(assets: Sequence[dg.AssetsDefinition]) -> tuple[list[tuple[str, str]], dict[str, str], set[str]]:
    """The rows of ``assets`` (name, stage) in their order, the row of each step key, and the check steps: the
    arguments of :class:`RunTracker` after the phase rows."""
    rows: list[tuple[str, str]] = []
    steps: dict[str, str] = {}
    check_steps: set[str] = set()
    for a in assets:
        if a.check_keys and not a.keys:  # a checks-only definition: its step belongs to its asset's row
            steps[a.node_def.name] = next(iter(a.check_keys)).asset_key.to_user_string()
            check_steps.add(a.node_def.name)
            continue
        for key in a.keys:
            rows.append((key.to_user_string(), "base_model" if "base_model" in key.path[:-1] else key.path[-1]))
            steps[a.node_def.name] = key.to_user_string()
    return rows, steps, check_steps


# -- text ---------------------------------------------------------------------------------------------------------


def format_seconds(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3:05`` (minutes:seconds from two minutes on)."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def elapsed(row: Row, now: float) -> str:
    """How long the row ran (so far, while it runs); empty before it starts."""
    if row.started is None:
        return ""
    return format_seconds((row.finished if row.finished is not None else now) - row.started)


def eta_seconds(row: Row, now: float) -> float | None:
    """Seconds left for the row's current task at the rate since its first report; None without a total or a rate."""
    p = row.progress
    if p is None or p.total is None:
        return None
    since, done0 = row.progress_since
    if p.done <= done0 or now <= since:
        return None
    return max(p.total - p.done, 0) * (now - since) / (p.done - done0)


def progress_text(report: ProgressReport) -> str:
    """``training 120/252 steps, loss 1.234, 2,400 tokens/s``: what a running row waits on, as text."""
    done = f"{report.done:.0f}" + (f"/{report.total:.0f}" if report.total is not None else "")
    text = f"{report.task} {done} {report.unit}{'s' if report.unit != 's' else ''}"
    d = report.details
    if isinstance(d.get("loss"), float) and d["loss"] == d["loss"]:  # NaN until the first logged loss
        text += f", loss {d['loss']:.3f}"
    if d.get("tokens_per_s"):
        text += f", {d['tokens_per_s']:,.0f} tokens/s"
    if d.get("timeout_s"):
        text += f" (gives up after {d['timeout_s']:.0f} s)"
    return text


def row_detail(row: Row) -> str:
    """The row's headline, checks and error as one line."""
    parts = [row.headline] if row.headline else []
    failed = _failed_checks(row)
    for c in failed:
        verdict = "failed" if c.severity == "ERROR" else "warned"
        parts.append(f"{'blocking ' if c.blocking else ''}check {c.name} {verdict}: {c.detail}")
    if row.checks and not failed:
        parts.append(f"{len(row.checks)} check{'s' if len(row.checks) > 1 else ''} passed")
    if row.error:
        parts.append(row.error)
    if row.note and not row.final:
        parts.append(row.note)
    if row.status == "skipped":
        parts.append("not run: an upstream step failed or a blocking check stopped it")
    return "; ".join(parts)


def plain_line(row: Row, now: float, name_width: int = 0) -> str:
    """The row as one plain line: status, name, duration, detail (what it waits on and the ETA while it runs)."""
    detail = row_detail(row)
    if row.status == "running" and row.progress is not None:
        eta = eta_seconds(row, now)
        detail = progress_text(row.progress) + (f", ETA {format_seconds(eta)}" if eta is not None else "")
    return f"{row.status:<7} {row.name:<{name_width}} {elapsed(row, now):>6}  {detail}".rstrip()


_SYMBOLS = {
    "pending": ("·", "dim"),
    "running": ("▸", "yellow"),
    "done": ("✓", "green"),
    "failed": ("✗", "red"),
    "skipped": ("-", "dim"),
}


def _running_detail(row: Row, now: float) -> RenderableType:
    p = row.progress
    if p is None:
        return Text(row_detail(row) or "running", style="yellow")
    eta = eta_seconds(row, now)
    cells = Table.grid(padding=(0, 1))
    cells.add_row(
        ProgressBar(total=p.total, completed=p.done, width=24, pulse=p.total is None),
        Text(f"ETA {format_seconds(eta)}" if eta is not None else "", style="cyan"),
        Text(progress_text(p)),
    )
    return cells


def render(rows: Sequence[Row], now: float) -> Table:
    """The rows as a rich table: symbol, name, duration, and the detail (a bar with ETA while a row waits on
    something measurable)."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column()
    grid.add_column()
    grid.add_column(justify="right")
    grid.add_column()
    for r in rows:
        symbol, style = _SYMBOLS[r.status]
        if r.status == "running":
            detail: RenderableType = _running_detail(r, now)
        else:
            detail = Text(row_detail(r), style="red" if r.status == "failed" else "")
        grid.add_row(
            Text(symbol, style=style),
            Text(r.name, style="dim" if r.status == "pending" else ""),
            elapsed(r, now),
            detail,
        )
    return grid


# -- drawing and logging ------------------------------------------------------------------------------------------


class RunView:
    """Draws a :class:`RunTracker` on ``console`` and listens to :mod:`lora_assets.progress` while open.

    On a terminal: a live table, redrawn four times a second, left on screen at the end. Otherwise (CI, pipes): one
    plain line per row as it finishes, and while a row reports progress a ``running`` line with its ETA every
    :attr:`plain_interval_s` seconds, so a long wait in a CI log is not silent. With :attr:`library_output` set (a
    :class:`RunLog` sets it), what libraries log and Python's warnings go there while the view is open, not to the
    console (see :func:`library_output_to`).
    """

    plain_interval_s = 60.0

    def __init__(self, console: Console, tracker: RunTracker, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.console = console
        self.tracker = tracker
        self.live = console.is_terminal
        self._stack = ExitStack()
        self._name_width = max((len(r.name) for r in tracker.rows()), default=0)
        self._last_plain: dict[str, float] = {}
        self.library_output: logging.Handler | None = None

    def __enter__(self) -> RunView:
        self.console = self._stack.enter_context(_own_descriptor(self.console))
        self._stack.enter_context(reporting_to(self._progress))
        if self.library_output is not None:
            self._stack.enter_context(library_output_to(self.library_output))
        if self.live:
            live = Live(self, console=self.console, refresh_per_second=4, redirect_stdout=False, redirect_stderr=False)
            self._stack.enter_context(live)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        ended = self.tracker.finish(self.clock())
        for row in ended if exc_type is None else []:  # after an exception, its message says what happened
            self._ended(row)
        self._stack.close()

    def __rich__(self) -> Table:
        return render(self.tracker.rows(), self.clock())

    def event(self, event: RunEvent) -> None:
        for row in self.tracker.apply(event):
            self._ended(row)

    def echo(self, line: str) -> None:
        """Print a line of the event log above the view (``--verbose``)."""
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    @contextmanager
    def phase(self, name: str) -> Iterator[dict[str, str]]:
        """Run the block as the phase row ``name``; set ``["headline"]`` on the yielded dict to show one. An
        exception fails the row (its first line shown) and goes on."""
        result = {"headline": ""}
        self.tracker.begin_phase(name, self.clock())
        try:
            yield result
        except BaseException as e:
            self._ended(
                self.tracker.end_phase(name, self.clock(), error=(str(e).splitlines() or [type(e).__name__])[0])
            )
            raise
        self._ended(self.tracker.end_phase(name, self.clock(), headline=result["headline"]))

    def _progress(self, report: ProgressReport) -> None:
        now = self.clock()
        row = self.tracker.on_progress(report, now)
        if (
            row is None
            or self.live
            or now - self._last_plain.get(row.name, now if row.started is None else row.started) < self.plain_interval_s
        ):
            return
        self._last_plain[row.name] = now
        self.console.print(plain_line(row, now, self._name_width), markup=False, highlight=False, soft_wrap=True)

    def _ended(self, row: Row) -> None:
        if not self.live:
            self.console.print(
                plain_line(row, self.clock(), self._name_width), markup=False, highlight=False, soft_wrap=True
            )


#: Libraries that print their log records themselves (their own console handler, not propagating to the root).
SELF_PRINTING_LOGGERS = ("transformers",)


@contextmanager
def library_output_to(handler: logging.Handler) -> Iterator[None]:
    """Inside the block, what libraries log (bitsandbytes, transformers, torch, ...) and Python's warnings go to
    ``handler`` instead of the console; everything is as before after it.

    Python prints a record that reaches no handler to stderr (``logging.lastResort``), and transformers has a console
    handler of its own, so lines such as bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community"
    and transformers' "mtime may not be reliable on this filesystem" would otherwise land between the view's rows.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger()  # transformers adds its console handler on first use: now, so it is set aside below
    own = [logging.getLogger(name) for name in SELF_PRINTING_LOGGERS]
    saved = [(lg.handlers[:], lg.propagate) for lg in own]
    for lg in own:
        lg.handlers, lg.propagate = [], True
    root = logging.getLogger()
    root.addHandler(handler)
    show_warning = warnings.showwarning

    def log_warning(message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        logging.getLogger("py.warnings").warning(text)

    warnings.showwarning = log_warning
    try:
        yield
    finally:
        warnings.showwarning = show_warning
        root.removeHandler(handler)
        for lg, (handlers, propagate) in zip(own, saved, strict=True):
            lg.handlers, lg.propagate = handlers, propagate


@contextmanager
def _own_descriptor(console: Console) -> Iterator[Console]:
    """A console like ``console`` that writes to a copy of its file descriptor, when it has one.

    While a step runs, Dagster's compute-log capture points descriptors 1 and 2 at files (and tails them back to
    the terminal), so a console on ``sys.stdout`` would find no terminal there (rich stops redrawing) and its lines
    would land in the step's captured stdout. The copy, made before the run, still is the terminal or pipe.
    """
    try:
        fd = console.file.fileno()
    except (AttributeError, OSError, ValueError):  # a StringIO (CliRunner, tests): nothing captures it
        yield console
        return
    with open(os.dup(fd), "w", encoding="utf-8", buffering=1) as stream:
        yield Console(
            file=stream,
            force_terminal=console.is_terminal,
            width=None if console.is_terminal else console.width,
            no_color=console.no_color,
        )


class RunLog(logging.Handler):
    """Every record of a Dagster run: formatted as Dagster's console logger does into
    ``<logs_dir>/run-<run id>.log``, echoed on the view when ``verbose``, and its event passed to the view. What
    libraries log while the view is open goes to the same file (the view's :attr:`RunView.library_output`), lines
    from before the run started (the base-model phase) at its top."""

    def __init__(self, logs_dir: Path, view: RunView, verbose: bool = False) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(
            logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s", "%Y-%m-%d %H:%M:%S %z")
        )
        self.logs_dir = logs_dir
        self.view = view
        self.verbose = verbose
        self.path: Path | None = None
        self._file = None
        self._early: list[str] = []  # library lines from before the file exists
        view.library_output = _LibraryLines(self)

    def open(self, run_id: str) -> None:
        """Start the log file of ``run_id`` (Dagster may set the logger up more than once per run)."""
        if self.path is None:
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            self.path = self.logs_dir / f"run-{run_id}.log"
            self._file = self.path.open("a", encoding="utf-8")
            self._file.writelines(line + "\n" for line in self._early)
            self._early.clear()

    def write(self, line: str) -> None:
        """One line into the log file (kept until the file opens), and on the view when ``verbose``."""
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        elif self.path is None:
            self._early.append(line)
        if self.verbose:
            self.view.echo(line)

    def emit(self, record: logging.LogRecord) -> None:
        self.write(self.format(record))
        meta = getattr(record, "dagster_meta", None) or {}
        event = meta.get("dagster_event")
        converted = run_event(event, record.created) if event is not None else None
        if converted is not None:
            self.view.event(converted)

    def end(self) -> None:
        """Close the log file. (Not ``close``: Dagster's instance reconfigures logging when it loads, which closes
        every handler there is, this one included, while the run goes on.)"""
        if self._file is not None:
            self._file.close()
            self._file = None


class _LibraryLines(logging.Handler):
    """What libraries log during a run, as lines of its :class:`RunLog` (never read as Dagster events)."""

    def __init__(self, log: RunLog) -> None:
        super().__init__(logging.DEBUG)
        self.log = log
        self.lock = (
            log.lock
        )  # one lock for both handlers' lines: the run's records and the libraries' come from any thread
        self.setFormatter(log.formatter)

    def emit(self, record: logging.LogRecord) -> None:
        self.log.write(self.format(record))


def materialize_logged(
    assets: Sequence[dg.AssetsDefinition], resources: Mapping[str, object], instance: dg.DagsterInstance, log: RunLog
) -> dg.ExecuteInProcessResult:
    """Materialize every asset in-process like ``dg.materialize``, with the run's events going to ``log`` in place
    of Dagster's console logger (which prints every DEBUG event)."""
    import dagster as dg

    @dg.logger(description="lorafoundry's CLI: the run's events to its log file and live view.")
    def lorafoundry_cli(init_context: dg.InitLoggerContext) -> logging.Logger:
        log.open(init_context.run_id)
        logger = logging.Logger("dagster", logging.DEBUG)  # not registered: only this run writes to it
        logger.addHandler(log)
        return logger

    defs = dg.Definitions(assets=assets, resources=resources, loggers={"lorafoundry_cli": lorafoundry_cli})
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        run_config={"loggers": {"lorafoundry_cli": {}}}, instance=instance, raise_on_error=False
    )
