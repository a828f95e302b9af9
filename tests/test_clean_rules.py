"""Cleaning rules: every input format, every kind of bad row, PII, near-duplicates, leakage, the invariant."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest

from lora_assets.clean import CleanError, clean_dataset, minhash_signatures, near_duplicate_of, read_split
from lora_assets.spec import DatasetSpec


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def good_rows(n: int, prefix: str = "q") -> list[dict]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [
        chat(
            f"{prefix}{i}: " + " ".join(words[(i + k) % 12] for k in range(8)) + f" number {i}?",
            f"answer {i} " + words[i % 12],
        )
        for i in range(n)
    ]


def run(tmp_path: Path, name: str, lines: list, **spec) -> object:
    src = tmp_path / f"{name}.jsonl"
    with src.open("wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            else:
                f.write(((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n").encode())
    report = clean_dataset(name, DatasetSpec(path=str(src), **spec), src, tmp_path / "out")
    assert report.rows_in == report.rows_train + report.rows_eval + report.rows_quarantined
    return report


def quarantined(report) -> dict[int, str]:
    return {int(r["source"].rsplit(":", 1)[1]): r["reason"] for r in read_split(report, "quarantine")}


# Each bad row, after 40 good ones, and the reason it must get. 30 kinds.
BAD_ROWS = [
    (b'\xff\xfe not utf-8 {"messages": []}', "invalid_utf8"),
    ("", "blank_line"),
    ("   ", "blank_line"),
    ("\u00a0\u3000", "blank_line"),  # Unicode spaces only
    ("{not json", "invalid_json"),
    ('{"messages": [}', "invalid_json"),
    ("[1, 2, 3]", "not_an_object"),
    ('"just a string"', "not_an_object"),
    ({"text_only": "hi"}, "missing_fields"),
    ({"messages": "hello"}, "wrong_type"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, "wrong_type"),
    ({"messages": [{"role": 1, "content": "q"}, {"role": "assistant", "content": "x"}]}, "wrong_type"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "wrong_type"),
    ({"messages": [{"role": None, "content": "q"}, {"role": "assistant", "content": "x"}]}, "wrong_type"),
    ({"messages": [None, {"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]}, "wrong_type"),
    ({"messages": ["q", {"role": "assistant", "content": "x"}]}, "wrong_type"),
    (
        {"messages": [{"content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]},
        "wrong_type",
    ),  # a message without a role (before, it passed and kept a null role)
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": "x"}]},
        "wrong_type",
    ),
    ({"messages": []}, "empty_conversation"),
    ({"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "x"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": "  \t "}, {"role": "assistant", "content": "x"}]}, "empty_prompt"),
    (
        {"messages": [{"role": "user", "content": "\u200b\u00a0"}, {"role": "assistant", "content": "x"}]},
        "empty_prompt",
    ),
    ({"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": ""}]}, "empty_response"),
    (
        {"messages": [{"role": "user", "content": "q2?"}, {"role": "assistant", "content": "\x00\x07"}]},
        "empty_response",
    ),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}, "no_user_turn"),
    (
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "q"}]},
        "no_final_assistant_turn",
    ),
    ({"messages": [{"role": "user", "content": "q"}]}, "no_final_assistant_turn"),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "x"},
            ]
        },
        "consecutive_same_role",
    ),
    ("DUP0", "duplicate"),  # replaced below by an exact copy of good row 0
    ("DUP1", "duplicate"),  # a copy of good row 1 with extra spaces and CRLF: equal after normalization
    ("NEAR", "near_duplicate"),  # good row 2 with one word changed at the end
]


def bad_file_lines() -> tuple[list, dict[int, str]]:
    good = good_rows(40)
    lines: list = list(good)
    expected = {}
    for row, reason in BAD_ROWS:
        if row == "DUP0":
            row = good[0]
        elif row == "DUP1":
            m = good[1]["messages"]
            row = chat("  " + m[0]["content"] + " \r\n", m[1]["content"] + "\t  ")
        elif row == "NEAR":
            m = good[2]["messages"]
            row = chat(m[0]["content"], m[1]["content"] + " indeed")
        lines.append(row)
        expected[len(lines)] = reason
    return lines, expected


def test_every_bad_row_kind_lands_in_quarantine_with_its_reason(tmp_path):
    lines, expected = bad_file_lines()
    assert len(BAD_ROWS) >= 20
    r = run(tmp_path, "bad", lines, pii="off", near_duplicate_threshold=0.7)
    got = quarantined(r)
    assert got == expected
    assert r.rows_in == len(lines) and r.rows_train + r.rows_eval == 40
    counts: dict[str, int] = {}
    for reason in expected.values():
        counts[reason] = counts.get(reason, 0) + 1
    assert r.by_reason == counts
    raw = {int(x["source"].rsplit(":", 1)[1]): x["raw"] for x in read_split(r, "quarantine")}
    assert "\ufffd" in raw[41]  # the undecodable bytes are kept, visibly replaced


def test_normalization(tmp_path):
    r = run(
        tmp_path,
        "norm",
        [chat("Cafe\u0301\r\nline two  \n\n\n\nend\x07", "  x\u00a0y  ")],
        eval_fraction=0.01,
        pii="off",
    )
    (row,) = read_split(r, "train") + read_split(r, "eval")
    assert row["messages"] == [
        {"role": "user", "content": "Café\nline two\n\nend"},
        {"role": "assistant", "content": "x y"},
    ]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("kind", ["json_array", "csv", "parquet"])
def test_file_types(tmp_path, kind):
    rows = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(30)]
    if kind == "json_array":
        src = tmp_path / "d.json"
        src.write_text(json.dumps(rows))
    else:
        jsonl = write(tmp_path / "tmp.jsonl", rows)
        src = tmp_path / f"d.{kind}"
        duckdb.sql(f"COPY (SELECT * FROM read_json_auto('{jsonl}')) TO '{src}' (FORMAT {kind})")
    r = clean_dataset("d", DatasetSpec(path=str(src)), src, tmp_path / "out")
    assert r.detected_format == "alpaca" and r.rows_in == 30 and r.rows_quarantined == 0
    sources = {x["source"] for x in read_split(r, "train") + read_split(r, "eval")}
    assert f"{src}:1" in sources and f"{src}:30" in sources


def test_glob_of_files_with_different_formats(tmp_path):
    write(tmp_path / "a.jsonl", [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}])
    write(
        tmp_path / "b.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "be brief"},
                    {"from": "human", "value": "hi"},
                    {"from": "gpt", "value": "yo"},
                ]
            }
        ],
    )
    write(tmp_path / "c.jsonl", [{"text": "plain text document"}])
    write(tmp_path / "d.jsonl", [{"instruction": "i", "output": "o", "history": [["h1", "a1"], ["h2", "a2"]]}])
    r = clean_dataset("g", DatasetSpec(path="*.jsonl", eval_fraction=0.01), str(tmp_path / "*.jsonl"), tmp_path / "o")
    assert [f.format for f in r.files] == ["prompt_completion", "sharegpt", "text", "alpaca"]
    assert r.detected_format.startswith("mixed") and r.rows_quarantined == 0
    by_source = {x["source"].split("/")[-1]: x["messages"] for x in read_split(r, "train") + read_split(r, "eval")}
    assert [m["role"] for m in by_source["b.jsonl:1"]] == ["system", "user", "assistant"]
    assert by_source["c.jsonl:1"] == [{"role": "assistant", "content": "plain text document"}]
    assert [m["content"] for m in by_source["d.jsonl:1"]] == ["h1", "a1", "h2", "a2", "i", "o"]


def test_crlf_files_blank_lines_and_numbering_across_files(tmp_path):
    """CRLF line ends are not content; empty, CR-only and space-only lines are blank_line at their own line number
    (a tab-only line is not blank: invalid JSON); the final newline makes no row; rows of later files keep their
    own file:line references."""
    rows = [json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}).encode() for i in range(3)]
    (tmp_path / "a.jsonl").write_bytes(rows[0] + b"\r\n\r\n" + b"   \r\n" + b"\t\n" + rows[1] + b"\r\n")
    (tmp_path / "b.jsonl").write_bytes(b"\n" + rows[2] + b"\n")
    r = clean_dataset("c", DatasetSpec(path="x", eval_fraction=0.01), str(tmp_path / "*.jsonl"), tmp_path / "o")
    assert r.rows_in == 7 and [f.rows for f in r.files] == [5, 2]
    got = {x["source"].split("/")[-1]: x["reason"] for x in read_split(r, "quarantine")}
    assert got == {
        "a.jsonl:2": "blank_line",
        "a.jsonl:3": "blank_line",
        "a.jsonl:4": "invalid_json",
        "b.jsonl:1": "blank_line",
    }
    kept = {
        x["source"].split("/")[-1]: x["messages"][1]["content"] for x in read_split(r, "train") + read_split(r, "eval")
    }
    assert kept == {"a.jsonl:1": "c0", "a.jsonl:5": "c1", "b.jsonl:2": "c2"}


def test_messages_content_as_text_parts(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "hi"},
        ]
    }
    r = run(tmp_path, "parts", [row], eval_fraction=0.01)
    assert read_split(r, "train")[0]["messages"][0]["content"] == "Hello there"


def test_pii_modes(tmp_path):
    rows = [
        chat("mail me at jane.doe@example.com or call +1 415-555-0132", "my server is 192.168.10.20"),
        chat("clean question", "clean answer"),
    ]
    redacted = run(tmp_path, "pii_redact", rows, eval_fraction=0.01)
    texts = json.dumps(read_split(redacted, "train"))
    assert "<EMAIL>" in texts and "<PHONE>" in texts and "<IPV4>" in texts and "example.com" not in texts
    assert redacted.pii_redactions == {"email": 1, "ipv4": 1, "phone": 1}
    q = run(tmp_path, "pii_q", rows, pii="quarantine", eval_fraction=0.01)
    assert q.by_reason == {"pii": 1} and q.rows_train == 1
    off = run(tmp_path, "pii_off", rows, pii="off", eval_fraction=0.01)
    assert "jane.doe@example.com" in json.dumps(read_split(off, "train")) and off.pii_redactions == {}


def test_leakage_moves_eval_rows_with_a_train_prompt(tmp_path):
    # the same question with different answers: different content hashes, so some land in eval at first
    rows = [chat("What is the capital of France?", f"Paris, version {i}") for i in range(60)]
    r = run(tmp_path, "leak", rows, near_duplicate_threshold=None, eval_fraction=0.3)
    assert r.rows_eval == 0 and r.leakage_moved_to_train > 0 and r.rows_train == 60


def test_split_reproduces_exactly(tmp_path):
    rows = good_rows(300)
    a = run(tmp_path, "s1", rows)
    b = run(tmp_path, "s2", list(reversed(rows)))
    ids = lambda rep: sorted(x["id"] for x in read_split(rep, "eval"))  # noqa: E731
    assert ids(a) == ids(b) and 10 < len(ids(a)) < 60


def test_minhash_finds_near_duplicates_and_spares_distinct_rows():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=(50, 40), dtype=np.uint64)
    rows = [base[i] for i in range(50)]
    rows.append(np.r_[base[3][:-1], np.uint64(12345)])  # 39 of 40 shingles shared: Jaccard ~0.95
    rows.append(np.r_[base[4][:20], rng.integers(0, 2**63, size=20, dtype=np.uint64)])  # Jaccard 1/3
    rids = np.concatenate([np.full(len(r), i) for i, r in enumerate(rows)])
    sig = minhash_signatures(rids, np.concatenate(rows))
    dup = near_duplicate_of(sig, 0.9)
    assert dup[50] == 3 and dup[51] == -1 and (dup[:50] == -1).all()
    same = np.random.default_rng(1).integers(0, 2**32, size=(12, 64), dtype=np.uint64).astype(np.uint32)
    same[[7, 9, 2]] = same[4]  # four identical rows: the earliest (4 is later than 2) keeps, the rest point to it
    assert near_duplicate_of(same, 0.9).tolist() == [-1, -1, -1, -1, 2, -1, -1, 2, -1, 2, -1, -1]


def test_chunked_minhash_equals_the_one_pass_definition():
    """The cache-sized, multi-threaded MinHash gives exactly the signatures of the plain definition (64 passes
    over all shingles), across many work units; the fused trigram path equals trigrams-then-MinHash."""
    from lora_assets.clean import word_trigram_hashes, word_trigram_signatures
    from lora_assets.clean.near_dup import _permutations

    rng = np.random.default_rng(3)
    lens = rng.integers(1, 60, size=12_000)  # ~350 k entries: several work units, rows of 1 and 2 words too
    rids = np.repeat(np.arange(len(lens)) * 7, lens)  # row ids need not be dense
    h = rng.integers(0, 2**64, size=len(rids), dtype=np.uint64)
    a, b = _permutations(0)
    h32 = ((h >> np.uint64(32)) ^ h).astype(np.uint32)
    starts = np.flatnonzero(np.r_[True, rids[1:] != rids[:-1]])
    with np.errstate(over="ignore"):
        expected = np.stack([np.minimum.reduceat(h32 * a[k] + b[k], starts) for k in range(len(a))], axis=1)
    assert np.array_equal(minhash_signatures(rids, h), expected)
    assert np.array_equal(word_trigram_signatures(rids, h), minhash_signatures(*word_trigram_hashes(rids, h)))


def test_unreadable_or_empty_files_fail_clearly(tmp_path):
    with pytest.raises(CleanError, match="matches no file"):
        clean_dataset("d", DatasetSpec(path="x"), str(tmp_path / "*.jsonl"), tmp_path / "out")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"a": 1}, {"b": ')
    with pytest.raises(CleanError, match="cannot be read as .json"):
        clean_dataset("d", DatasetSpec(path="x"), bad, tmp_path / "out")
    txt = tmp_path / "d.txt"
    txt.write_text("hello")
    with pytest.raises(CleanError, match="unsupported file type"):
        clean_dataset("d", DatasetSpec(path="x"), txt, tmp_path / "out")
    junk = write(tmp_path / "junk.jsonl", [{"foo": 1}])
    with pytest.raises(CleanError, match="match no known format"):
        clean_dataset("d", DatasetSpec(path="x"), junk, tmp_path / "out")


def test_near_duplicates_in_any_script(tmp_path):
    """Words are runs of Unicode letters and digits: Cyrillic or Greek text gets near-duplicate detection too (with
    ASCII-only words it had no shingles at all), and a distinct text in the same script is kept."""
    ru = (
        "быстрая лиса прыгает через ленивую собаку и бежит дальше в тёмный лес где растут высокие старые сосны "
        "а за лесом течёт широкая река по которой плывут лодки рыбаков с утра до самого позднего вечера каждый "
        "день кроме воскресенья когда все отдыхают дома с семьёй и пьют горячий чай"
    )
    el = "η γρήγορη αλεπού πηδά πάνω από τον τεμπέλη σκύλο και τρέχει μακριά στο σκοτεινό δάσος με τα ψηλά πεύκα"
    rows = [
        *good_rows(40),
        chat("Что это?", ru),
        chat("Что это?", ru + " сегодня"),
        chat("Τι είναι;", el),
        chat("Τι είναι;", el.replace("πεύκα", "έλατα")),
        chat("Что там?", "совсем другой текст о погоде " * 3),
    ]
    got = quarantined(run(tmp_path, "scripts", rows, pii="off"))
    assert got == {42: "near_duplicate", 44: "near_duplicate"}


def test_word_trigrams_stay_inside_rows():
    from lora_assets.clean import word_trigram_hashes

    rows = np.array([0, 0, 0, 0, 1, 1, 2, 3, 3, 3], dtype=np.int64)  # 4 words, 2 words, 1 word, 3 words
    words = np.arange(1, 11, dtype=np.uint64)
    rids, tri = word_trigram_hashes(rows, words)
    assert rids.tolist() == [0, 0, 1, 2, 3]
    assert len(set(tri.tolist())) == 5
    again = word_trigram_hashes(np.array([5, 5, 5], dtype=np.int64), np.array([8, 9, 10], dtype=np.uint64))[1]
    assert again[0] == tri[4]  # the trigram depends on the words, not on the row or position


def test_plain_text_rows_still_get_an_eval_split(tmp_path):
    rows = [{"text": f"document number {i} about topic {i * 13}"} for i in range(200)]
    r = run(tmp_path, "texts", rows)
    assert r.detected_format == "text" and r.leakage_moved_to_train == 0
    assert 5 < r.rows_eval < 40
    from lora_assets.clean import check_no_leakage

    assert check_no_leakage(r).passed
