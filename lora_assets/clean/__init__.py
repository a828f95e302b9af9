"""Dataset cleaning on DuckDB: parse, normalize to one chat schema, quarantine bad rows, split train/eval.

Every input row is accounted for: it ends in ``train.jsonl``, ``eval.jsonl`` or ``quarantine.jsonl`` (with its
reason and source reference ``file:line``), and ``report.json`` keeps the counts, so that always
``rows_in == rows_train + rows_eval + rows_quarantined``.

Rules, in the order they are applied (a row gets the first reason that fits):
invalid_utf8, blank_line, invalid_csv, invalid_json, not_an_object, missing_fields, wrong_type, empty_conversation,
unknown_role, empty_prompt, empty_response, no_user_turn, no_final_assistant_turn, consecutive_same_role,
pii (with ``pii: quarantine``), template_no_system_role, template_rejects_row, too_long, duplicate, near_duplicate.

Input: JSON Lines, a JSON array, CSV and Parquet. A UTF-8 byte-order mark is dropped; UTF-16 and UTF-32 text with
a byte-order mark is decoded (without one, the error says what it looks like). CSV is parsed record by record, so a
record that does not parse (a quote left open) is quarantined as ``invalid_csv`` and the rest is kept. In a glob, a
wildcard never enters a symlinked directory.

The split is decided by a hash of each row's normalized content, so it does not depend on row order or on
which other rows are present, and it is the same on every machine. An eval row whose prompt also appears in
train is moved to train (no leakage).

Modules, in the order a run uses them:

- ``sources``: which files a dataset path (a file or a glob) names.
- ``reading``: the files into table ``rows`` (JSON Lines, JSON array, CSV, Parquet; encodings).
- ``formats``: each file's row format, and every row shaped into one message list.
- ``rules``: normalizing, PII, and the quarantine rules (table ``result``); length and exact duplicates.
- ``near_dup``: MinHash/LSH near-duplicates.
- ``split``: the train/eval split and the three split files.
- ``report``: the report and error types, and reading a finished cleaning back.
- ``checks``: the data checks over the written splits.
- ``dataset``: :func:`clean_dataset`, which runs them in order and publishes the result.
"""

from lora_assets.clean.checks import (
    CheckOutcome,
    check_min_eval_rows,
    check_min_train_rows,
    check_no_duplicates,
    check_no_leakage,
)
from lora_assets.clean.dataset import CLEANER_VERSION, clean_dataset
from lora_assets.clean.formats import detect_format
from lora_assets.clean.near_dup import (
    minhash_signatures,
    near_duplicate_of,
    word_trigram_hashes,
    word_trigram_signatures,
)
from lora_assets.clean.report import CleanError, CleanReport, SourceFile, current_clean, read_split
from lora_assets.clean.rules import PII_PATTERNS, PII_PLACEHOLDERS, REASONS
from lora_assets.clean.sources import resolve_sources

__all__ = [
    "CLEANER_VERSION",
    "PII_PATTERNS",
    "PII_PLACEHOLDERS",
    "REASONS",
    "CheckOutcome",
    "CleanError",
    "CleanReport",
    "SourceFile",
    "check_min_eval_rows",
    "check_min_train_rows",
    "check_no_duplicates",
    "check_no_leakage",
    "clean_dataset",
    "current_clean",
    "detect_format",
    "minhash_signatures",
    "near_duplicate_of",
    "read_split",
    "resolve_sources",
    "word_trigram_hashes",
    "word_trigram_signatures",
]
