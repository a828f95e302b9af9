"""Data-parallel training over several processes: which examples each process trains on, step by step.

The single-epoch guarantee holds across processes because the order is decided here, once, the same on every rank,
instead of by a distributed sampler. The epoch's order is a length-grouped permutation seeded by the spec's seed;
it is cut into global micro-batches of ``batch_size`` examples, exactly as one process would take them, and each
micro-batch is split between the N processes (``batch_size / N`` examples each). The Trainer's data loader is then
given one sequential list per run that accelerate deals out round-robin (batch ``i`` to rank ``i % N``, see
``BatchSamplerShard``), so rank r's i-th batch is its part of global micro-batch i.

The last micro-batch of an epoch is usually short. A distributed sampler would fill it by repeating examples from
the start of the epoch (accelerate's ``even_batches``) or leave the ranks with unequal step counts (a hang in the
next all-reduce). Here each part is filled with *padding examples* instead: one pad token, no label, so they carry
no loss and no gradient, and every rank runs the same number of steps. Their count is recorded in the manifest.

With the loss summed over labelled tokens and divided by the count over all ranks (the Trainer's
``average_tokens_across_devices``), a step's gradient is the one a single process computes on the same global batch.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lora_assets import envs

#: Set to a folder, each rank appends the example ids it trains on, per step, to ``rank-<r>.jsonl`` there (a test and
#: debugging aid: the union over ranks must be the train split, each id once).
RECORD_EXAMPLES_ENV = envs.RECORD_EXAMPLES.name
#: The id of a padding example (see the module docstring).
PADDING_ID = -1


@dataclass(frozen=True)
class DataParallel:
    """Where this process stands in a data-parallel run (from torchrun's environment)."""

    world_size: int
    rank: int
    local_rank: int = 0
    backend: str = "gloo"
    launcher: list[str] = field(default_factory=list)
    """The command line of the process that started this one (torchrun's agent), recorded in the manifest."""

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run dir, the adapter and the manifest; the others only train."""
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def training_arguments(self, batch_size: int) -> dict:
        """TrainingArguments that differ from one process: this rank's share of each batch, and the order as given
        (see :func:`rank_dataset`; a sampler must not reorder it)."""
        return {
            "per_device_train_batch_size": batch_size // self.world_size,
            "train_sampling_strategy": "sequential",
            "ddp_backend": self.backend,
            "ddp_find_unused_parameters": False,  # every LoRA weight is used in every forward
            "average_tokens_across_devices": True,
        }


def epoch_order(lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """The epoch's example order, identical on every rank: a seeded permutation grouped by length in groups of 50
    optimizer batches (transformers' length grouping, as in the one-process run) so packed rows waste little."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(seed)
    return [int(i) for i in get_length_grouped_indices(lengths, batch_size, generator=generator)]


def split_evenly(items: list[int], parts: int) -> list[list[int]]:
    """``items`` cut into ``parts`` contiguous pieces whose sizes differ by at most one (the first ones larger)."""
    base, extra = divmod(len(items), parts)
    out, at = [], 0
    for p in range(parts):
        n = base + (1 if p < extra else 0)
        out.append(items[at : at + n])
        at += n
    return out


def shard_plan(order: list[int], batch_size: int, world_size: int) -> list[list[list[int]]]:
    """For each global micro-batch (``batch_size`` consecutive ids of ``order``), the ids each rank trains on.

    Every id of ``order`` appears exactly once. A part shorter than ``batch_size / world_size`` (only in the last
    micro-batch) is topped up with :data:`PADDING_ID`.
    """
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {world_size} processes")
    per_rank = batch_size // world_size
    plan = []
    for start in range(0, len(order), batch_size):
        parts = split_evenly(order[start : start + batch_size], world_size)
        plan.append([part + [PADDING_ID] * (per_rank - len(part)) for part in parts])
    return plan


def padding_example(pad_id: int) -> dict:
    """One pad token with no label: fills a short part of the last micro-batch, carries no loss."""
    return {"input_ids": [pad_id], "attention_mask": [1], "labels": [-100], "length": 1, "example_id": PADDING_ID}


def rank_dataset(
    examples: list[dict], batch_size: int, gradient_accumulation_steps: int, seed: int, world_size: int, pad_id: int
) -> tuple[list[dict], int]:
    """The list to hand the Trainer with sequential sampling: global micro-batch i's part for rank r sits at
    position ``(i * world_size + r) * batch_size / world_size``, which accelerate deals to rank r. Returns the list
    and the number of padding examples in it."""
    order = epoch_order([len(e["input_ids"]) for e in examples], batch_size * gradient_accumulation_steps, seed)
    padding = padding_example(pad_id)
    out: list[dict] = []
    for parts in shard_plan(order, batch_size, world_size):
        for part in parts:
            out += [padding if i == PADDING_ID else {**examples[i], "example_id": i} for i in part]
    return out, sum(1 for e in out if e["example_id"] == PADDING_ID)


class ExampleRecorder:
    """Appends ``{"step": s, "ids": [...]}`` per micro-batch to ``<folder>/rank-<r>.jsonl`` (see
    :data:`RECORD_EXAMPLES_ENV`); ``step`` is the optimizer step the micro-batch belongs to."""

    def __init__(self, folder: Path, rank: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank-{rank}.jsonl"

    @classmethod
    def from_env(cls, rank: int) -> ExampleRecorder | None:
        folder = envs.RECORD_EXAMPLES.get()
        return cls(Path(folder), rank) if folder else None

    def record(self, step: int, ids: list[int]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "ids": [i for i in ids if i != PADDING_ID]}) + "\n")


def recorded_examples(folder: Path, before_step: int | None = None) -> list[int]:
    """Every example id recorded in ``folder`` by all ranks (with repeats), optionally only for steps before
    ``before_step`` (what a checkpoint at that step holds)."""
    ids: list[int] = []
    for path in sorted(Path(folder).glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if before_step is None or row["step"] < before_step:
                ids += row["ids"]
    return ids


@contextmanager
def main_first(dp: DataParallel | None) -> Iterator[None]:
    """Rank 0 runs the block first (writes a cache, clears the run dir), then the others (which find it done)."""
    if dp is not None and not dp.is_main:
        dp.barrier()
    yield
    if dp is not None and dp.is_main:
        dp.barrier()


class CollatorWithExampleIds:
    """Wraps a collator: takes ``example_id`` off each example and adds the batch's ids as ``example_ids``, which the
    trainer takes off again before the forward pass (and records, see :class:`ExampleRecorder`)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name: str):  # real_tokens / row_tokens of the wrapped collator
        return getattr(self.inner, name)

    def __call__(self, features: list[dict]) -> dict:
        import torch

        ids = [f["example_id"] for f in features]
        batch = self.inner([{k: v for k, v in f.items() if k != "example_id"} for f in features])
        batch["example_ids"] = torch.tensor(ids, dtype=torch.long)
        return batch


#: What the manifest records as the launcher of a run trained in the caller's own process.
IN_PROCESS = "in-process (no launcher)"


def manifest_record(dp: DataParallel | None, batch_size: int, padding_examples: int = 0) -> dict:
    """``data_parallel`` in the manifest: how many processes trained, how they were started, the padding."""
    return {
        "world_size": dp.world_size if dp else 1,
        "backend": dp.backend if dp else None,
        "launcher": shlex.join(dp.launcher) if dp and dp.launcher else IN_PROCESS,
        "per_process_batch_size": batch_size // dp.world_size if dp else batch_size,
        "padding_examples": padding_examples,
    }
