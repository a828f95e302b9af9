"""Cleaning on DuckDB: formats, counts, quarantine reasons, and a deterministic split."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lora_assets.clean import CleanError, clean_dataset, read_split
from lora_assets.spec import DatasetSpec


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def quarantine(report) -> list[dict]:
    with (Path(report.output_dir) / "quarantine.jsonl").open() as f:
        return [json.loads(line) for line in f]


def test_counts_reasons_and_invariant(tmp_path):
    rows = [chat(f"question {i}", f"answer {i}") for i in range(50)]
    rows += [
        rows[0],
        rows[1],  # exact duplicates
        chat("  question 2 ", "answer 2"),  # duplicate after whitespace normalization
        chat("empty answer", "   "),  # empty text
        "{not json",  # invalid JSON
        "[1, 2]",  # not an object
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}]},
        {"other": 1},  # missing fields
    ]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    r = clean_dataset("d", DatasetSpec(path=str(src)), src, tmp_path / "out")
    assert r.detected_format == "messages"
    assert r.rows_in == len(rows)
    assert r.rows_in == r.rows_train + r.rows_eval + r.rows_quarantined
    assert r.rows_train + r.rows_eval == 50
    assert r.by_reason == {
        "duplicate": 3,
        "empty_response": 1,
        "invalid_json": 1,
        "not_an_object": 1,
        "unknown_role": 1,
        "no_final_assistant_turn": 1,
        "missing_fields": 1,
    }
    q = quarantine(r)
    assert len(q) == r.rows_quarantined
    assert all(row["source"].startswith(str(src) + ":") and row["reason"] for row in q)
    train, evals = read_split(r, "train"), read_split(r, "eval")
    assert len(train) == r.rows_train and len(evals) == r.rows_eval
    assert not {t["id"] for t in train} & {e["id"] for e in evals}


@pytest.mark.parametrize(
    "fmt, row",
    [
        ("alpaca", {"instruction": "Say hi", "input": "to Bob", "output": "hi Bob", "system": "be nice"}),
        ("sharegpt", {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}),
        ("prompt_completion", {"prompt": "Say hi", "completion": "hi"}),
        ("messages", chat("Say hi", "hi")),
    ],
)
def test_formats_detected_and_normalized(tmp_path, fmt, row):
    src = write_jsonl(tmp_path / "d.jsonl", [row])
    r = clean_dataset("d", DatasetSpec(path=str(src), eval_fraction=0.01), src, tmp_path / "out")
    assert r.detected_format == fmt
    (out,) = read_split(r, "train") + read_split(r, "eval")
    roles = [m["role"] for m in out["messages"]]
    assert roles[-2:] == ["user", "assistant"]
    if fmt == "alpaca":
        assert out["messages"][0] == {"role": "system", "content": "be nice"}
        assert out["messages"][1]["content"] == "Say hi\n\nto Bob"


def test_split_is_deterministic_and_order_independent(tmp_path):
    rows = [chat(f"q{i}", f"a{i}") for i in range(400)]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    b = write_jsonl(tmp_path / "b.jsonl", shuffled + [chat("new", "row")])
    ra = clean_dataset("a", DatasetSpec(path=str(a)), a, tmp_path / "out")
    rb = clean_dataset("b", DatasetSpec(path=str(b)), b, tmp_path / "out")
    eval_a = {e["id"] for e in read_split(ra, "eval")}
    eval_b = {e["id"] for e in read_split(rb, "eval")}
    assert 20 < len(eval_a) < 70  # ~10% of 400
    assert eval_a <= eval_b and len(eval_b - eval_a) <= 1
    again = clean_dataset("a", DatasetSpec(path=str(a)), a, tmp_path / "out2")
    assert {e["id"] for e in read_split(again, "eval")} == eval_a and again.fingerprint == ra.fingerprint


def test_missing_file_and_no_valid_row_fail_clearly(tmp_path):
    with pytest.raises(CleanError, match="does not exist"):
        clean_dataset("d", DatasetSpec(path="x"), tmp_path / "nope.jsonl", tmp_path / "out")
    src = write_jsonl(tmp_path / "bad.jsonl", [chat("q", ""), chat("", "a")])
    with pytest.raises(CleanError, match="no valid training row"):
        clean_dataset("d", DatasetSpec(path=str(src)), src, tmp_path / "out")
