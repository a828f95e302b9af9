"""The train asset's data-parallel path: torchrun started through Dagster Pipes.

An adapter with ``processes: N`` > 1 is trained by ``torchrun --nproc-per-node N -m lora_assets.distributed``
(see :mod:`lora_assets.distributed`), run by ``dg.PipesSubprocessClient``. Rank 0 opens the Pipes session: its log
lines arrive as the step's log events, and its progress reports are passed on to :mod:`lora_assets.progress` in this
process (the CLI's live view draws them as it does for in-process training). The manifest rank 0 publishes is read
back for the asset's metadata. A failed run raises :class:`DistributedTrainingError` naming the failed process and
the signal or error, and where a rerun resumes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError  # what PipesSubprocessClient raises; not in `dg.`

from lora_assets.distributed import MANIFEST, PROGRESS_MESSAGE, DistributedTrainingError, TrainingLaunch
from lora_assets.pipeline import Pipeline, launch_record
from lora_assets.progress import report
from lora_assets.train import TrainResult


class _ProgressPassingHandler:
    """Stands in for Dagster's message handler: progress reports go to :func:`lora_assets.progress.report` as they
    arrive, every other message to Dagster's handler."""

    def __init__(self, handler) -> None:
        self._handler = handler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handler, name)

    def handle_message(self, message) -> None:
        params = message.get("params") or {}
        payload = params.get("payload") if message.get("method") == "report_custom_message" else None
        if isinstance(payload, dict) and PROGRESS_MESSAGE in payload:
            p = payload[PROGRESS_MESSAGE]
            report(p["task"], p["done"], p["total"], p["unit"], **p["details"])
            return
        self._handler.handle_message(message)


class ProgressPassingMessageReader(dg.PipesTempFileMessageReader):
    """Dagster's temp-file message reader, passing progress reports on as they arrive (_ProgressPassingHandler)."""

    @contextmanager
    def read_messages(self, handler) -> Iterator[dict]:
        with super().read_messages(_ProgressPassingHandler(handler)) as params:
            yield params


def train_with_torchrun(context: dg.AssetExecutionContext, pipe: Pipeline, key: str) -> TrainResult:
    """Train adapter job ``key`` with its ``processes`` through torchrun and Pipes; returns the manifest's result.

    A finished run of the same run key is returned without starting anything, as in-process training does.
    """
    launch = pipe.plan_training(key)
    if not launch.finished:
        launch.check_machine()
        context.log.info(f"{key}: {launch.command_line}")
        _run(context, launch)
    return pipe.trained(key, launch)


def _run(context: dg.AssetExecutionContext, launch: TrainingLaunch) -> None:
    client = dg.PipesSubprocessClient(message_reader=ProgressPassingMessageReader())
    try:
        client.run(context=context, command=launch.command)
    except DagsterPipesExecutionError as e:
        raise DistributedTrainingError(launch.failure()) from e


def launch_metadata(adapter_dir: str) -> dict:
    """Asset metadata on how a run was trained, from its manifest: world size and launcher command ({} for a run
    trained before lorafoundry recorded them)."""
    return launch_record(json.loads((Path(adapter_dir) / MANIFEST).read_text()))
