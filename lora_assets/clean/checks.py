"""Checks over the written splits, read back from the files (what the clean asset's blocking checks run)."""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict

from lora_assets.clean.report import CleanReport, read_split


class CheckOutcome(BaseModel):
    """The result of one data-quality check over the written splits."""

    model_config = ConfigDict(extra="forbid")

    passed: bool
    detail: str
    offenders: list[str] = []


def _prompt_key(row: dict) -> str | None:
    prompt = row["messages"][:-1]
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False) if prompt else None


def check_no_leakage(report: CleanReport) -> CheckOutcome:
    """No eval row has the same content or the same prompt as a train row (read back from the files)."""
    train = read_split(report, "train")
    ids = {r["id"] for r in train}
    prompts = {_prompt_key(r) for r in train} - {None}
    leaked = [r["source"] for r in read_split(report, "eval") if r["id"] in ids or _prompt_key(r) in prompts]
    if leaked:
        return CheckOutcome(
            passed=False,
            offenders=leaked[:20],
            detail=f"{len(leaked)} eval row(s) also occur (content or prompt) in train",
        )
    return CheckOutcome(passed=True, detail="no eval row shares its content or prompt with a train row")


def check_no_duplicates(report: CleanReport) -> CheckOutcome:
    """No two kept rows (train and eval together) have the same normalized content."""
    seen: dict[str, str] = {}
    dups = []
    for r in read_split(report, "train") + read_split(report, "eval"):
        if r["id"] in seen:
            dups.append(f"{r['source']} repeats {seen[r['id']]}")
        seen.setdefault(r["id"], r["source"])
    if dups:
        return CheckOutcome(passed=False, detail=f"{len(dups)} duplicate row(s) left", offenders=dups[:20])
    return CheckOutcome(passed=True, detail=f"{len(seen)} kept rows, all distinct")


def check_min_train_rows(report: CleanReport, minimum: int) -> CheckOutcome:
    """At least ``minimum`` train rows remain."""
    n = len(read_split(report, "train"))
    return CheckOutcome(passed=n >= minimum, detail=f"{n} train rows (minimum {minimum})")


def check_min_eval_rows(report: CleanReport, minimum: int) -> CheckOutcome:
    """At least ``minimum`` eval rows remain: evaluation needs them after training, so say it before training."""
    n = len(read_split(report, "eval"))
    if n >= minimum:
        return CheckOutcome(passed=True, detail=f"{n} eval rows (minimum {minimum})")
    field = f"datasets.{report.dataset}"
    moved = (
        f", {report.leakage_moved_to_train} moved to train because their prompt also occurs there"
        if report.leakage_moved_to_train
        else ""
    )
    return CheckOutcome(
        passed=False,
        detail=f"dataset {report.dataset!r} has {'no' if n == 0 else n} eval rows, fewer than "
        f"{field}.min_eval_rows = {minimum} ({report.rows_train} train rows{moved}). Fix: raise "
        f"{field}.eval_fraction or add data (or lower {field}.min_eval_rows).",
    )
