"""While `run` and `demo` draw their view, what libraries log and Python's warnings go to the run's log file, not the
console: the view shows only its own lines."""

from __future__ import annotations

import subprocess
import sys
import textwrap

#: A process that logs, as bitsandbytes and transformers do, once before the view (on the console, as always) and
#: once while it is open, before and after the run's log file opens; then it checks everything is as before.
SCRIPT = textwrap.dedent(
    """
    import logging, sys, warnings
    from pathlib import Path

    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from orchestration.progress import RunLog, RunTracker, RunView

    def emit(when):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels' (%s)", when
        )
        hf_logging.get_logger("transformers.trainer_utils").warning_once(
            f"mtime may not be reliable on this filesystem, falling back to numerical ordering ({when})"
        )
        warnings.warn(f"a library's deprecation ({when})", FutureWarning, stacklevel=1)

    emit("before the view")
    hf_root = logging.getLogger("transformers")
    before = (hf_root.handlers[:], hf_root.propagate, logging.getLogger().handlers[:], warnings.showwarning)
    view = RunView(Console(file=sys.stdout, width=100), RunTracker([("base model x", "phase")], {}, set()))
    log = RunLog(Path(sys.argv[1]), view)
    with view:
        with view.phase("base model x"):
            emit("in the view, before the run")
        log.open("r1")
        emit("in the view, in the run")
    log.end()
    after = (hf_root.handlers[:], hf_root.propagate, logging.getLogger().handlers[:], warnings.showwarning)
    assert after == before, (before, after)
    print("log:", log.path)
    """
)

LINES = ("Failed to load CPU gemm_4bit_forward", "mtime may not be reliable", "a library's deprecation")


def test_library_lines_go_to_the_run_log_not_the_console(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    console = proc.stdout + proc.stderr
    for line in LINES:
        assert f"{line}" in console and "(before the view)" in console  # the control: outside the view they print
        assert not [ln for ln in console.splitlines() if line in ln and "in the view" in ln], console
    assert "done    base model x" in proc.stdout  # the view's own line
    log = (tmp_path / "run-r1.log").read_text()
    for line in LINES:
        for when in ("in the view, before the run", "in the view, in the run"):
            assert [ln for ln in log.splitlines() if line in ln and when in ln], (line, when, log)
    assert "before the view" not in log
