"""What cleaning produces and raises: the report written as ``report.json``, the error, and reading a finished
cleaning back (``current.json`` names the dataset's current output folder)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lora_assets.files import write_json_atomic

#: The file in ``<datasets>/<name>/`` that names the dataset's current output folder.
CURRENT_POINTER = "current.json"


class CleanError(ValueError):
    """The dataset cannot be cleaned at all (missing file, unreadable file, unknown format, no valid row)."""


class SourceFile(BaseModel):
    """One input file of a dataset, as cleaning read it."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="The file's path, as the dataset path or its glob gave it.")
    format: str = Field(description="Row format used for this file: messages, alpaca, sharegpt, ... .")
    format_reason: str = Field(description="Why that format: declared in the spec, or the keys that detected it.")
    rows: int = Field(description="Rows read from this file (lines, records or elements), bad ones included.")
    encoding: str = Field(
        "UTF-8", description="The text encoding its byte-order mark declares; UTF-16/32 says it was decoded."
    )


class MixtureSource(BaseModel):
    """One source of a mixture: what it offered and what it gave."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="The source dataset's name.")
    weight: float = Field(description="Its weight, normalized so that a mixture's weights sum to 1.")
    fingerprint: str = Field(description="The fingerprint of the source's cleaning used (lineage).")
    rows_available: int = Field(description="Train rows the source's cleaning has.")
    rows_selected: int = Field(description="Train rows the mixture took from it (each trained once).")
    duplicates_skipped: int = Field(description="Its rows skipped because an earlier source gave the same row.")
    rows_eval: int = Field(description="Its eval rows in the mixture's eval split.")
    eval_leaks_dropped: int = Field(description="Its eval rows left out because their prompt is a training prompt.")


class CleanReport(BaseModel):
    """What cleaning did to one dataset. Written as report.json next to the splits.

    Always ``rows_in == rows_train + rows_eval + rows_quarantined``.
    """

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="The dataset's name (its key under `datasets` in the spec).")
    source: str = Field(description="The dataset path as given: one file or a glob.")
    files: list[SourceFile] = Field(description="Every file the path named, in the order read.")
    source_sha256: str = Field(description="SHA-256 over the files' names and bytes, in order.")
    fingerprint: str = Field(
        description="16 hex digits over the source hash, the cleaning settings, the cleaner version and the "
        "tokenizer: the name of the output folder, and what training and evaluation key their caches on."
    )
    detected_format: str = Field(description="The files' format, or `mixed: a, b` when they differ.")
    format_reason: str = Field(description="Per file, why its format was chosen.")
    rows_in: int = Field(description="Rows read over all files.")
    rows_train: int = Field(description="Rows written to train.jsonl.")
    rows_eval: int = Field(description="Rows written to eval.jsonl.")
    rows_quarantined: int = Field(description="Rows written to quarantine.jsonl, each with its reason.")
    by_reason: dict[str, int] = Field(description="Quarantined rows per reason (only reasons that occurred).")
    pii_redactions: dict[str, int] = Field(
        description="With `pii: redact`, replacements per kind (email, ipv4, phone) over the rows that pass the "
        "format and message rules (before the length and duplicate rules); empty otherwise."
    )
    leakage_moved_to_train: int = Field(
        description="Eval rows moved to train because their prompt also occurs in train."
    )
    output_dir: str = Field(description="The folder holding train.jsonl, eval.jsonl, quarantine.jsonl and this report.")
    mixture: list[MixtureSource] = Field(
        default_factory=list,
        description="For a weighted mixture of datasets (lora_assets/mixture.py): each source's weight, cleaning "
        "fingerprint and rows selected; empty for a dataset cleaned from files.",
    )


def point_current(dataset_dir: Path, out_dir: Path) -> None:
    """Make ``out_dir`` the dataset's current cleaning (readers see the old pointer or the new, never half)."""
    write_json_atomic(dataset_dir / CURRENT_POINTER, {"fingerprint": out_dir.name, "dir": str(out_dir)})


def current_clean(datasets_root: Path, name: str) -> CleanReport:
    """The report of the last cleaning of dataset ``name`` (raises if it was never cleaned)."""
    pointer = Path(datasets_root) / name / CURRENT_POINTER
    if not pointer.exists():
        raise CleanError(
            f"dataset {name!r} has not been cleaned yet. Fix: materialize dataset/{name}/clean "
            "first (or run `lorafoundry run SPEC`)."
        )
    out_dir = Path(json.loads(pointer.read_text())["dir"])
    return CleanReport.model_validate_json((out_dir / "report.json").read_text())


def read_split(report: CleanReport, split: str) -> list[dict]:
    """Rows of one split (``train``, ``eval`` or ``quarantine``) as dicts."""
    path = Path(report.output_dir) / f"{split}.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
