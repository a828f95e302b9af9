"""Data-parallel training (`processes` > 1): torchrun started through Dagster Pipes, each example once per epoch over
all ranks, the same adapter quality as one process, and a killed rank that fails the run cleanly and resumes.

The real runs use 2 processes with gloo on this 2-core machine and the tiny random Llama of ``random_base``. The runs
whose weights or losses are compared pin fp32 (``LORAFOUNDRY_DTYPE``): those equivalences are exact in real arithmetic,
and their tolerances are fp32 rounding. The kill-and-resume run trains in the format this machine picks.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, SequentialSampler

from lora_assets.data_parallel import PADDING_ID, RECORD_EXAMPLES_ENV, rank_dataset, recorded_examples, shard_plan
from lora_assets.distributed import failure_reason
from lora_assets.hardware import DTYPE_ENV
from lora_assets.home import Home
from lora_assets.spec import AdapterSpec, SpecError, validate_spec
from lora_assets.train import run_config
from orchestration.assets import build_assets
from orchestration.resources import resources_from_env

BATCH = 10  # 5 per process; the split below leaves a short last batch, so padding is exercised
KILL_AFTER_STEP = 10
TRAIN = dg.AssetKey(["adapter", "a", "train"])


# ---- the plan: pure functions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "batch", "world"), [(1, 8, 2), (16, 8, 2), (17, 8, 2), (21, 8, 2), (23, 6, 3), (100, 12, 4), (7, 4, 4)]
)
def test_shard_plan_gives_each_example_once_and_every_rank_the_same_steps(n, batch, world):
    plan = shard_plan(list(range(n)), batch, world)
    ids = [i for parts in plan for part in parts for i in part if i != PADDING_ID]
    assert sorted(ids) == list(range(n))
    assert all(len(parts) == world and all(len(p) == batch // world for p in parts) for parts in plan)
    assert len(plan) == -(-n // batch)  # the micro-batches one process takes
    assert all(PADDING_ID not in part for parts in plan[:-1] for part in parts)  # padding only at the end


def test_accelerate_deals_each_rank_its_part_of_every_batch():
    """What the Trainer's data loader does with the list rank_dataset builds: accelerate's BatchSamplerShard deals
    batch i to rank i % N. Each rank must get exactly its parts, nothing repeated to even the ranks out."""
    examples = [{"input_ids": [1] * (i % 7 + 1), "labels": [1] * (i % 7 + 1)} for i in range(23)]
    dataset, padding = rank_dataset(examples, 6, 1, seed=0, world_size=3, pad_id=0)
    plan = shard_plan([e["example_id"] for e in dataset if e["example_id"] != PADDING_ID], 6, 3)
    for rank in range(3):
        shard = BatchSamplerShard(BatchSampler(SequentialSampler(dataset), 2, False), 3, rank)
        got = [[dataset[i]["example_id"] for i in batch] for batch in shard]
        assert got == [parts[rank] for parts in plan]
    assert padding == sum(i == PADDING_ID for parts in plan for part in parts for i in part) == 1


def test_processes_must_split_the_batch_evenly(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    raw = {"base_model": "builtin:tiny", "datasets": {"d": {"path": "d.jsonl"}}, "adapters": {}}
    raw["adapters"]["a"] = {"dataset": "d", "batch_size": 8, "processes": 3}
    with pytest.raises(SpecError) as e:
        validate_spec(raw, tmp_path)
    (problem,) = e.value.problems
    assert problem.startswith("adapters.a") and "batch_size 6 or batch_size 9" in problem
    raw["adapters"]["a"]["processes"] = 0
    with pytest.raises(SpecError, match="processes"):
        validate_spec(raw, tmp_path)


def test_one_process_keeps_the_run_key_and_more_change_it():
    assert "processes" not in run_config(AdapterSpec(dataset="d"))
    assert run_config(AdapterSpec(dataset="d", processes=2))["processes"] == 2


def test_more_processes_than_this_machine_has_devices_are_refused_before_launch():
    from lora_assets.distributed import DistributedTrainingError, check_local_devices
    from lora_assets.hardware import usable_cpus

    check_local_devices(usable_cpus())
    with pytest.raises(DistributedTrainingError, match=f"processes {usable_cpus() + 1} on a machine with"):
        check_local_devices(usable_cpus() + 1)


def test_failure_reason_names_the_rank_and_the_signal(tmp_path):
    failures = tmp_path / "failures.json"
    assert "without recording" in failure_reason(failures, 1)
    failures.write_text(
        json.dumps(
            {
                "failures": [
                    {"rank": 1, "local_rank": 1, "pid": 42, "exitcode": -9, "signal": "SIGKILL", "message": ""},
                    {"rank": 0, "local_rank": 0, "pid": 41, "exitcode": 1, "signal": None, "message": "T\nError: x"},
                ]
            }
        )
    )
    assert failure_reason(failures, 1) == (
        "rank 1 (pid 42) was killed by signal SIGKILL; rank 0 (pid 41) exited with code 1: Error: x"
    )


# ---- real runs: torchrun with 2 processes (gloo) through Dagster Pipes -----------------------------------------


def _spec(base: Path, folder: Path, processes: int, **adapter):
    return validate_spec(
        {
            "base_model": str(base),
            "datasets": {"d": {"path": "d.jsonl"}},
            "adapters": {
                "a": {
                    "dataset": "d",
                    "processes": processes,
                    "batch_size": BATCH,
                    "learning_rate": 2e-3,
                    "checkpoint_every": 5,
                    "max_eval_rows": 40,
                    "lora_dropout": 0.0,  # dropout masks differ with the split: without it, runs can be compared
                    **adapter,
                }
            },
        },
        folder,
    )


@pytest.fixture(scope="module")
def task(tmp_path_factory, random_base):
    """300 rows of the demo's categories task, cleaned once; each test trains in a home of its own."""
    folder = tmp_path_factory.mktemp("ddp-task")
    rows = (Path(__file__).resolve().parents[1] / "examples" / "data" / "categories.jsonl").read_text().splitlines()
    (folder / "d.jsonl").write_text("\n".join(rows[:300]) + "\n")
    return folder


def _pipeline(task: Path, random_base: Path, home: str, processes: int, **adapter):
    from lora_assets.pipeline import Pipeline

    pipe = Pipeline(_spec(random_base, task, processes, **adapter), task / home)
    pipe.clean("d")
    return pipe


def _train_assets(pipe):
    """The train asset's data-parallel path as an asset of its own, without the spec's train asset's retry policy
    (which would resume a killed run at once, within the same materialization)."""
    from orchestration.training_launch import launch_metadata, train_with_torchrun

    @dg.asset(name="train")
    def train(context):
        r = train_with_torchrun(context, pipe, "a")
        return dg.MaterializeResult(metadata={"steps": r.steps, **launch_metadata(r.adapter_dir)})

    return [train]


def _materialize(pipe, instance):
    return dg.materialize(_train_assets(pipe), instance=instance, raise_on_error=False)


@pytest.fixture(scope="module")
def two_process_run(task, random_base, tmp_path_factory):
    """One 2-process run through the spec's train asset (the clean step ran before, outside Dagster), recording
    which examples each rank trained on and what progress reached this process. In fp32 on every machine (the
    ranks inherit the environment), for the tests that compare it with one process."""
    from lora_assets.progress import reporting_to

    pipe = _pipeline(task, random_base, "home-2", 2)
    record = tmp_path_factory.mktemp("ddp-record")
    reports = []
    instance = dg.DagsterInstance.ephemeral()
    mp = pytest.MonkeyPatch()
    mp.setenv(RECORD_EXAMPLES_ENV, str(record))
    mp.setenv(DTYPE_ENV, "float32")
    try:
        with reporting_to(reports.append):
            result = dg.materialize(
                build_assets(pipe.spec, deployment=False),
                selection=[TRAIN],
                resources=resources_from_env(pipe.home),
                instance=instance,
                raise_on_error=False,
            )
    finally:
        mp.undo()
    assert result.success, _failure_text(result)
    return pipe, result, instance, record, reports


def _failure_text(result) -> str:
    return "\n".join(
        e.event_specific_data.error.to_string() for e in result.all_events if e.event_type_value == "STEP_FAILURE"
    )


def _manifest(pipe) -> dict:
    return json.loads((pipe.adapter_dir("a") / "training_manifest.json").read_text())


@pytest.mark.slow
def test_two_processes_train_every_example_exactly_once(two_process_run):
    pipe, result, _, record, _ = two_process_run
    manifest = _manifest(pipe)
    n = manifest["result"]["examples"]
    assert n % BATCH, "the data should leave a short last batch, to exercise the padding"
    ids = recorded_examples(record)
    assert sorted(ids) == list(range(n))  # the train split, each example once, over both ranks
    for rank in (0, 1):  # and both ranks trained
        assert (record / f"rank-{rank}.jsonl").read_text().strip()
    assert manifest["steps_per_epoch"] == manifest["result"]["steps"] == -(-n // BATCH)
    last = n % BATCH
    assert manifest["data_parallel"]["padding_examples"] == BATCH - last


@pytest.mark.slow
def test_manifest_metadata_and_logs_say_how_it_was_launched(two_process_run):
    pipe, result, instance, _, reports = two_process_run
    dp = _manifest(pipe)["data_parallel"]
    assert dp["world_size"] == 2 and dp["backend"] == "gloo" and dp["per_process_batch_size"] == BATCH // 2
    assert "--nproc-per-node 2" in dp["launcher"] and "-m lora_assets.distributed" in dp["launcher"]
    (mat,) = [m for m in result.get_asset_materialization_events() if m.asset_key == TRAIN]
    mat = mat.materialization
    assert mat.metadata["world_size"].value == 2 and mat.metadata["launcher"].value == dp["launcher"]
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any("a: step " in m and " loss " in m for m in logs), "rank 0's log lines reach Dagster"
    steps = [r for r in reports if r.task == "training"]
    assert steps and steps[-1].done == steps[-1].total == _manifest(pipe)["steps_per_epoch"]


@pytest.mark.slow
def test_registry_records_world_size_and_launcher(two_process_run):
    pipe = two_process_run[0]
    pipe.evaluate("a")
    record = pipe.register("a")
    assert record.training_config["world_size"] == 2
    assert record.training_config["launcher"] == _manifest(pipe)["data_parallel"]["launcher"]


@pytest.mark.slow
def test_two_processes_match_one_process_on_held_out_loss(two_process_run, task, random_base, monkeypatch):
    """Same global batches and schedule, so the same quality: the held-out loss gains of the 2-process and the
    in-process adapter agree within 0.05 nats (measured in fp32: 0.933 vs 0.942)."""
    monkeypatch.setenv(DTYPE_ENV, "float32")  # the format the 2-process run trained in and the bound was measured in
    two = two_process_run[0]
    one = _pipeline(task, random_base, "home-1", 1)
    one.train("a")
    assert _manifest(one)["data_parallel"] == {
        "world_size": 1,
        "backend": None,
        "launcher": "in-process (no launcher)",
        "per_process_batch_size": BATCH,
        "padding_examples": 0,
    }
    gain_one = one.evaluate("a").metrics["eval_loss"]["gain"]
    gain_two = two.evaluate("a").metrics["eval_loss"]["gain"]
    assert gain_one > 0.5, "the task must be learnable in one epoch for the comparison to mean anything"
    assert abs(gain_two - gain_one) <= 0.05, (gain_one, gain_two)


@pytest.mark.slow
def test_two_processes_train_the_adapter_one_process_trains_on_the_same_batches(two_process_run, tmp_path):
    """The gradient of a step over 2 ranks is the one-process gradient of the same global batch: one process given
    the same plan (world size 1 in a one-process gloo group) ends at the same weights, to fp32 rounding.

    Pinned to fp32, both runs: the claim is an exact equivalence, and fp32 rounding is the tolerance. Under bf16
    autocast the ranks' and the one process's products group the batch's tokens differently and round them to bf16
    (unit roundoff 2^-8 against fp32's 2^-24), and the epoch's updates carry that on: measured on an AVX-512-BF16
    EPYC, the weights end 4.6e-3 apart, ~400 times this bound, which would leave the test unable to see a
    data-parallel bug of that size."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from lora_assets.clean import current_clean
    from lora_assets.data_parallel import DataParallel
    from lora_assets.train import train_adapter
    from tests.conftest import free_port

    pipe = two_process_run[0]
    mp = pytest.MonkeyPatch()
    mp.setenv("MASTER_ADDR", "127.0.0.1")
    mp.setenv("MASTER_PORT", str(free_port()))
    mp.setenv(DTYPE_ENV, "float32")  # as two_process_run trained
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        one = train_adapter(
            "a",
            pipe.jobs["a"].spec,
            pipe.base,
            current_clean(pipe.datasets_dir, "d"),
            Home.at(tmp_path),
            data_parallel=DataParallel(world_size=1, rank=0),
        )
    finally:
        dist.destroy_process_group()
        mp.undo()
    want = load_file(Path(one.adapter_dir) / "adapter_model.safetensors")
    got = load_file(pipe.adapter_dir("a") / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:  # measured: largest difference 5e-6 of the largest weight
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-4 * float(want[k].abs().max()))


def _rank_process(local_rank: int):
    import psutil

    for p in psutil.Process().children(recursive=True):
        try:
            if "lora_assets.distributed" in p.cmdline() and p.environ().get("LOCAL_RANK") == str(local_rank):
                return p
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.mark.slow
def test_killed_rank_fails_the_run_cleanly_and_a_rerun_resumes(task, random_base, tmp_path, monkeypatch):
    from lora_assets.train import latest_complete_checkpoint

    pipe = _pipeline(task, random_base, "home-kill", 2)
    launch = pipe.plan_training("a")
    checkpoints = launch.adapter_dir.with_name(launch.adapter_dir.name + ".tmp") / "checkpoints"
    monkeypatch.setenv(RECORD_EXAMPLES_ENV, str(tmp_path / "killed"))
    outcome = []

    def materialize() -> None:
        with dg.DagsterInstance.ephemeral() as instance:  # made, used and closed in the run's own thread
            outcome.append(_materialize(pipe, instance))

    run = threading.Thread(target=materialize)
    run.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and run.is_alive():
        ckpt = latest_complete_checkpoint(checkpoints)
        if ckpt is not None and int(ckpt.name.split("-")[1]) >= KILL_AFTER_STEP:
            break
        time.sleep(0.1)
    rank1 = _rank_process(1)
    assert rank1 is not None and run.is_alive(), "the run ended before a rank could be killed"
    killed_at = time.monotonic()
    rank1.kill()
    run.join(120)
    assert not run.is_alive(), "the run hangs after a rank died"
    assert time.monotonic() - killed_at < 60
    (result,) = outcome
    assert not result.success
    error = _failure_text(result)
    assert f"rank 1 (pid {rank1.pid}) was killed by signal SIGKILL" in error, error  # whole text: a rare miss
    assert "a rerun resumes from checkpoint-" in error, error  # under load (2026-12-07) is not understood yet
    assert _rank_process(0) is None and _rank_process(1) is None  # no process left behind

    monkeypatch.setenv(RECORD_EXAMPLES_ENV, str(tmp_path / "resumed"))
    resumed = _materialize(pipe, dg.DagsterInstance.ephemeral())
    assert resumed.success, _failure_text(resumed)
    manifest = _manifest(pipe)
    start = manifest["resumed_from_step"]
    assert start >= KILL_AFTER_STEP and manifest["result"]["steps"] == manifest["steps_per_epoch"]
    # what the checkpoint held (steps before it, from the killed run) plus what the rerun trained: the split, once
    ids = recorded_examples(tmp_path / "killed", before_step=start) + recorded_examples(tmp_path / "resumed")
    assert sorted(ids) == list(range(manifest["result"]["examples"]))
