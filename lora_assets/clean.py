"""Dataset cleaning on DuckDB: parse, normalize to one chat schema, quarantine bad rows, split train/eval.

Every input row is accounted for: it ends in ``train.jsonl``, ``eval.jsonl`` or ``quarantine.jsonl`` (with
its reason and source line), and ``report.json`` keeps the counts, so that always
``rows_in == rows_train + rows_eval + rows_quarantined``.

The split is decided by a hash of each row's normalized content, so it does not depend on row order or on
which other rows are present, and it is the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import duckdb
from pydantic import BaseModel, ConfigDict

from lora_assets.spec import DatasetSpec

CLEANER_VERSION = 1

_MESSAGE_LIST = '[{"role": "VARCHAR", "content": "VARCHAR"}]'
_SHAREGPT_LIST = '[{"from": "VARCHAR", "value": "VARCHAR"}]'

#: Per format: SQL turning one parsed JSON row `j` into a list of {role, content} structs.
_TO_MESSAGES = {
    "messages": f"json_transform(j->'$.messages', '{_MESSAGE_LIST}')",
    "sharegpt": (
        f"list_transform(json_transform(j->'$.conversations', '{_SHAREGPT_LIST}'), lambda m: {{'role': "
        "CASE m.from WHEN 'human' THEN 'user' WHEN 'user' THEN 'user' WHEN 'gpt' THEN 'assistant' "
        "WHEN 'assistant' THEN 'assistant' WHEN 'system' THEN 'system' ELSE m.from END, 'content': m.value})"
    ),
    "alpaca": (
        "list_concat("
        "CASE WHEN coalesce(trim(j->>'$.system'), '') <> '' "
        "THEN [{'role': 'system', 'content': j->>'$.system'}] ELSE [] END, "
        "[{'role': 'user', 'content': CASE WHEN coalesce(trim(j->>'$.input'), '') <> '' "
        "THEN concat(j->>'$.instruction', chr(10), chr(10), j->>'$.input') ELSE j->>'$.instruction' END}, "
        "{'role': 'assistant', 'content': j->>'$.output'}])"
    ),
    "prompt_completion": (
        "[{'role': 'user', 'content': j->>'$.prompt'}, {'role': 'assistant', 'content': j->>'$.completion'}]"
    ),
}

#: Keys that identify each format in `auto` detection, in priority order.
_FORMAT_KEYS = [
    ("messages", {"messages"}),
    ("sharegpt", {"conversations"}),
    ("alpaca", {"instruction", "output"}),
    ("prompt_completion", {"prompt", "completion"}),
]


class CleanReport(BaseModel):
    """What cleaning did to one dataset. Written as report.json next to the splits."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    source: str
    source_sha256: str
    fingerprint: str
    detected_format: str
    format_reason: str
    rows_in: int
    rows_train: int
    rows_eval: int
    rows_quarantined: int
    by_reason: dict[str, int]
    output_dir: str


class CleanError(ValueError):
    """The dataset cannot be cleaned at all (missing file, unknown format, no valid row)."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def detect_format(con: duckdb.DuckDBPyConnection, declared: str) -> tuple[str, str]:
    """Return (format, why) for the lines in table `raw`."""
    if declared != "auto":
        return declared, "declared in the spec"
    row = con.execute(
        "SELECT line_no, json_keys(line::JSON) FROM raw WHERE json_valid(line) AND starts_with(trim(line), '{') "
        "ORDER BY line_no LIMIT 1").fetchone()
    if row is None:
        raise CleanError("no line is a JSON object, so the format cannot be detected. Fix: check the file is "
                         "JSON Lines (one object per line).")
    line_no, keys = row
    for fmt, needed in _FORMAT_KEYS:
        if needed <= set(keys):
            return fmt, f"line {line_no} has keys {sorted(keys)}: {'+'.join(sorted(needed))} means {fmt}"
    raise CleanError(f"line {line_no} has keys {sorted(keys)}, which match no known format (messages, "
                     "conversations, instruction+output, prompt+completion). Fix: set `format` in the spec or "
                     "convert the file.")


def clean_dataset(name: str, spec: DatasetSpec, source: Path, out_root: Path, tokenizer=None) -> CleanReport:
    """Clean one dataset into ``out_root/<name>/<fingerprint>/`` and point ``current.json`` at it.

    Args:
        name: dataset name from the spec.
        spec: its settings (format, eval_fraction, max_tokens).
        source: the raw .jsonl file.
        out_root: the home's ``datasets`` dir.
        tokenizer: a HF tokenizer with a chat template; when given, rows over ``max_tokens`` are quarantined.
    """
    source = Path(source)
    if not source.is_file():
        raise CleanError(f"dataset {name!r}: file {str(source)!r} does not exist or is not a file. Fix: correct "
                         f"datasets.{name}.path in the spec.")
    source_sha = _sha256_file(source)
    tok_id = getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None
    fingerprint = hashlib.sha256(json.dumps({
        "source_sha256": source_sha, "spec": spec.model_dump(), "cleaner": CLEANER_VERSION,
        "tokenizer": str(tok_id), "vocab": len(tokenizer) if tokenizer is not None else None,
    }, sort_keys=True).encode()).hexdigest()[:16]
    out_dir = Path(out_root) / name / fingerprint
    if (out_dir / "report.json").exists():  # same input, same rules: the result is already there
        report = CleanReport.model_validate_json((out_dir / "report.json").read_text())
        _point_current(Path(out_root) / name, out_dir)
        return report

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    con = duckdb.connect()
    try:
        try:
            con.execute(
                "CREATE TABLE raw AS SELECT unnest(range(1, len(lines) + 1)) AS line_no, unnest(lines) AS line "
                "FROM (SELECT string_split(content, chr(10)) AS lines FROM read_text(?))", [str(source)])
        except duckdb.Error as e:
            raise CleanError(f"dataset {name!r}: cannot read {source}: {e}") from e
        # A trailing newline leaves one empty last element: that is not a row.
        con.execute("DELETE FROM raw WHERE trim(line) = '' AND line_no = (SELECT max(line_no) FROM raw)")
        fmt, why = detect_format(con, spec.format)
        con.execute("""
            CREATE TABLE parsed AS
            SELECT line_no, line,
                   CASE WHEN NOT json_valid(line) THEN NULL ELSE line::JSON END AS j
            FROM raw""")
        con.execute(f"""
            CREATE TABLE normalized AS
            SELECT line_no, line,
                   CASE WHEN j IS NULL THEN 'invalid_json'
                        WHEN json_type(j) <> 'OBJECT' THEN 'not_an_object'
                   END AS reason0,
                   CASE WHEN j IS NOT NULL AND json_type(j) = 'OBJECT' THEN
                        TRY(list_transform({_TO_MESSAGES[fmt]},
                            lambda m: {{'role': m.role, 'content': trim(nfc_normalize(m.content))}}))
                   END AS messages
            FROM parsed""")
        con.execute("""
            CREATE TABLE checked AS
            SELECT *, coalesce(reason0,
                CASE WHEN messages IS NULL OR len(messages) = 0 THEN 'missing_fields'
                     WHEN list_bool_or(list_transform(messages, lambda m: m.role IS NULL OR
                          m.role NOT IN ('system', 'user', 'assistant'))) THEN 'unknown_role'
                     WHEN list_bool_or(list_transform(messages, lambda m: coalesce(m.content, '') = ''))
                          THEN 'empty_text'
                     WHEN messages[-1].role <> 'assistant' THEN 'no_final_assistant_turn'
                     WHEN NOT list_contains(list_transform(messages, lambda m: m.role), 'user') THEN 'no_user_turn'
                END) AS reason,
                md5(to_json(messages)) AS content_hash
            FROM normalized""")
        if tokenizer is not None:
            _mark_too_long(con, tokenizer, spec.max_tokens)
        con.execute("""
            CREATE TABLE deduped AS
            SELECT *, CASE WHEN reason IS NULL AND row_number() OVER (
                          PARTITION BY reason IS NULL, content_hash ORDER BY line_no) > 1
                     THEN 'duplicate' ELSE reason END AS final_reason
            FROM checked""")
        buckets = 10_000
        con.execute(f"""
            CREATE TABLE result AS
            SELECT *, CASE WHEN final_reason IS NOT NULL THEN 'quarantine'
                           WHEN ('0x' || substr(content_hash, 1, 8))::UBIGINT % {buckets}
                                < {round(spec.eval_fraction * buckets)} THEN 'eval'
                           ELSE 'train' END AS split
            FROM deduped""")
        src = str(source)
        for split in ("train", "eval"):
            con.execute(f"""
                COPY (SELECT messages, content_hash AS id, '{src}:' || line_no AS source
                      FROM result WHERE split = '{split}' ORDER BY line_no)
                TO '{tmp / (split + '.jsonl')}' (FORMAT json)""")
        con.execute(f"""
            COPY (SELECT final_reason AS reason, '{src}:' || line_no AS source, line AS raw
                  FROM result WHERE split = 'quarantine' ORDER BY line_no)
            TO '{tmp / 'quarantine.jsonl'}' (FORMAT json)""")
        counts = dict(con.execute("SELECT split, count(*) FROM result GROUP BY split").fetchall())
        by_reason = dict(con.execute(
            "SELECT final_reason, count(*) FROM result WHERE final_reason IS NOT NULL GROUP BY 1 ORDER BY 1"
        ).fetchall())
        rows_in = con.execute("SELECT count(*) FROM raw").fetchone()[0]
    finally:
        con.close()

    if counts.get("train", 0) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CleanError(f"dataset {name!r}: no valid training row in {source} ({rows_in} rows in, quarantined "
                         f"by reason: {by_reason}). Fix: check the file's format (detected {fmt}: {why}).")
    report = CleanReport(
        dataset=name, source=str(source), source_sha256=source_sha, fingerprint=fingerprint,
        detected_format=fmt, format_reason=why, rows_in=rows_in, rows_train=counts.get("train", 0),
        rows_eval=counts.get("eval", 0), rows_quarantined=counts.get("quarantine", 0), by_reason=by_reason,
        output_dir=str(out_dir),
    )
    assert report.rows_in == report.rows_train + report.rows_eval + report.rows_quarantined
    (tmp / "report.json").write_text(report.model_dump_json(indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    _point_current(Path(out_root) / name, out_dir)
    return report


def _mark_too_long(con: duckdb.DuckDBPyConnection, tokenizer, max_tokens: int) -> None:
    rows = con.execute("SELECT line_no, messages FROM checked WHERE reason IS NULL ORDER BY line_no").fetchall()
    if not rows:
        return
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for _, m in rows]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    too_long = [(ln,) for (ln, _), n in zip(rows, lengths, strict=True) if n > max_tokens]
    if too_long:
        con.execute("CREATE TEMP TABLE too_long(line_no BIGINT)")
        con.executemany("INSERT INTO too_long VALUES (?)", too_long)
        con.execute("UPDATE checked SET reason = 'too_long' WHERE line_no IN (SELECT line_no FROM too_long)")


def _point_current(dataset_dir: Path, out_dir: Path) -> None:
    tmp = dataset_dir / "current.json.tmp"
    tmp.write_text(json.dumps({"fingerprint": out_dir.name, "dir": str(out_dir)}))
    tmp.replace(dataset_dir / "current.json")


def current_clean(datasets_root: Path, name: str) -> CleanReport:
    """The report of the last cleaning of dataset ``name`` (raises if it was never cleaned)."""
    pointer = Path(datasets_root) / name / "current.json"
    if not pointer.exists():
        raise CleanError(f"dataset {name!r} has not been cleaned yet. Fix: materialize dataset/{name}/clean "
                         "first (or run `lorafoundry run SPEC`).")
    out_dir = Path(json.loads(pointer.read_text())["dir"])
    return CleanReport.model_validate_json((out_dir / "report.json").read_text())


def read_split(report: CleanReport, split: str) -> list[dict]:
    """Rows of one split (``train`` or ``eval``) as dicts with ``messages``, ``id`` and ``source``."""
    path = Path(report.output_dir) / f"{split}.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
