"""Tool calls and tool lists in one canonical shape, as DuckDB functions the cleaning SQL calls per message/row.

A tool call is ``{"name": str, "arguments": {...}}`` (arguments a JSON object), whichever convention it came in:
OpenAI's ``{"type": "function", "id": ..., "function": {"name", "arguments": "<JSON string>"}}``, or
LLaMA-Factory's ShareGPT ``function_call`` value, a JSON string ``{"name", "arguments"}``. A tool list is a JSON array
of OpenAI tool definitions (``{"type": "function", "function": {...}}``; a bare function definition is wrapped), given
as an array or, in ShareGPT, as a JSON string holding one.

Each function returns the canonical JSON text, NULL when there is nothing, or ``!`` plus why it is invalid (a
marker the rules turn into the quarantine reasons ``invalid_tool_call`` / ``invalid_tools``).
"""

from __future__ import annotations

import json

import duckdb


def _load(value):
    """A JSON value that may itself be a JSON string holding the real value (ShareGPT's convention)."""
    if isinstance(value, str):
        return json.loads(value)
    return value


def canon_tool_calls(raw: str | None) -> str | None:
    if raw is None:
        return None
    try:
        calls = json.loads(raw)
        if calls is None or calls == []:  # exporters write [] (or null) on turns that call nothing
            return None
        if not isinstance(calls, list) or not calls:
            return "!tool_calls is not a non-empty list"
        out = []
        for call in calls:
            call = _load(call)
            fn = call.get("function", call) if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
                return "!a tool call without a function name"
            args = _load(fn.get("arguments", {}))
            if not isinstance(args, dict):
                return "!tool call arguments that are not a JSON object"
            out.append({"name": fn["name"].strip(), "arguments": args})
        return json.dumps(out, ensure_ascii=False, sort_keys=True)
    except (ValueError, TypeError, AttributeError, RecursionError):  # RecursionError: JSON nested too deep
        return "!tool call arguments that are not valid JSON (or nested too deep)"


def canon_tools(raw: str | None) -> str | None:
    if raw is None:
        return None
    try:
        tools = _load(json.loads(raw))
        if tools is None or tools == []:
            return None
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            return "!tools is not a list of tool definitions"
        out = []
        for t in tools:
            fn = t.get("function", t)
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                return "!a tool definition without a name"
            out.append({"type": "function", "function": fn})
        return json.dumps(out, ensure_ascii=False, sort_keys=True)
    except (ValueError, TypeError, RecursionError):
        return "!tools is not valid JSON (or nested too deep)"


def register(con: duckdb.DuckDBPyConnection) -> None:
    """Make ``canon_tool_calls(JSON)`` and ``canon_tools(JSON)`` callable in ``con``'s SQL (NULL in, NULL out)."""
    for name, fn in (("canon_tool_calls", canon_tool_calls), ("canon_tools", canon_tools)):
        con.create_function(name, fn, ["VARCHAR"], "VARCHAR", null_handling="special", side_effects=False)
