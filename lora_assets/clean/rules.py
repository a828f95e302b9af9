"""The per-row rules on DuckDB: normalize each message's text, count and redact PII, give each row the first
quarantine reason that fits (table ``result``), then the length and exact-duplicate rules.

Text is normalized before any comparison: Unicode NFC, CRLF to LF, control characters removed, Unicode spaces
to plain spaces, trailing spaces on each line removed, runs of blank lines collapsed, ends trimmed. Indentation
inside a line is kept (code answers depend on it).

The SQL here is built only from the constants in this module (rules, patterns, placeholders), never from the
data or the spec's free text.
"""

from __future__ import annotations

import json

import duckdb

from lora_assets.chat import render
from lora_assets.clean.tools import register as register_tool_functions

#: Every quarantine reason, in the order they are applied (a row gets the first that fits).
REASONS = [
    "invalid_utf8",
    "blank_line",
    "invalid_csv",
    "invalid_json",
    "not_an_object",
    "missing_fields",
    "wrong_type",
    "empty_conversation",
    "unknown_role",
    "invalid_tool_call",
    "empty_prompt",
    "empty_response",
    "invalid_tools",
    "no_user_turn",
    "no_final_assistant_turn",
    "consecutive_same_role",
    "orphan_tool_result",
    "pii",
    "template_no_system_role",
    "template_rejects_row",
    "too_long",
    "duplicate",
    "near_duplicate",
]

PII_PATTERNS = {  # RE2 syntax (DuckDB); applied in this order
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "ipv4": r"\b(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\b",
    "phone": r"(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{2,4}\)|[0-9]{2,4})[ .-][0-9]{3,4}[ .-][0-9]{3,4}\b",
}
PII_PLACEHOLDERS = {"email": "<EMAIL>", "ipv4": "<IPV4>", "phone": "<PHONE>"}

_NORMALIZE_MACRO = r"""
CREATE OR REPLACE MACRO norm_text_full(s) AS trim(
    regexp_replace(regexp_replace(regexp_replace(regexp_replace(regexp_replace(
        nfc_normalize(s),
        '\r\n?', chr(10), 'g'),
        '[\x{00}-\x{08}\x{0B}\x{0C}\x{0E}-\x{1F}\x{7F}\x{200B}-\x{200D}\x{FEFF}]', '', 'g'),
        '[\x{00A0}\x{2000}-\x{200A}\x{202F}\x{205F}\x{3000}]', ' ', 'g'),
        '[ \t]+\n', chr(10), 'g'),
        '\n{3,}', chr(10) || chr(10), 'g'),
    ' ' || chr(9) || chr(10));
-- trim() with a character set is slow: call it only when an end needs it
CREATE OR REPLACE MACRO trim_ends(s) AS CASE
    WHEN starts_with(s, ' ') OR starts_with(s, chr(9)) OR starts_with(s, chr(10)) OR ends_with(s, ' ')
         OR ends_with(s, chr(9)) OR ends_with(s, chr(10)) THEN trim(s, ' ' || chr(9) || chr(10)) ELSE s END;
-- Most text needs only NFC (and trim_ends): one regex search decides whether the full pass is needed.
-- A row's messages as written: role and content only, unless the row has tool calls, results or a tool list
CREATE OR REPLACE MACRO plain_messages(ms) AS list_transform(ms, lambda m: {'role': m.role, 'content': m.content});
CREATE OR REPLACE MACRO written_messages(ms, has_tools) AS
    CASE WHEN has_tools THEN to_json(ms) ELSE to_json(plain_messages(ms)) END;
CREATE OR REPLACE MACRO needs_full_norm(s) AS regexp_matches(s,
    '[\x{00}-\x{08}\x{0B}-\x{1F}\x{7F}\x{00A0}\x{2000}-\x{200D}\x{202F}\x{205F}\x{3000}\x{FEFF}]|[ \t]\n|\n\n\n')
"""

# Each message, in stages of their own (a macro repeats its argument: given the JSON extraction itself, that
# would re-run it per use). Everything runs inside list_transform over each row's message list: no explode and
# re-aggregate. A content is text when it is a string, or, in the messages format only (OpenAI's), a list of
# text parts; anything else (a number, an object, a list in another format) is wrong_type, never coerced to text.
_NORMALIZE_MESSAGES = """
CREATE TABLE norm AS
WITH typed AS (  -- the role, whether it is a string, the content's text, whether its parts are all text
    SELECT rid, list_transform(msgs, lambda m: {
               'role': CASE lower(trim(m.role->>'$')) WHEN 'human' THEN 'user' WHEN 'gpt' THEN 'assistant'
                            ELSE lower(trim(m.role->>'$')) END,
               'role_ok': coalesce(json_type(m.role) = 'VARCHAR', false),  -- NULL: a null or missing role
               'content': CASE json_type(m.content) WHEN 'VARCHAR' THEN m.content->>'$'
                    WHEN 'ARRAY' THEN array_to_string(list_transform(json_extract(m.content, '$[*]'),
                        lambda p: CASE json_type(p) WHEN 'VARCHAR' THEN p->>'$' WHEN 'OBJECT' THEN
                             CASE WHEN json_type(p->'$.text') = 'VARCHAR' THEN p->>'$.text' END END), '')
                    -- a turn that only calls tools may have no content at all
                    WHEN 'NULL' THEN CASE WHEN coalesce(json_type(m.tool_calls), 'NULL') <> 'NULL' THEN '' END
                    ELSE CASE WHEN m.content IS NULL AND coalesce(json_type(m.tool_calls), 'NULL') <> 'NULL'
                              THEN '' END END,
               'tool_calls': CASE WHEN coalesce(json_type(m.tool_calls), 'NULL') <> 'NULL'
                                  THEN canon_tool_calls(m.tool_calls) END,
               'tool_call_id': CASE WHEN json_type(m.tool_call_id) = 'VARCHAR' THEN m.tool_call_id->>'$' END,
               'parts_ok': json_type(m.content) <> 'ARRAY' OR (fmt = 'messages' AND NOT list_bool_or(
                   list_transform(json_extract(m.content, '$[*]'), lambda p: NOT (json_type(p) = 'VARCHAR' OR
                   (json_type(p) = 'OBJECT' AND coalesce(json_type(p->'$.text'), '') = 'VARCHAR')))))}) AS ms
    FROM shaped WHERE reason IS NULL AND msgs IS NOT NULL),
normalized AS (
    SELECT rid, list_transform(ms, lambda m: {'role': m.role, 'role_ok': m.role_ok, 'content':
               CASE WHEN needs_full_norm(m.content) THEN norm_text_full(m.content) ELSE nfc_normalize(m.content)
               END, 'parts_ok': m.parts_ok, 'tool_calls': m.tool_calls, 'tool_call_id': m.tool_call_id}) AS ms
    FROM typed)
SELECT rid, list_transform(ms, lambda m: {'role': m.role, 'role_ok': m.role_ok, 'content': trim_ends(m.content),
                                          'parts_ok': m.parts_ok, 'tool_calls': m.tool_calls,
                                          'tool_call_id': m.tool_call_id}) AS ms
FROM normalized
"""

#: Rules over each normalized message ``m`` (role, role_ok, content, parts_ok): a row breaks one when any of its
#: messages does. Applied in this order, after the reasons reading and shaping gave.
_MESSAGE_RULES = [
    ("wrong_type", "NOT m.role_ok OR m.content IS NULL OR NOT m.parts_ok"),
    ("unknown_role", "m.role_ok AND m.role NOT IN ('system', 'user', 'assistant', 'tool')"),
    ("invalid_tool_call", "starts_with(m.tool_calls, '!') OR (m.tool_calls IS NOT NULL AND m.role <> 'assistant')"),
    ("empty_prompt", "m.role = 'user' AND m.content = ''"),
    ("empty_response", "m.role = 'assistant' AND m.content = '' AND m.tool_calls IS NULL"),
]
#: Then rules over the conversation ``p.messages`` as it will be written (PII redacted, empty system turns dropped).
_CONVERSATION_RULES = [
    ("invalid_tools", "starts_with(s.tools_canon, '!')"),
    ("no_user_turn", "NOT p.has_user AND s.fmt <> 'text'"),
    ("no_final_assistant_turn", "p.messages[-1].role <> 'assistant'"),
    (  # several tool results in a row answer parallel calls
        "consecutive_same_role",
        "list_bool_or(list_transform(range(1, len(p.messages)), "
        "lambda i: p.messages[i].role = p.messages[i + 1].role AND p.messages[i].role <> 'tool'))",
    ),
    (  # a tool result answers the assistant's call just before it (or follows another result)
        "orphan_tool_result",
        "list_bool_or(list_transform(range(1, len(p.messages) + 1), lambda i: p.messages[i].role = 'tool' AND "
        "(i = 1 OR NOT (p.messages[i - 1].role = 'tool' OR p.messages[i - 1].tool_calls IS NOT NULL))))",
    ),
]


def apply_rules(con: duckdb.DuckDBPyConnection, pii_mode: str) -> dict[str, int]:
    """Validate and normalize each message, count or redact PII, and build table `result` (one row per input row,
    with its first quarantine reason). Returns the PII redactions per kind (only with ``pii_mode == "redact"``)."""
    con.execute(_NORMALIZE_MACRO)
    register_tool_functions(con)
    con.execute(_NORMALIZE_MESSAGES)
    con.execute(_per_row_sql(pii_mode))
    con.execute("DROP TABLE norm")
    con.execute(_result_sql(pii_mode))
    con.execute("DROP TABLE shaped; DROP TABLE per_row; DROP TABLE parsed")
    if pii_mode != "redact":
        return {}
    row = con.execute(
        f"SELECT {', '.join(f'sum(n_{k})' for k in PII_PATTERNS)} FROM result WHERE reason IS NULL"
    ).fetchone()
    return {k: int(v or 0) for k, v in zip(PII_PATTERNS, row, strict=True) if v}


def _pii_stages(pii_mode: str) -> list[tuple[str, str]]:
    """Named query stages over table `norm`: the texts, then per PII kind in order, its count ``n_<kind>`` in the
    text as the previous kind left it, and (``redact``) the text with it replaced.

    One search per text for any kind (an '@', or one alternation of the other patterns) picks the rows that can
    hold PII at all (``maybe``); only those run the per-kind searches, counts and replacements, and a plain
    regexp_matches guards the costlier extract/replace, since few messages contain PII.
    """
    others = "|".join(f"(?:{pat})" for kind, pat in PII_PATTERNS.items() if kind != "email")
    maybe = (
        f"{pii_mode != 'off'} AND list_bool_or(list_transform(texts, lambda t: contains(t, '@') OR "
        f"regexp_matches(t, '{others}')))"
    )
    stages = [
        ("texts", "SELECT rid, ms, list_transform(ms, lambda m: m.content) AS texts FROM norm"),
        ("pii_candidates", f"SELECT *, {maybe} AS maybe FROM texts"),
    ]
    for kind, pat in PII_PATTERNS.items():
        guard = "contains(t, '@') AND " if kind == "email" else ""  # a substring test is far cheaper than RE2
        hit = f"{guard}regexp_matches(t, '{pat}')"
        count = (
            "CASE WHEN maybe THEN coalesce(list_sum(list_transform(texts, lambda t: CASE WHEN "
            f"{hit} THEN len(regexp_extract_all(t, '{pat}')) ELSE 0 END)), 0) ELSE 0 END"
        )
        redacted = (
            f"CASE WHEN maybe THEN list_transform(texts, lambda t: CASE WHEN {hit} THEN regexp_replace(t, "
            f"'{pat}', '{PII_PLACEHOLDERS[kind]}', 'g') ELSE t END) ELSE texts END"
            if pii_mode == "redact"
            else "texts"
        )
        stages.append(
            (f"pii_{kind}", f"SELECT * REPLACE ({redacted} AS texts), {count} AS n_{kind} FROM {stages[-1][0]}")
        )
    return stages


def _tool_call_pii(pii_mode: str, calls: str) -> tuple[str, dict[str, str]]:
    """PII in a message's tool-call arguments (``calls``: the canonical JSON text, or NULL): the text as written
    (with ``redact``, each kind replaced in order, as in message text) and, per kind, its count in the text as the
    previous kind left it. A placeholder holds no quote or backslash, so the JSON stays valid."""
    counts = {}
    for kind, pat in PII_PATTERNS.items():
        counts[kind] = "0" if pii_mode == "off" else f"len(regexp_extract_all(coalesce({calls}, ''), '{pat}'))"
        if pii_mode == "redact":
            calls = f"regexp_replace({calls}, '{pat}', '{PII_PLACEHOLDERS[kind]}', 'g')"
    return calls, counts


def _per_row_sql(pii_mode: str) -> str:
    """Table `per_row`: each row's messages as written, a flag per message rule, and its PII counts (message text
    and tool-call arguments)."""
    stages = _pii_stages(pii_mode)
    ctes = ",\n".join(f"{name} AS ({sql})" for name, sql in stages)
    flags = "".join(
        f"list_bool_or(list_transform(ms, lambda m: {cond})) AS {reason},\n" for reason, cond in _MESSAGE_RULES
    )
    written_calls, _ = _tool_call_pii(pii_mode, "x[1].tool_calls")
    _, call_counts = _tool_call_pii(pii_mode, "m.tool_calls")
    counts = ", ".join(
        f"n_{k} + coalesce(list_sum(list_transform(ms, lambda m: {c})), 0) AS n_{k}" for k, c in call_counts.items()
    )
    return f"""
        CREATE TABLE per_row AS
        WITH {ctes}, with_calls AS (SELECT * REPLACE ({counts}) FROM {stages[-1][0]})
        SELECT rid,
               list_transform(list_filter(list_zip(ms, texts), lambda x: NOT (x[1].role = 'system' AND
                   x[1].content = '')), lambda x: {{'role': x[1].role, 'content': x[2],
                   'tool_calls': TRY_CAST({written_calls} AS JSON), 'tool_call_id': x[1].tool_call_id}}) AS messages,
               {flags}
               list_bool_or(list_transform(ms, lambda m: m.role = 'user')) AS has_user,
               {", ".join(f"n_{k}" for k in PII_PATTERNS)}, {" + ".join(f"n_{k}" for k in PII_PATTERNS)} AS n_pii
        FROM with_calls"""


def _result_sql(pii_mode: str) -> str:
    """Table `result`: every input row with its messages, its first quarantine reason, and its hashes."""
    rules = [("empty_conversation", "p.rid IS NULL OR len(p.messages) = 0")]
    rules += [(reason, f"p.{reason}") for reason, _ in _MESSAGE_RULES] + _CONVERSATION_RULES
    if pii_mode == "quarantine":
        rules.append(("pii", "p.n_pii > 0"))
    whens = "\n".join(f"WHEN {cond} THEN '{reason}'" for reason, cond in rules)
    return f"""
        CREATE TABLE result AS
        SELECT *, md5(written_messages(messages, has_tools)::VARCHAR
                      || CASE WHEN has_tools THEN coalesce(tools::VARCHAR, '') ELSE '' END) AS content_hash
        FROM (
        SELECT s.rid, r.file, r.line_no, s.fmt, p.messages,  -- the raw line stays in `rows` (quarantine only)
               coalesce(s.reason, CASE {whens} END) AS reason,
               CASE WHEN NOT starts_with(s.tools_canon, '!') THEN s.tools_canon::JSON END AS tools,
               -- a row with tools keeps them; every other row is written with role and content only
               s.tools_canon IS NOT NULL OR coalesce(list_bool_or(list_transform(p.messages,
                   lambda m: m.tool_calls IS NOT NULL OR m.role = 'tool')), false) AS has_tools,
               -- only compared within this run (leakage): DuckDB's 64-bit hash, a third of md5's cost
               CASE WHEN len(p.messages) > 1  -- plain-text rows have no prompt to leak
                    THEN hash(list_slice(plain_messages(p.messages), 1, len(p.messages) - 1)) END AS prompt_hash,
               {", ".join(f"coalesce(p.n_{k}, 0) AS n_{k}" for k in PII_PATTERNS)},
               NULL::VARCHAR AS split
        FROM (SELECT *, CASE WHEN coalesce(json_type(tools), 'NULL') <> 'NULL' THEN canon_tools(tools) END
                        AS tools_canon FROM shaped) s
        JOIN rows r USING (rid) LEFT JOIN per_row p USING (rid))"""


def template_refuses_system(tokenizer) -> bool:
    """Whether the base's own chat template raises on a system message (Gemma's and several Mistral templates do),
    found by rendering a two-turn chat with and without one."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    tokenizer.apply_chat_template(chat, tokenize=False)  # a template that cannot render this is not a chat template
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "be brief"}, *chat], tokenize=False)
    except Exception:  # noqa: BLE001 - jinja's TemplateError, or what the template's raise_exception raises
        return True
    return False


def mark_template_and_length(con: duckdb.DuckDBPyConnection, tokenizer, max_tokens: int) -> None:
    """Render each kept row with the base's chat template: a row it refuses gets ``template_no_system_role`` (it has
    a system message and the template refuses them, :func:`template_refuses_system`) or ``template_rejects_row``
    (the template raised on it for another rule, e.g. strict user/assistant alternation), never an exception in
    training; a row it renders gets ``too_long`` when over ``max_tokens`` tokens."""
    rows = con.execute(
        "SELECT rid, written_messages(messages, has_tools), tools FROM result WHERE reason IS NULL ORDER BY rid"
    ).fetchall()
    if not rows:
        return
    no_system = template_refuses_system(tokenizer)
    rendered, refused = [], {"template_no_system_role": [], "template_rejects_row": []}
    for rid, messages_json, tools in rows:
        messages = json.loads(messages_json)
        try:
            rendered.append((rid, render(tokenizer, messages, json.loads(tools) if tools else None)))
        except Exception:  # noqa: BLE001 - any refusal by the template's own rules
            has_system = any(m["role"] == "system" for m in messages)
            refused["template_no_system_role" if no_system and has_system else "template_rejects_row"].append(rid)
    lengths = [len(ids) for ids in tokenizer([t for _, t in rendered], add_special_tokens=False)["input_ids"]]
    refused["too_long"] = [rid for (rid, _), n in zip(rendered, lengths, strict=True) if n > max_tokens]
    for reason, rids in refused.items():
        if rids:
            con.execute(f"UPDATE result SET reason = '{reason}' WHERE rid IN (SELECT unnest(?::BIGINT[]))", [rids])


def mark_duplicates(con: duckdb.DuckDBPyConnection) -> None:
    """Set reason ``duplicate`` on each kept row whose normalized content repeats an earlier kept row's."""
    con.execute("""
        UPDATE result SET reason = 'duplicate' FROM (
            SELECT rid, row_number() OVER (PARTITION BY content_hash ORDER BY rid) AS n
            FROM result WHERE reason IS NULL) d
        WHERE result.rid = d.rid AND d.n > 1""")
