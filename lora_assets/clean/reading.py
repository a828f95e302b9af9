"""Reading a dataset's files into table ``rows``: one row per JSON line, CSV record, JSON array element or Parquet
row, numbered ``file:line``, with a quarantine reason when reading already gives one (invalid_utf8, blank_line,
invalid_csv).

A UTF-8 byte-order mark is dropped; UTF-16 and UTF-32 text with a byte-order mark is decoded (without one, the
format error says what it looks like). File paths reach DuckDB as bound parameters, never as SQL text.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from pathlib import Path

import duckdb

from lora_assets.clean.report import CleanError


def load_files(con: duckdb.DuckDBPyConnection, files: list[Path], scratch: Path) -> list[str]:
    """Create table ``rows`` and read every file into it, in order; return each file's encoding.

    ``rid`` is the row's position over all files (1, 2, ...); its source reference is ``file:line_no``.
    ``scratch`` holds decoded copies of files DuckDB cannot read as they are.
    """
    con.execute(
        "CREATE TABLE rows (rid BIGINT, file_idx INTEGER, file VARCHAR, line_no BIGINT, "
        "line VARCHAR, pre_reason VARCHAR)"
    )
    return [_load_file(con, idx, f, scratch) for idx, f in enumerate(files)]


#: Byte-order marks, UTF-32's first (UTF-32LE's starts with UTF-16LE's): (mark, encoding name, Python codec).
_BOMS = [
    (codecs.BOM_UTF32_LE, "UTF-32LE", "utf-32-le"),
    (codecs.BOM_UTF32_BE, "UTF-32BE", "utf-32-be"),
    (codecs.BOM_UTF8, "UTF-8 with BOM", "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "UTF-16LE", "utf-16-le"),
    (codecs.BOM_UTF16_BE, "UTF-16BE", "utf-16-be"),
]


def _as_utf8(path: Path, copy: Path) -> tuple[Path, str]:
    """The file to read as UTF-8, and the encoding its byte-order mark declares (UTF-8 without one).

    UTF-16 and UTF-32 text is decoded into a UTF-8 ``copy``; a UTF-8 mark stays, for the readers to drop.
    """
    with path.open("rb") as f:
        head = f.read(4)
    bom, label, codec = next((b for b in _BOMS if head.startswith(b[0])), (b"", "UTF-8", "utf-8"))
    if codec in ("utf-8", "utf-8-sig"):
        return path, label
    try:
        text = path.read_bytes()[len(bom) :].decode(codec)
    except UnicodeDecodeError as e:
        raise CleanError(
            f"{path}: starts with a {label} byte-order mark but is not valid {label} ({e.reason} at byte "
            f"{e.start + len(bom)}). Fix: convert it to UTF-8 (e.g. `iconv -f {label} -t UTF-8`)."
        ) from e
    copy.write_text(text, encoding="utf-8", newline="")
    return copy, f"{label}, decoded to UTF-8"


def looks_like_utf16(path: Path) -> bool:
    """UTF-16 or UTF-32 text without a byte-order mark: NUL bytes in a quarter of its start (UTF-8 text has none)."""
    if path.suffix.lower() == ".parquet":
        return False
    with path.open("rb") as f:
        head = f.read(4096)
    return len(head) > 0 and head.count(0) * 4 >= len(head)


def _load_jsonl(con: duckdb.DuckDBPyConnection, idx: int, path: Path, tmpdir: Path, name: str) -> None:
    try:
        _insert_lines(con, idx, name, path)  # DuckDB checks the encoding as it reads
        return
    except duckdb.InvalidInputException as e:
        if "UTF-8" not in str(e):
            raise
    # Find the lines that are not UTF-8, and give DuckDB a copy where they are decoded with U+FFFD so the rest of
    # the file reads normally; those lines are quarantined as invalid_utf8.
    lines = path.read_bytes().split(b"\n")
    bad_lines: list[int] = []
    for i, line in enumerate(lines):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad_lines.append(i + 1)
            lines[i] = line.decode("utf-8", errors="replace").encode("utf-8")
    source = tmpdir / f"{idx}.jsonl"
    source.write_bytes(b"\n".join(lines))
    _insert_lines(con, idx, name, source)
    con.execute("CREATE OR REPLACE TEMP TABLE bad_utf8 AS SELECT unnest(?::BIGINT[]) AS line_no", [bad_lines])
    con.execute(
        "UPDATE rows SET pre_reason = 'invalid_utf8' WHERE file_idx = ? AND line_no IN (SELECT line_no FROM bad_utf8)",
        [idx],
    )


def _insert_lines(con: duckdb.DuckDBPyConnection, idx: int, name: str, source: Path) -> None:
    # One row per line, numbered from 1; rid continues the previous files' numbering. The CR of a CRLF line and
    # the blank-line test only touch the lines that need them (trimming every line copies it: 2 s on 1 M rows;
    # a JSON object line starts with '{', anything else may be spaces, Unicode ones included). A UTF-8
    # byte-order mark is not part of row 1.
    con.execute(
        """
        INSERT INTO rows
        SELECT (SELECT coalesce(max(rid), 0) FROM rows) + line_no, $idx, $name, line_no, line,
               CASE WHEN line = '' OR (NOT starts_with(line, '{') AND trim(line) = '') THEN 'blank_line' END
        FROM (SELECT line_no, CASE WHEN ends_with(l, chr(13)) THEN rtrim(l, chr(13)) ELSE l END AS line FROM (
            SELECT unnest(range(1, len(lines) + 1)) AS line_no, unnest(lines) AS l
            FROM (SELECT string_split(CASE WHEN starts_with(content, chr(65279)) THEN substr(content, 2)
                                           ELSE content END, chr(10)) AS lines FROM read_text($source))))""",
        {"idx": idx, "name": name, "source": str(source)},
    )
    # the newline that ends the last line does not start another row
    con.execute(
        "DELETE FROM rows WHERE file_idx = ? AND line = '' AND line_no = (SELECT max(line_no) FROM rows "
        "WHERE file_idx = ?)",
        [idx, idx],
    )


def _insert_records(
    con: duckdb.DuckDBPyConnection, idx: int, name: str, lines: list[str], reasons: list[str | None]
) -> None:
    """Rows numbered from 1: each one's text, and its quarantine reason when reading already gave it one."""
    con.execute(
        """
        INSERT INTO rows
        SELECT (SELECT coalesce(max(rid), 0) FROM rows) + n, $idx, $name, n, line, reason FROM (
            SELECT unnest(range(1, len(l) + 1)) AS n, unnest(l) AS line, unnest(r) AS reason
            FROM (SELECT $lines::VARCHAR[] AS l, $reasons::VARCHAR[] AS r))""",
        {"idx": idx, "name": name, "lines": lines, "reasons": reasons},
    )


def _load_parquet(con: duckdb.DuckDBPyConnection, idx: int, path: Path) -> None:
    # One JSON object per row; row numbers count data rows from 1.
    con.execute(
        """
        INSERT INTO rows
        SELECT (SELECT coalesce(max(rid), 0) FROM rows) + n, $idx, $path, n, j, NULL FROM (
            SELECT row_number() OVER () AS n, to_json(t)::VARCHAR AS j FROM read_parquet($path) t)""",
        {"idx": idx, "path": str(path)},
    )


def _text_lines(data: bytes) -> tuple[list[str], set[int]]:
    """A text file's lines (no CR of a CRLF, no UTF-8 byte-order mark, no row after the final newline), and the
    indexes of the lines that are not UTF-8 (decoded with U+FFFD)."""
    try:
        lines, bad = data.decode("utf-8").split("\n"), set()
    except UnicodeDecodeError:
        lines, bad = [], set()
        for i, raw in enumerate(data.split(b"\n")):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                lines.append(raw.decode("utf-8", errors="replace"))
                bad.add(i)
    if lines and lines[-1] == "":
        lines.pop()
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    return [line[:-1] if line.endswith("\r") else line for line in lines], bad


def _csv_records(lines: list[str], delimiter: str) -> Iterator[tuple[int, int, list[str] | None]]:
    """(first line, end line, cells) of each CSV record, RFC 4180 (``"`` quotes, ``""`` inside; a quoted cell may
    span lines). A record that does not parse (cells None) is just its first line, and parsing starts again on
    the next one: one quote left open costs one row, not the rest of the file."""
    start = 0
    while start < len(lines):
        reader = csv.reader((lines[i] + "\n" for i in range(start, len(lines))), delimiter=delimiter, strict=True)
        done = 0  # lines this reader has consumed
        try:
            for cells in reader:
                yield start + done, start + reader.line_num, cells
                done = reader.line_num
            return
        except csv.Error:
            yield start + done, start + done + 1, None
            start += done + 1


def _load_csv(con: duckdb.DuckDBPyConnection, idx: int, path: Path, name: str) -> None:
    """CSV records as JSON objects of text cells keyed by the header, numbered from 1 (the header is not a row).

    Parsed here, not by DuckDB's reader: its dialect sniffer gives up on a whole file where one quote is left open.
    A record that does not parse, or has another number of cells than the header, is quarantined as
    ``invalid_csv``. The delimiter is whichever of ``,`` ``;`` tab ``|`` the header line holds most of.
    """
    lines, bad_utf8 = _text_lines(path.read_bytes())
    if not lines:
        return
    limit = csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))  # cells up to 64 MiB, like a JSON line
    try:
        records = _csv_records(lines, max(",;\t|", key=lines[0].count))
        _, _, header = next(records)
        if header is None or not any(h.strip() for h in header):
            raise CleanError(
                f"{name}: the first line is not a CSV header ({lines[0][:200]!r}). Fix: start the file with a "
                "header line of column names, e.g. prompt,completion."
            )
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise CleanError(f"{name}: the header names {repeated} more than once. Fix: give each column its own name.")
        rows: list[str] = []
        reasons: list[str | None] = []
        to_json = json.JSONEncoder(ensure_ascii=False).encode  # one encoder: json.dumps makes one per call
        for first, end, cells in records:
            raw = "\n".join(lines[first:end])
            reason = None
            if not bad_utf8.isdisjoint(range(first, end)):
                reason = "invalid_utf8"
            elif not raw.strip():
                reason = "blank_line"
            elif cells is None or len(cells) != len(header):
                reason = "invalid_csv"
            rows.append(raw if reason else to_json(dict(zip(header, cells, strict=True))))
            reasons.append(reason)
    finally:
        csv.field_size_limit(limit)
    _insert_records(con, idx, name, rows, reasons)


def _load_json_array(con: duckdb.DuckDBPyConnection, idx: int, path: Path, tmpdir: Path, name: str) -> None:
    # A JSON array must parse as a whole (Python's json is strict where DuckDB's reader is lenient with a
    # truncated tail); its elements then go through the JSON Lines path, numbered from 1.
    try:
        data = json.loads(path.read_bytes())  # a UTF-8 byte-order mark is allowed
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CleanError(
            f"{name}: cannot be read as .json ({e}). Fix: make it one valid JSON array, or convert "
            "it to JSON Lines (.jsonl), where a bad line is quarantined instead."
        ) from e
    if not isinstance(data, list):
        raise CleanError(
            f"{name}: a .json file must hold a JSON array of rows, not a {type(data).__name__}. Fix: "
            "wrap the rows in [ ], or use .jsonl."
        )
    lines = tmpdir / f"{idx}.array.jsonl"
    with lines.open("w", encoding="utf-8") as f:
        for element in data:
            f.write(json.dumps(element, ensure_ascii=False) + "\n")
    _load_jsonl(con, idx, lines, tmpdir, name)


def _load_file(con: duckdb.DuckDBPyConnection, idx: int, path: Path, tmpdir: Path) -> str:
    """Read one file into table `rows`; return its encoding."""
    ext = path.suffix.lower()
    if ext not in (".jsonl", ".ndjson", ".json", ".csv", ".parquet"):
        raise CleanError(f"{path}: unsupported file type {ext!r}. Fix: use .jsonl, .json (an array), .csv or .parquet.")
    try:
        if ext == ".parquet":
            _load_parquet(con, idx, path)
            return "UTF-8"
        text, encoding = _as_utf8(path, tmpdir / f"{idx}.utf8{ext}")
        if ext == ".csv":
            _load_csv(con, idx, text, str(path))
        elif ext == ".json":
            _load_json_array(con, idx, text, tmpdir, str(path))
        else:
            _load_jsonl(con, idx, text, tmpdir, str(path))
        return encoding
    except duckdb.Error as e:
        raise CleanError(
            f"{path}: cannot be read as {ext} ({str(e).splitlines()[0]}). Fix: check the file is valid {ext}."
        ) from e
    except OSError as e:
        raise CleanError(f"{path}: cannot be read ({e}).") from e
