"""Progress of the long waits inside a stage, reported to whoever listens.

Building or converting a base model, training, generating evaluation answers and waiting for vLLM to start each
call :func:`report` as they go; the `lorafoundry` CLI installs a sink with :func:`reporting_to` for the length of a
run and draws bars with ETAs from the reports. The sink is process-global on purpose: the CLI materializes the
assets in its own process (Dagster's in-process executor), several calls deep, and passing a callback through every
stage's signature would change them all for the sake of a display. With no sink installed a report does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProgressReport:
    """Where one long wait stands."""

    task: str
    """What is being waited on, e.g. ``training`` or ``generating answers (base)``."""
    done: float
    """Units done so far."""
    total: float | None = None
    """Units in all; None when the end is not known (waiting for a server to answer)."""
    unit: str = "step"
    """What one unit is, for the display (``step``, ``answer``, ``phase``, ``s``)."""
    details: dict[str, float | str] = field(default_factory=dict)
    """Numbers worth showing beside the bar, e.g. ``loss`` and ``tokens_per_s``."""


Sink = Callable[[ProgressReport], None]

_sink: Sink | None = None


def report(task: str, done: float, total: float | None = None, unit: str = "step", **details: float | str) -> None:
    """Tell the installed sink (if any) that ``task`` has ``done`` of ``total`` units behind it."""
    sink = _sink
    if sink is not None:
        sink(ProgressReport(task, done, total, unit, details))


def listening() -> bool:
    """Whether a sink is installed: a stage's own terminal bar (tqdm) stays off then, the sink draws one."""
    return _sink is not None


@contextmanager
def reporting_to(sink: Sink) -> Iterator[None]:
    """Send every :func:`report` to ``sink`` inside the block (the previous sink comes back after it).

    transformers' own progress bars ("Loading weights", "Writing model shards") are off meanwhile: they would
    write carriage returns through the sink's display, which shows the waits that matter already.
    """
    global _sink
    from transformers.utils import logging as hf_logging

    previous, bars = _sink, hf_logging.is_progress_bar_enabled()
    _sink = sink
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        _sink = previous
        if bars:
            hf_logging.enable_progress_bar()
