"""Row formats: detecting each file's format from its first JSON object's keys, and shaping every row into one
raw message list (``STRUCT(role JSON, content JSON, tool_calls JSON, tool_call_id JSON)[]``) and its tool list
(``tools JSON``), plus the problem with its shape, if any.

Tool calls come in two conventions: OpenAI's (``messages`` with ``tools``, assistant ``tool_calls`` and ``tool``
results) and the ShareGPT one LLaMA-Factory uses (``function_call`` turns whose value is a JSON object with
``name`` and ``arguments``, ``observation`` turns with the result, and a ``tools`` field, a JSON string or list)."""

from __future__ import annotations

from pathlib import Path

import duckdb

from lora_assets.clean.reading import looks_like_utf16
from lora_assets.clean.report import CleanError, SourceFile

_ROLE = "'\"{}\"'::JSON"
#: Per format: (SQL giving a LIST(STRUCT(role JSON, content JSON)) from row JSON `j`, SQL giving a shape problem).
_FORMATS: dict[str, tuple[str, str]] = {
    "messages": (  # json_transform parses the row once (4x faster than extracting each field with ->)
        'json_transform(j, \'{"messages": [{"role": "JSON", "content": "JSON", "tool_calls": "JSON", '
        '"tool_call_id": "JSON"}]}\').messages',
        "CASE WHEN (j->'$.messages') IS NULL THEN 'missing_fields' "
        "WHEN json_type(j->'$.messages') <> 'ARRAY' THEN 'wrong_type' END",
    ),
    "sharegpt": (  # function_call: an assistant turn that calls the tool in its value; observation: its result
        "list_transform(json_extract(j, '$.conversations[*]'), lambda m: CASE m->>'$.from' "
        "WHEN 'function_call' THEN {'role': '\"assistant\"'::JSON, 'content': '\"\"'::JSON, "
        "'tool_calls': json_array(m->'$.value')} "
        "WHEN 'observation' THEN {'role': '\"tool\"'::JSON, 'content': m->'$.value'} "
        "ELSE {'role': m->'$.from', 'content': m->'$.value'} END)",
        "CASE WHEN (j->'$.conversations') IS NULL THEN 'missing_fields' "
        "WHEN json_type(j->'$.conversations') <> 'ARRAY' THEN 'wrong_type' END",
    ),
    "alpaca": (
        "list_concat("
        f"CASE WHEN coalesce(json_type(j->'$.system'), 'NULL') <> 'NULL' THEN [{{'role': {_ROLE.format('system')}, "
        "'content': j->'$.system'}] ELSE [] END, "
        "CASE WHEN json_type(j->'$.history') = 'ARRAY' THEN flatten(list_transform(json_extract(j, '$.history[*]'), "
        f"lambda h: [{{'role': {_ROLE.format('user')}, 'content': h->'$[0]'}}, "
        f"{{'role': {_ROLE.format('assistant')}, 'content': h->'$[1]'}}])) ELSE [] END, "
        f"[{{'role': {_ROLE.format('user')}, 'content': CASE WHEN json_type(j->'$.input') = 'VARCHAR' "
        "AND trim(j->>'$.input') <> '' AND json_type(j->'$.instruction') = 'VARCHAR' "
        "THEN to_json(concat(j->>'$.instruction', chr(10), chr(10), j->>'$.input')) ELSE j->'$.instruction' END}, "
        f"{{'role': {_ROLE.format('assistant')}, 'content': j->'$.output'}}])",
        # only strings are text: a number, object or list in a text field is wrong_type, never turned into text
        "CASE WHEN (j->'$.instruction') IS NULL OR (j->'$.output') IS NULL THEN 'missing_fields' "
        "WHEN json_type(j->'$.instruction') <> 'VARCHAR' OR json_type(j->'$.output') <> 'VARCHAR' "
        "OR coalesce(json_type(j->'$.input'), 'NULL') NOT IN ('NULL', 'VARCHAR') "
        "OR coalesce(json_type(j->'$.history'), 'NULL') NOT IN ('NULL', 'ARRAY') "
        "OR coalesce(json_type(j->'$.system'), 'NULL') NOT IN ('NULL', 'VARCHAR') THEN 'wrong_type' "
        "WHEN json_type(j->'$.history') = 'ARRAY' AND NOT coalesce(list_bool_and(list_transform("
        "json_extract(j, '$.history[*]'), lambda h: json_type(h) = 'ARRAY' AND json_array_length(h) = 2 "
        "AND json_type(h->'$[0]') = 'VARCHAR' AND json_type(h->'$[1]') = 'VARCHAR')), true) THEN 'wrong_type' END",
    ),
    "prompt_completion": (
        f"[{{'role': {_ROLE.format('user')}, 'content': j->'$.prompt'}}, "
        f"{{'role': {_ROLE.format('assistant')}, 'content': j->'$.completion'}}]",
        "CASE WHEN (j->'$.prompt') IS NULL OR (j->'$.completion') IS NULL THEN 'missing_fields' END",
    ),
    "text": (
        f"[{{'role': {_ROLE.format('assistant')}, 'content': j->'$.text'}}]",
        "CASE WHEN (j->'$.text') IS NULL THEN 'missing_fields' END",
    ),
}

#: Keys that identify each format in `auto` detection, in priority order.
_FORMAT_KEYS = [
    ("messages", {"messages"}),
    ("sharegpt", {"conversations"}),
    ("alpaca", {"instruction", "output"}),
    ("prompt_completion", {"prompt", "completion"}),
    ("text", {"text"}),
]


def detect_format(con: duckdb.DuckDBPyConnection, idx: int, declared: str) -> tuple[str, str]:
    """Return (format, why) for one file's rows in table `parsed`."""
    if declared != "auto":
        return declared, "declared in the spec"
    row = con.execute(
        "SELECT line_no, json_keys(j) FROM parsed WHERE file_idx = ? AND j IS NOT NULL AND "
        "json_type(j) = 'OBJECT' ORDER BY line_no LIMIT 1",
        [idx],
    ).fetchone()
    if row is None:
        return "unknown", "no row is a JSON object"
    line_no, keys = row
    for fmt, needed in _FORMAT_KEYS:
        if needed <= set(keys):
            return fmt, f"row {line_no} has keys {sorted(keys)}: {' + '.join(sorted(needed))} means {fmt}"
    return "unknown", (
        f"row {line_no} has keys {sorted(keys)}, which match no known format (messages, "
        "conversations, instruction + output, prompt + completion, text)"
    )


def parse_and_shape(
    con: duckdb.DuckDBPyConnection, files: list[Path], encodings: list[str], declared: str
) -> tuple[list[SourceFile], str, str]:
    """Parse JSON, detect each file's format, and build each row's raw message list (table `shaped`).

    Returns the files as read, the format summary (one format, or ``mixed: ...``) and why each file has its format.
    """
    con.execute("""
        CREATE TABLE parsed AS
        SELECT rid, file_idx, line_no, CASE WHEN ok THEN line::JSON END AS j,
               coalesce(pre_reason, CASE WHEN NOT ok THEN 'invalid_json'
                                         WHEN json_type(line) <> 'OBJECT' THEN 'not_an_object' END) AS reason
        FROM (SELECT *, pre_reason IS NULL AND json_valid(line) AS ok FROM rows)""")
    con.execute(
        "CREATE TABLE shaped (rid BIGINT, fmt VARCHAR, msgs STRUCT(role JSON, content JSON, tool_calls JSON, "
        "tool_call_id JSON)[], tools JSON, reason VARCHAR)"
    )
    sources = []
    for idx, f in enumerate(files):
        fmt, why = detect_format(con, idx, declared)
        n = con.execute("SELECT count(*) FROM parsed WHERE file_idx = ?", [idx]).fetchone()[0]
        if fmt == "unknown":
            raise _unknown_format(con, idx, f, why, n)
        sources.append(SourceFile(path=str(f), format=fmt, format_reason=why, rows=n, encoding=encodings[idx]))
        to_msgs, shape = _FORMATS[fmt]  # SQL from the table above, never from the data
        con.execute(
            f"""
            INSERT INTO shaped
            SELECT rid, $fmt, CASE WHEN reason IS NULL AND shape IS NULL THEN TRY({to_msgs}) END,
                   CASE WHEN $fmt IN ('messages', 'sharegpt') THEN j->'$.tools' END, coalesce(reason, shape)
            FROM (SELECT *, {shape} AS shape FROM parsed WHERE file_idx = $idx)""",
            {"fmt": fmt, "idx": idx},
        )
    formats = sorted({s.format for s in sources})
    fmt_summary = formats[0] if len(formats) == 1 else "mixed: " + ", ".join(formats)
    why_summary = "; ".join(f"{Path(s.path).name}: {s.format_reason}" for s in sources)
    return sources, fmt_summary, why_summary


def _unknown_format(con: duckdb.DuckDBPyConnection, idx: int, path: Path, why: str, rows: int) -> CleanError:
    """The error for a file whose format is unknown: no JSON object at all, or keys of no known format."""
    valid = con.execute("SELECT count(*) FROM parsed WHERE file_idx = ? AND reason IS NULL", [idx]).fetchone()[0]
    if looks_like_utf16(path):
        fix = (
            "convert it to UTF-8 (e.g. `iconv -f UTF-16LE -t UTF-8`): it holds NUL bytes, as UTF-16 or "
            "UTF-32 text without a byte-order mark does"
        )
    else:
        fix = "check the file's format" if valid == 0 else "set `format` in the spec or convert the file"
    return CleanError(f"{path}: {'no row is a JSON object' if valid == 0 else why} ({rows} rows). Fix: {fix}.")
