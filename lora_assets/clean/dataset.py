"""Cleaning one dataset: the fingerprint that names its output, the stages run in order on one DuckDB connection,
and publishing the result (a complete folder renamed into place, then ``current.json`` pointed at it)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb

from lora_assets.clean.formats import parse_and_shape
from lora_assets.clean.near_dup import mark_near_duplicates
from lora_assets.clean.reading import load_files
from lora_assets.clean.report import CleanError, CleanReport, SourceFile, point_current
from lora_assets.clean.rules import apply_rules, mark_duplicates, mark_template_and_length
from lora_assets.clean.sources import describe_missing, resolve_sources
from lora_assets.clean.split import assign_split, write_splits
from lora_assets.files import sha256_files
from lora_assets.spec import DatasetSpec

#: Part of every fingerprint: raise it when a change here changes any output, so old results are not reused.
CLEANER_VERSION = 4


@dataclass
class _Cleaned:
    """What the stages found, for the report."""

    files: list[SourceFile]
    detected_format: str
    format_reason: str
    pii_redactions: dict[str, int]
    leakage_moved_to_train: int
    counts: dict[str, int]
    by_reason: dict[str, int]
    rows_in: int


def clean_dataset(name: str, spec: DatasetSpec, source: Path | str, out_root: Path, tokenizer=None) -> CleanReport:
    """Clean one dataset into ``out_root/<name>/<fingerprint>/`` and point ``current.json`` at it.

    Args:
        name: dataset name from the spec.
        spec: its settings (format, eval_fraction, max_tokens, pii, near_duplicate_threshold).
        source: the raw file, or a glob of files.
        out_root: the home's ``datasets`` dir.
        tokenizer: a HF tokenizer with a chat template; when given, rows over ``max_tokens`` are quarantined.
    """
    files = resolve_sources(source)
    if not files:
        raise CleanError(
            f"dataset {name!r}: {str(source)!r} {describe_missing(source)}. Fix: correct "
            f"datasets.{name}.path in the spec."
        )
    source_sha = sha256_files(files)
    fingerprint = _fingerprint(source_sha, spec, tokenizer)
    out_dir = Path(out_root) / name / fingerprint
    if (out_dir / "report.json").exists():  # same input, same rules: the result is already there
        report = CleanReport.model_validate_json((out_dir / "report.json").read_text())
    else:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cleaned = _run_stages(files, spec, tokenizer, tmp)
        try:
            report = _report(name, source, source_sha, fingerprint, out_dir, cleaned)
        except CleanError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _publish(tmp, out_dir, report)
    point_current(Path(out_root) / name, out_dir)
    return report


def _fingerprint(source_sha: str, spec: DatasetSpec, tokenizer) -> str:
    """16 hex digits over everything that decides the output: the bytes, the settings, this code, the tokenizer."""
    return hashlib.sha256(
        json.dumps(
            {
                "source_sha256": source_sha,
                "spec": spec.model_dump(exclude={"path", "min_train_rows", "min_eval_rows"}),
                "cleaner": CLEANER_VERSION,
                "tokenizer": tokenizer_id(tokenizer),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]


def tokenizer_id(tokenizer) -> str | None:
    """What the tokenizer is, not where it was loaded from: a hash of its vocabulary, merges, special tokens and
    chat template, so the same data cleaned in two homes (or on two machines) gets the same fingerprint."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: its vocabulary is what counts tokens
        content = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:
        content = backend.to_str()
    content += "\0" + str(getattr(tokenizer, "chat_template", None))
    return hashlib.sha256(content.encode()).hexdigest()


def _run_stages(files: list[Path], spec: DatasetSpec, tokenizer, out: Path) -> _Cleaned:
    """Read, shape, apply the rules, split, and write the three split files into ``out``."""
    con = duckdb.connect()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            encodings = load_files(con, files, Path(scratch))
            sources, fmt_summary, why_summary = parse_and_shape(con, files, encodings, spec.format)
            pii = apply_rules(con, spec.pii)
            if tokenizer is not None:
                mark_template_and_length(con, tokenizer, spec.max_tokens)
            mark_duplicates(con)
            if spec.near_duplicate_threshold is not None:
                mark_near_duplicates(con, spec.near_duplicate_threshold)
            leaked = assign_split(con, spec.eval_fraction)
            write_splits(con, out)
            return _Cleaned(
                files=sources,
                detected_format=fmt_summary,
                format_reason=why_summary,
                pii_redactions=pii,
                leakage_moved_to_train=leaked,
                counts=dict(con.execute("SELECT split, count(*) FROM result GROUP BY split").fetchall()),
                by_reason=dict(
                    con.execute(
                        "SELECT reason, count(*) FROM result WHERE reason IS NOT NULL GROUP BY 1 ORDER BY 1"
                    ).fetchall()
                ),
                rows_in=con.execute("SELECT count(*) FROM result").fetchone()[0],
            )
    finally:
        con.close()


def _report(
    name: str, source: Path | str, source_sha: str, fingerprint: str, out_dir: Path, cleaned: _Cleaned
) -> CleanReport:
    """The report of a finished run; raises when no row is left to train on."""
    if cleaned.counts.get("train", 0) == 0:
        raise CleanError(
            f"dataset {name!r}: no valid training row in {source} ({cleaned.rows_in} rows in, quarantined by "
            f"reason: {cleaned.by_reason}). Fix: check the file's format (detected {cleaned.detected_format}: "
            f"{cleaned.format_reason})."
        )
    report = CleanReport(
        dataset=name,
        source=str(source),
        files=cleaned.files,
        source_sha256=source_sha,
        fingerprint=fingerprint,
        detected_format=cleaned.detected_format,
        format_reason=cleaned.format_reason,
        rows_in=cleaned.rows_in,
        rows_train=cleaned.counts.get("train", 0),
        rows_eval=cleaned.counts.get("eval", 0),
        rows_quarantined=cleaned.counts.get("quarantine", 0),
        by_reason=cleaned.by_reason,
        pii_redactions=cleaned.pii_redactions,
        leakage_moved_to_train=cleaned.leakage_moved_to_train,
        output_dir=str(out_dir),
    )
    if report.rows_in != report.rows_train + report.rows_eval + report.rows_quarantined:
        raise AssertionError(f"cleaning lost rows: {report}")  # a bug in this package, never the data's fault
    return report


def _publish(tmp: Path, out_dir: Path, report: CleanReport) -> None:
    """Write the report into the finished ``tmp`` folder and rename it to ``out_dir`` (readers never see half)."""
    (tmp / "report.json").write_text(report.model_dump_json(indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
