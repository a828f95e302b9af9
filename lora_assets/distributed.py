"""The torchrun entry point: one adapter trained by N data-parallel processes.

``torchrun --nproc-per-node N -m lora_assets.distributed REQUEST.json`` starts N copies of :func:`main`; each reads
the request (what :func:`lora_assets.train.train_adapter` takes, as JSON), joins the process group (nccl on GPUs,
gloo on CPU) and trains its share of every batch (see :mod:`lora_assets.data_parallel`). Rank 0 writes the run dir,
the checkpoints and the published adapter with its manifest, exactly where a one-process run writes them, so a rerun
after a crash resumes from the last complete checkpoint. The same module runs unchanged over several nodes
(``--nnodes``, a rendezvous endpoint) when the home dir is shared.

Started by Dagster through Pipes (``orchestration/training_launch.py``), rank 0 also opens the Pipes session: its
log lines become the step's log events and its progress reports reach the launching process. Without Pipes in the
environment it trains all the same.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lora_assets.base_model import BaseModelRef
from lora_assets.clean import CleanReport
from lora_assets.data_parallel import DataParallel
from lora_assets.home import Home
from lora_assets.progress import ProgressReport, reporting_to
from lora_assets.spec import AdapterSpec

#: The module torchrun runs (``-m``).
ENTRY_POINT = "lora_assets.distributed"
#: A collective that waits longer than this for a peer fails instead of hanging (a peer that stopped, not died:
#: a dead one closes its sockets and fails the others at once).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
#: The run's result, written by rank 0 into the published adapter dir.
MANIFEST = "training_manifest.json"
#: The payload key of a progress report sent over Pipes (a ``report_custom_message``).
PROGRESS_MESSAGE = "lorafoundry_progress"


class TrainRequest(BaseModel):
    """What every process of a data-parallel run trains: the arguments of ``train_adapter``, resolved."""

    model_config = ConfigDict(extra="forbid")

    job_key: str = Field(description="The adapter job's key (the adapter name, or `<name>.p<i>` for a sweep point).")
    spec: AdapterSpec = Field(description="The adapter's settings; `processes` is the world size it was planned for.")
    base: BaseModelRef = Field(description="The resolved base model (a local dir every process can read).")
    clean: CleanReport = Field(description="The cleaning report of the adapter's dataset (gives the train split).")
    home: Home = Field(
        description="The home dir's layout: output goes to `<home>/adapters/<job key>/<run key>`, the tokenized train "
        "split to its token cache."
    )
    log_every: int = Field(10, description="Log the loss every this many steps.")


class DistributedTrainingError(RuntimeError):
    """A data-parallel training run failed; the message says which process and why, and where a rerun resumes."""


@dataclass(frozen=True)
class TrainingLaunch:
    """One planned data-parallel run: the request written, the command to start, where its output will be."""

    command: list[str]
    processes: int
    request_path: Path
    failures_file: Path
    adapter_dir: Path
    """The published adapter dir (``<adapters>/<job>/<run key>``); its manifest is the run's result."""

    @property
    def finished(self) -> bool:
        """Whether a finished run of the same run key is already published (then nothing needs to start)."""
        return (self.adapter_dir / MANIFEST).exists()

    def check_machine(self) -> None:
        """Before starting the command here: refuse more processes than this machine has devices for."""
        check_local_devices(self.processes)

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)

    def failure(self, returncode: int | None = None) -> str:
        """The error message of a failed run: which process failed and why, and where a rerun resumes."""
        from lora_assets.train import latest_complete_checkpoint

        checkpoint = latest_complete_checkpoint(
            self.adapter_dir.with_name(self.adapter_dir.name + ".tmp") / "checkpoints"
        )
        resume = (
            f"a rerun resumes from {checkpoint.name} (kept in {checkpoint.parent})"
            if checkpoint
            else "no checkpoint was complete: a rerun starts the epoch again"
        )
        return f"data-parallel training failed: {failure_reason(self.failures_file, returncode)}. {resume}."


def check_local_devices(processes: int) -> None:
    """Refuse a one-machine launch of more processes than this machine has GPUs (or, without one, CPU cores)."""
    import torch

    from lora_assets.hardware import usable_cpus

    have, kind = (torch.cuda.device_count(), "GPUs") if torch.cuda.is_available() else (usable_cpus(), "CPU cores")
    if processes > have:
        raise DistributedTrainingError(
            f"processes {processes} on a machine with {have} {kind}: each process needs one of its own. Fix: set "
            f"processes: {have} or fewer, or run torchrun over several nodes (docs/scale-out.md, Several nodes)"
        )


def plan_launch(request: TrainRequest, folder: Path, adapter_dir: Path) -> TrainingLaunch:
    """Write ``request`` into ``folder`` and plan its one-machine torchrun command (the failures file beside it,
    cleared). Nothing is checked against this machine yet: the request also serves a run over several nodes."""
    from lora_assets.files import write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    request_path, failures_file = folder / "request.json", folder / "failures.json"
    write_json_atomic(request_path, request.model_dump(mode="json"))
    failures_file.unlink(missing_ok=True)  # written only on failure: an old one would name an old reason
    return TrainingLaunch(
        command=torchrun_command(request_path, request.spec.processes, failures_file),
        processes=request.spec.processes,
        request_path=request_path,
        failures_file=failures_file,
        adapter_dir=adapter_dir,
    )


def torchrun_command(request_path: Path, processes: int, failures_file: Path) -> list[str]:
    """The command that trains ``request_path`` with ``processes`` processes on this machine: torchrun's own
    arguments, run by :mod:`lora_assets.torchrun_agent` so that a failure is written to ``failures_file``.

    ``--standalone`` picks a free local rendezvous port (several runs may train at once); ``--max-restarts 0``:
    a failed process fails the run, and the rerun resumes from the last checkpoint.
    """
    return [
        sys.executable,
        "-m",
        "lora_assets.torchrun_agent",
        str(failures_file),
        "--standalone",
        "--nproc-per-node",
        str(processes),
        "--max-restarts",
        "0",
        "-m",
        ENTRY_POINT,
        str(request_path),
    ]


def failure_reason(failures_file: Path, returncode: int | None) -> str:
    """Why a run failed, from the file :mod:`lora_assets.torchrun_agent` wrote: each failed rank with its signal,
    exit code or exception, the first observed failure first."""
    try:
        failures = json.loads(failures_file.read_text())["failures"]
    except (OSError, ValueError, KeyError, TypeError):
        code = "" if returncode is None else f" with code {returncode}"
        return f"the launcher exited{code} without recording a failed process ({failures_file})"
    return "; ".join(_failure_text(f) for f in failures)


def _failure_text(f: dict) -> str:
    who = f"rank {f['rank']} (pid {f['pid']})"
    if f.get("signal"):
        return f"{who} was killed by signal {f['signal']}"
    message = (f.get("message") or "").strip().splitlines()
    return f"{who} exited with code {f['exitcode']}" + (f": {message[-1]}" if message else "")


def world_from_env(launcher: list[str]) -> DataParallel:
    """This process's place in the run, from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK)."""
    import torch

    return DataParallel(
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend="nccl" if torch.cuda.is_available() else "gloo",
        launcher=launcher,
    )


def _launcher_command() -> list[str]:
    """The command line of the torchrun agent that started this process (its parent), for the manifest."""
    import psutil

    parent = psutil.Process().parent()
    return parent.cmdline() if parent is not None else []


def _join(dp: DataParallel) -> None:
    import torch
    import torch.distributed as dist

    if dp.backend == "nccl":
        torch.cuda.set_device(dp.local_rank)
    else:
        from lora_assets.hardware import limit_torch_threads

        # the node's CPUs shared equally between its processes (torchrun sets OMP_NUM_THREADS=1 otherwise)
        limit_torch_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    dist.init_process_group(backend=dp.backend, timeout=COLLECTIVE_TIMEOUT)


def _pipes_or_none():
    """Rank 0's Dagster Pipes context when a Dagster step launched this run, else None."""
    try:
        from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes
    except ImportError:  # dagster-pipes is a dependency of dagster; a training-only install may lack it
        return None
    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        return None
    return open_dagster_pipes()


def _forward_progress(pipes):
    def send(report: ProgressReport) -> None:
        pipes.report_custom_message(
            {
                PROGRESS_MESSAGE: {
                    "task": report.task,
                    "done": report.done,
                    "total": report.total,
                    "unit": report.unit,
                    "details": report.details,
                }
            }
        )

    return send


def _train(request: TrainRequest, dp: DataParallel, progress) -> None:
    from lora_assets.train import train_adapter

    train_adapter(
        request.job_key,
        request.spec,
        request.base,
        request.clean,
        request.home,
        log_every=request.log_every,
        progress=progress,
        data_parallel=dp,
    )


def main(argv: list[str] | None = None) -> int:
    """Train the request named on the command line as one process of a torchrun-launched run."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: torchrun --nproc-per-node N -m {ENTRY_POINT} REQUEST.json", file=sys.stderr)
        return 2
    # This sandbox and some CI runners start processes with SIGTERM ignored; torchrun stops the survivors of a
    # failed rank with SIGTERM (then SIGKILL after 30 s), so take the default back: they stop at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    request = TrainRequest.model_validate_json(Path(args[0]).read_text())
    dp = world_from_env(_launcher_command())
    if dp.world_size != request.spec.processes:
        # the run key, the batch split and the published adapter's name are made for the spec's world size
        raise DistributedTrainingError(
            f"{request.job_key}: the request was planned for processes {request.spec.processes}, but torchrun started "
            f"{dp.world_size}. Fix: start nodes x --nproc-per-node = {request.spec.processes} processes, or set "
            f"the adapter's processes: {dp.world_size} and plan the request again"
        )
    _join(dp)
    pipes = _pipes_or_none() if dp.is_main else None
    try:
        if pipes is None:
            _train(request, dp, progress=None)
        else:
            with pipes, reporting_to(_forward_progress(pipes)):
                _train(request, dp, progress=pipes.log.info)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    # record: an exception in this process is written to the error file torchrun gives it, and torchrun's own error
    # file then carries its message (failure_reason); a process killed by a signal is reported by torchrun itself
    sys.exit(record(main)())
