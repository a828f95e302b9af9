"""What the registry records, as typed models: a registered version (:class:`AdapterRecord`, a row of `adapters`),
what a caller supplies to register one (:class:`NewAdapter`), a verification's outcome; how a row maps to a record
and back, in one place; and the content hash a version is identified by.

Plain pydantic over paths: imports no DuckDB, so code that only reads records (a model card) needs no database.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from registry.adapter_files import CONFIG_FILE, WEIGHTS_FILE
from registry.location import is_object_url
from registry.metrics import DEFAULT_RANK_METRIC
from registry.promotion import PromoteRule
from registry.rules import Status

#: The files of an adapter that its sha256 is over, and that a server loads.
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)


class AdapterRecord(BaseModel):
    """One registered adapter version (a row of `adapters`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Adapter name (the name rule, `registry.rules.NAME_RULE`); served under it.")
    version: int = Field(description="1, 2, ... per name, assigned at registration; never reused.")
    status: Status = Field(
        description="candidate (servable), champion (servable, what the plain name serves; at most one per name), "
        "rejected (failed its gate) or archived (retired); never served when rejected or archived."
    )
    base_model: str = Field(description="The base model as given: a local dir, a builtin: name or a hub id.")
    base_model_hash: str | None = Field(
        None, description="Content hash of the base's weights; a server loads only versions trained on its base."
    )
    method: str = Field(description="How it was trained: lora, qlora, dora, ...")
    r: int = Field(description="LoRA rank, from adapter_config.json.")
    lora_alpha: int = Field(description="LoRA alpha, from adapter_config.json.")
    target_modules: list[str] = Field(description="Modules the adapter wraps, sorted, from adapter_config.json.")
    training_config: dict[str, Any] = Field(
        default_factory=dict,
        description="The training settings, plus `rank_metric` (what the leaderboard ranks by), sweep point, "
        "wall time and peak memory when known.",
    )
    dataset: str | None = Field(None, description="The dataset it was trained on (lineage).")
    dataset_fingerprint: str | None = Field(None, description="Fingerprint of the cleaned dataset it was trained on.")
    path: str = Field(description="The adapter dir, absolute (stored relative to the registry's dir when inside it).")
    adapter_sha256: str = Field(description="sha256 over adapter_config.json and adapter_model.safetensors.")
    size_bytes: int = Field(description="Total size of those two files.")
    trainable_params: int | None = Field(None, description="Trainable parameters of the adapter, when known.")
    metrics: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Evaluation per metric: {metric: {base, adapter, gain, ...}}, e.g. eval_loss, exact_match.",
    )
    created_at: datetime = Field(description="When this version was registered (UTC, naive).")
    run_id: str | None = Field(None, description="The Dagster run that registered it, if any.")
    code_version: str | None = Field(None, description="The lorafoundry code version that trained it, if known.")


class NewAdapter(BaseModel):
    """What a caller supplies to register an adapter; version, hash, size and time are assigned here."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Name to register under (the name rule, `registry.rules.NAME_RULE`).")
    path: Path = Field(description="A peft LoRA dir: adapter_config.json and adapter_model.safetensors.")
    status: Literal["candidate", "rejected"] = Field(
        "candidate", description="`rejected` when it failed its quality gate (registered, never served)."
    )
    base_model: str = Field(description="The base model: a local dir, a builtin: name or a hub id.")
    base_model_hash: str | None = Field(
        None, description="Content hash of the base's weights; None when the base is not on this machine."
    )
    method: str = Field("lora", description="How it was trained: lora, qlora, dora, ...")
    training_config: dict[str, Any] = Field(default_factory=dict, description="The training settings (lineage).")
    dataset: str | None = Field(None, description="The dataset it was trained on (lineage).")
    dataset_fingerprint: str | None = Field(None, description="Fingerprint of the cleaned dataset.")
    trainable_params: int | None = Field(None, description="Trainable parameters, when known.")
    metrics: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Evaluation per metric: {metric: {base, adapter, ...}}; empty: not evaluated."
    )
    run_id: str | None = Field(None, description="The Dagster run registering it, if any.")
    code_version: str | None = Field(None, description="The lorafoundry code version that trained it, if known.")
    promote: PromoteRule = Field(
        "manual",
        description="Make a `candidate` the champion of its name: if it beats the current champion on "
        "`rank_metric`, if `evidence` shows a significant paired win over the current champion, always, or only "
        "by an explicit promote.",
    )
    evidence: dict[str, Any] | None = Field(
        None,
        description="For `if_significantly_better`: the comparison with the champion (lora_assets.evidence.Evidence: "
        "champion_version, significant, the interval, detail); recorded with the promotion or its refusal.",
    )
    rank_metric: str = Field(DEFAULT_RANK_METRIC, description="Metric the champion rule compares (adapter value).")


#: The columns of `adapters`, in order: the fields of :class:`AdapterRecord`.
COLUMNS = list(AdapterRecord.model_fields)


class VerifyResult(BaseModel):
    """Whether one registered version's files still hash to the registered sha256."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Adapter name.")
    version: int = Field(description="Adapter version.")
    ok: bool = Field(description="Whether the files hash to the registered sha256.")
    detail: str = Field(description="`ok`, or what differs (the two hashes) or why the files cannot be read.")
    path: str = Field(description="The adapter dir that was hashed.")


def adapter_sha256(adapter_dir: Path) -> tuple[str, int]:
    """sha256 over the adapter's config and weights (file names and bytes), and their total size."""
    h = hashlib.sha256()
    size = 0
    for fname in ADAPTER_FILES:
        f = Path(adapter_dir) / fname
        h.update(fname.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
    return h.hexdigest(), size


def to_record(row: tuple, base: Path | None) -> AdapterRecord:
    """A row of `adapters` as a record; a relative ``path`` is resolved against ``base`` (the registry's dir; None
    for a shared registry, which stores absolute paths only)."""
    data = dict(zip(COLUMNS, row, strict=True))
    if base is not None and not is_object_url(data["path"]) and not Path(data["path"]).is_absolute():
        data["path"] = str(base / data["path"])
    data["training_config"] = json.loads(data["training_config"] or "{}")
    data["metrics"] = json.loads(data["metrics"] or "{}")
    return AdapterRecord.model_validate(data)


def new_row(new: NewAdapter, cfg: dict, version: int, sha: str, size: int, now: datetime, path: str) -> dict[str, Any]:
    """The `adapters` row of a new version (JSON columns as text), in column order."""
    row = {
        "name": new.name,
        "version": version,
        "status": new.status,
        "base_model": new.base_model,
        "base_model_hash": new.base_model_hash,
        "method": new.method,
        "r": int(cfg["r"]),
        "lora_alpha": int(cfg["lora_alpha"]),
        "target_modules": sorted(cfg["target_modules"]),
        "training_config": json.dumps({**new.training_config, "rank_metric": new.rank_metric}),
        "dataset": new.dataset,
        "dataset_fingerprint": new.dataset_fingerprint,
        "path": path,
        "adapter_sha256": sha,
        "size_bytes": size,
        "trainable_params": new.trainable_params,
        "metrics": json.dumps(new.metrics),
        "created_at": now,
        "run_id": new.run_id,
        "code_version": new.code_version,
    }
    return {c: row[c] for c in COLUMNS}
