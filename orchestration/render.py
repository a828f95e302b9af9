"""What the `lorafoundry` commands print: rich tables for people, one JSON object per line for programs.

Each function takes what a library call returned and gives a table (or writes JSON lines); the commands in
``orchestration/cli.py`` only parse arguments, call the library and hand the result here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from rich.table import Table

from registry.metrics import CHRF, CONTAINS, EVAL_LOSS, EXACT_MATCH
from registry.rules import SERVABLE_STATUSES

#: The metrics `registry list` shows per version (base → adapter).
LISTED_METRICS = (EXACT_MATCH.name, EVAL_LOSS.name)
#: The metrics the summary after `run` and `demo` shows per adapter (base → adapter).
SUMMARY_METRICS = (EXACT_MATCH.name, CONTAINS.name, CHRF.name, EVAL_LOSS.name)


def json_lines(items: Iterable[BaseModel | dict[str, Any]], compact: bool = False) -> None:
    """Write each item as one JSON object per line on stdout: a model by its JSON dump (pydantic's own, without
    spaces, when ``compact``), a dict with values JSON lacks (times) as text."""
    for item in items:
        if isinstance(item, BaseModel) and compact:
            sys.stdout.write(item.model_dump_json() + "\n")
            continue
        data = item.model_dump(mode="json") if isinstance(item, BaseModel) else item
        sys.stdout.write(json.dumps(data, default=str) + "\n")


def _pair(metric: dict[str, float], digits: int = 3) -> str:
    nan = float("nan")
    return f"{metric.get('base', nan):.{digits}f} → {metric.get('adapter', nan):.{digits}f}"


def records_table(records: list) -> Table:
    """Registered versions, one row each (`registry list`)."""
    table = Table(title=f"{len(records)} adapter version(s)")
    for col in ("name", "version", "status", "method", "r", "alpha", *LISTED_METRICS, "sha256", "created"):
        table.add_column(col)
    for r in records:
        table.add_row(
            r.name,
            str(r.version),
            r.status,
            r.method,
            str(r.r),
            str(r.lora_alpha),
            *(_pair(r.metrics.get(m, {})) for m in LISTED_METRICS),
            r.adapter_sha256[:12],
            r.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    return table


_SHOWN_FIELDS = (
    "base_model",
    "base_model_hash",
    "method",
    "r",
    "lora_alpha",
    "target_modules",
    "dataset",
    "dataset_fingerprint",
    "path",
    "adapter_sha256",
    "size_bytes",
    "trainable_params",
    "created_at",
    "run_id",
    "code_version",
)


def record_table(rec, aliases: dict[str, int]) -> Table:
    """One version with its metrics and the name's aliases (`registry show`)."""
    data = rec.model_dump(mode="json")
    table = Table(title=f"{rec.name}@{rec.version} ({rec.status})", show_header=False)
    for key in _SHOWN_FIELDS:
        table.add_row(key, str(data[key]))
    for m, v in rec.metrics.items():
        table.add_row(f"metric {m}", _pair(v, digits=4))
    table.add_row("aliases", ", ".join(f"{a} → v{v}" for a, v in aliases.items()) or "-")
    return table


def _sweep_point(row: dict[str, Any]) -> dict[str, Any]:
    point = row["sweep_point"]
    return (json.loads(point) if isinstance(point, str) else point) or {}


def leaderboard_table(name: str, rows: list[dict[str, Any]]) -> Table:
    """Versions of ``name`` ranked by their rank metric, the winner marked (`registry leaderboard`)."""
    from registry import leaderboard

    metric = rows[0]["rank_metric"]
    table = Table(title=f"{name}: versions ranked by {metric}")
    for col in ("rank", "version", "point", metric, "status", "trainable params", "train s", "peak MB"):
        table.add_column(col)
    for r in rows:
        winner = r["rank"] == 1 and r["status"] in SERVABLE_STATUSES
        table.add_row(
            f"{r['rank']}{' winner' if winner else ''}",
            str(r["version"]),
            leaderboard.point_label(_sweep_point(r)),
            "" if r["metric_value"] is None else f"{r['metric_value']:.4f}",
            r["status"],
            f"{r['trainable_params'] or 0:,}",
            f"{r['train_wall_s'] or 0:.1f}",
            f"{r['peak_memory_mb'] or 0:.0f}",
        )
    return table


def seeds_table(name: str, groups: list[dict[str, Any]]) -> Table:
    """Sweep points across seeds: mean and 95% CI each (`registry leaderboard --across-seeds`)."""
    table = Table(title=f"{name}: {groups[0]['metric']} per sweep point across seeds (mean, 95% t CI)")
    for col in ("rank", "point", "seeds", "mean", "95% CI", "trainable params"):
        table.add_column(col)
    for i, g in enumerate(groups, 1):
        table.add_row(
            str(i),
            g["label"],
            str(g["seeds"]),
            f"{g['mean']:.4f}",
            f"[{g['ci_low']:.4f}, {g['ci_high']:.4f}]",
            f"{g['trainable_params'] or 0:,}",
        )
    return table


def verify_table(results: list) -> Table:
    """Each version's hash check (`registry verify`)."""
    table = Table(title=f"verified {len(results)} version(s)")
    for col in ("name", "version", "ok", "detail"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, str(r.version), "ok" if r.ok else "[red]CHANGED[/red]", r.detail)
    return table


def rows_table(cols: list[str], rows: list[tuple]) -> Table:
    """A query's result (`registry sql`)."""
    table = Table(title=f"{len(rows)} row(s)")
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    return table


def clean_report_table(name: str, report) -> Table:
    """One dataset's cleaning report (`clean`)."""
    table = Table(title=f"dataset {name} ({report.detected_format}) → {report.output_dir}")
    table.add_column("count")
    table.add_column("rows", justify="right")
    for label, value in (
        ("in", report.rows_in),
        ("train", report.rows_train),
        ("eval", report.rows_eval),
        ("quarantined", report.rows_quarantined),
        ("moved eval → train (leakage)", report.leakage_moved_to_train),
    ):
        table.add_row(label, str(value))
    for reason, n in report.by_reason.items():
        table.add_row(f"  quarantined: {reason}", str(n))
    for kind, n in report.pii_redactions.items():
        table.add_row(f"  redacted: {kind}", str(n))
    return table
