"""The train/eval split by content hash (with eval rows whose prompt occurs in train moved to train), and writing
the three split files from table ``result``."""

from __future__ import annotations

from pathlib import Path

import duckdb

#: The eval share is decided in steps of 1/10,000 of a row's content hash.
_BUCKETS = 10_000


def assign_split(con: duckdb.DuckDBPyConnection, eval_fraction: float) -> int:
    """Assign train/eval by content hash; move eval rows whose prompt also occurs in train. Returns moved count."""
    con.execute(
        """
        UPDATE result SET split = CASE
            WHEN reason IS NOT NULL THEN 'quarantine'
            WHEN ('0x' || substr(content_hash, 1, 8))::UBIGINT % $buckets < $eval_buckets THEN 'eval'
            ELSE 'train' END""",
        {"buckets": _BUCKETS, "eval_buckets": round(eval_fraction * _BUCKETS)},
    )
    moved = con.execute("""
        UPDATE result SET split = 'train'
        WHERE split = 'eval' AND prompt_hash IN (SELECT prompt_hash FROM result WHERE split = 'train')""").fetchone()
    return int(moved[0]) if moved else 0


def write_splits(con: duckdb.DuckDBPyConnection, out: Path) -> None:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``quarantine.jsonl`` (with reason, ``file:line`` and raw line)
    into ``out``, each in input order. The paths are bound parameters (DuckDB takes ``COPY ... TO ?``)."""
    for split in ("train", "eval"):
        con.execute(
            """
            COPY (SELECT written_messages(messages, has_tools) AS messages,
                         content_hash AS id, file || ':' || line_no AS source,
                         CASE WHEN has_tools THEN tools END AS tools
                  FROM result WHERE split = ? ORDER BY rid)
            TO ? (FORMAT json)""",
            [split, str(out / f"{split}.jsonl")],
        )
    con.execute(
        """
        COPY (SELECT q.reason, q.file || ':' || q.line_no AS source, r.line AS raw
              FROM result q JOIN rows r USING (rid) WHERE q.split = 'quarantine' ORDER BY rid)
        TO ? (FORMAT json)""",
        [str(out / "quarantine.jsonl")],
    )
