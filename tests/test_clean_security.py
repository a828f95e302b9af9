"""Hostile or unlucky inputs to cleaning: byte-order marks, UTF-16, a broken CSV quote, paths that are not files,
symlinks out of a glob's tree, quotes in paths, non-string alpaca fields, and a held-out split too small to evaluate
on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import dagster as dg
import pytest

from lora_assets.clean import CleanError, check_min_eval_rows, clean_dataset, read_split
from lora_assets.spec import DatasetSpec, validate_spec


def pairs(n: int, prefix: str = "p") -> list[dict]:
    return [{"prompt": f"{prefix} question {i}, with a comma", "completion": f"answer {i}"} for i in range(n)]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def clean(src: Path | str, tmp_path: Path, **spec):
    report = clean_dataset("d", DatasetSpec(path=str(src), **spec), src, tmp_path / "out")
    assert report.rows_in == report.rows_train + report.rows_eval + report.rows_quarantined
    return report


def kept(report) -> dict[int, list[dict]]:
    rows = read_split(report, "train") + read_split(report, "eval")
    return {int(r["source"].rsplit(":", 1)[1]): r["messages"] for r in rows}


def quarantined(report) -> dict[int, str]:
    return {int(r["source"].rsplit(":", 1)[1]): r["reason"] for r in read_split(report, "quarantine")}


@pytest.mark.parametrize("ext", ["jsonl", "csv", "json"])
def test_utf8_bom_is_not_part_of_row_1(tmp_path, ext):
    rows = pairs(5)
    if ext == "jsonl":
        text = jsonl(rows)
    elif ext == "json":
        text = json.dumps(rows)
    else:
        text = "prompt,completion\n" + "".join(f'"{r["prompt"]}",{r["completion"]}\n' for r in rows)
    src = tmp_path / f"d.{ext}"
    src.write_bytes(b"\xef\xbb\xbf" + text.encode())
    r = clean(src, tmp_path)
    assert r.rows_in == 5 and r.rows_quarantined == 0 and r.detected_format == "prompt_completion"
    assert kept(r)[1][0]["content"] == "p question 0, with a comma"
    assert r.files[0].encoding == "UTF-8 with BOM"


@pytest.mark.parametrize(
    "codec, name", [("utf-16-le", "UTF-16LE"), ("utf-16-be", "UTF-16BE"), ("utf-32-le", "UTF-32LE")]
)
@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_utf16_with_a_bom_is_decoded(tmp_path, codec, name, ext):
    rows = pairs(5) + [{"prompt": "Grüße, 日本語?", "completion": "ja 🙂"}]
    if ext == "jsonl":
        text = jsonl(rows)
    else:
        text = "prompt,completion\r\n" + "".join(f'"{r["prompt"]}",{r["completion"]}\r\n' for r in rows)
    src = tmp_path / f"d.{ext}"
    src.write_bytes("\ufeff".encode(codec) + text.encode(codec))
    r = clean(src, tmp_path)
    assert r.rows_in == 6 and r.rows_quarantined == 0
    assert kept(r)[6] == [{"role": "user", "content": "Grüße, 日本語?"}, {"role": "assistant", "content": "ja 🙂"}]
    assert r.files[0].encoding == f"{name}, decoded to UTF-8"


def test_utf16_that_does_not_decode_or_has_no_bom_is_refused_saying_so(tmp_path):
    bad = tmp_path / "bad.jsonl"  # a BOM, then a lone high surrogate (D800) before the first row
    bad.write_bytes(b"\xff\xfe" + b"\x00\xd8" + jsonl(pairs(3)).encode("utf-16-le"))
    with pytest.raises(CleanError, match=r"UTF-16LE byte-order mark but is not valid UTF-16LE .* at byte 2\)"):
        clean(bad, tmp_path)
    no_bom = tmp_path / "nobom.jsonl"
    no_bom.write_bytes(jsonl(pairs(3)).encode("utf-16-le"))
    with pytest.raises(CleanError, match="no row is a JSON object .*iconv -f UTF-16LE -t UTF-8.*UTF-16"):
        clean(no_bom, tmp_path)


def test_csv_unterminated_quote_quarantines_that_row_and_keeps_the_rest(tmp_path):
    lines = ["prompt,completion"] + [f'"{r["prompt"]}","{r["completion"]}"' for r in pairs(20)]
    lines[7] = '"a quote that never closes, at all,answer 6'  # data row 7
    lines[12] = '"a cell over\ntwo lines, quoted",answer 11'  # data row 12: one record, kept
    lines[15] = '"closed" then text,answer 14'  # data row 15: text after a closing quote
    src = tmp_path / "d.csv"
    src.write_text("\n".join(lines) + "\n")
    r = clean(src, tmp_path, eval_fraction=0.01)
    assert r.rows_in == 20 and quarantined(r) == {7: "invalid_csv", 15: "invalid_csv"}
    assert kept(r)[12][0]["content"] == "a cell over\ntwo lines, quoted" and len(kept(r)) == 18
    raw = {int(x["source"].rsplit(":", 1)[1]): x["raw"] for x in read_split(r, "quarantine")}
    assert raw[7] == lines[7]


def test_csv_other_delimiter_blank_line_and_wrong_cell_count(tmp_path):
    src = tmp_path / "d.csv"
    with src.open("w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["prompt", "completion"])
        w.writerows([r["prompt"], r["completion"]] for r in pairs(3))
        f.write("\r\n")  # data row 4: blank
        f.write("only one cell\r\n")  # data row 5
    r = clean(src, tmp_path, eval_fraction=0.01)
    assert r.rows_in == 5 and quarantined(r) == {4: "blank_line", 5: "invalid_csv"}
    assert kept(r)[1][0]["content"] == "p question 0, with a comma"


def test_directory_as_path_says_it_is_a_directory(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(CleanError, match=r"'.*data' is a directory, not a file .*data/\*\.jsonl.* Fix: correct"):
        clean(tmp_path / "data", tmp_path)


def test_symlink_loop_and_broken_symlink_as_path_say_what_they_are(tmp_path):
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    with pytest.raises(CleanError, match="loop.jsonl' is a symlink loop"):
        clean(loop, tmp_path)
    broken = tmp_path / "broken.jsonl"
    broken.symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(CleanError, match=r"broken.jsonl' is a symlink to '.*gone.jsonl', which does not exist"):
        clean(broken, tmp_path)


def test_recursive_glob_does_not_follow_a_symlinked_directory(tmp_path):
    (tmp_path / "outside.jsonl").write_text(jsonl(pairs(3, "outside")))
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.jsonl").write_text(jsonl(pairs(2, "a")))
    (data / "sub" / "b.jsonl").write_text(jsonl(pairs(2, "b")))
    (data / "up").symlink_to("..")  # out of the tree, and round a loop
    (data / "same").symlink_to("sub")  # inside the tree, but a second path to b.jsonl
    r = clean(str(data / "**" / "*.jsonl"), tmp_path, eval_fraction=0.01)
    assert [Path(f.path).relative_to(data).as_posix() for f in r.files] == ["a.jsonl", "sub/b.jsonl"]
    with pytest.raises(CleanError, match=r"matches no file \(the symlinked directories \['.*same', '.*up'\] were not"):
        clean(str(data / "*" / "outside.jsonl"), tmp_path)  # only data/up/outside.jsonl would match


def test_symlinked_directory_written_out_in_the_pattern_is_followed(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.jsonl").write_text(jsonl(pairs(2)))
    (tmp_path / "link").symlink_to(real)
    r = clean(str(tmp_path / "link" / "*.jsonl"), tmp_path, eval_fraction=0.01)
    assert [f.path for f in r.files] == [str(tmp_path / "link" / "a.jsonl")]


@pytest.mark.parametrize(
    "row",
    [
        {"instruction": "Say hi", "output": 5},
        {"instruction": "Say hi", "output": {"a": 1}},
        {"instruction": "Say hi", "output": ["h", "i"]},
        {"instruction": "Say hi", "output": True},
        {"instruction": ["Say", "hi"], "output": "hi"},
        {"instruction": "Say hi", "output": "hi", "history": [["q", ["a"]]]},
        {"instruction": "Say hi", "output": "hi", "history": [["q", "a", "dropped"]]},
        {"instruction": "Say hi", "output": "hi", "history": ["q"]},
    ],
)
def test_alpaca_field_that_is_not_a_string_is_wrong_type(tmp_path, row):
    good = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(10)]
    src = tmp_path / "d.jsonl"
    src.write_text(jsonl([*good, row]))
    r = clean(src, tmp_path, format="alpaca")
    assert quarantined(r) == {11: "wrong_type"} and r.rows_train + r.rows_eval == 10


def test_text_parts_only_in_the_messages_format(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text(jsonl([*pairs(3), {"prompt": "q?", "completion": [{"type": "text", "text": "a"}]}]))
    assert quarantined(clean(src, tmp_path, eval_fraction=0.01)) == {4: "wrong_type"}


def test_empty_eval_split_fails_its_check_naming_the_field_and_the_fix(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text(jsonl(pairs(3)))
    r = clean(src, tmp_path, eval_fraction=0.01)
    assert r.rows_eval == 0 and r.rows_train == 3
    outcome = check_min_eval_rows(r, DatasetSpec(path="x").min_eval_rows)
    assert not outcome.passed
    assert outcome.detail == (
        "dataset 'd' has no eval rows, fewer than datasets.d.min_eval_rows = 1 (3 train rows). "
        "Fix: raise datasets.d.eval_fraction or add data (or lower datasets.d.min_eval_rows)."
    )
    (tmp_path / "big.jsonl").write_text(jsonl(pairs(200)))
    big = clean(tmp_path / "big.jsonl", tmp_path)
    assert check_min_eval_rows(big, 5).passed and not check_min_eval_rows(big, big.rows_eval + 1).passed


def test_empty_eval_split_blocks_training_in_the_same_run(tmp_path, random_base):
    from orchestration.assets import build_assets
    from orchestration.resources import resources_from_env

    (tmp_path / "d.jsonl").write_text(jsonl(pairs(3)))
    spec = validate_spec(
        {
            "base_model": str(random_base),
            "datasets": {"d": {"path": "d.jsonl", "eval_fraction": 0.01}},
            "adapters": {"a": {"dataset": "d", "max_steps": 1, "batch_size": 2}},
        },
        tmp_path,
    )
    result = dg.materialize(
        build_assets(spec, deployment=False),
        selection=["dataset/d/clean", "adapter/a/train"],
        raise_on_error=False,
        resources=resources_from_env(tmp_path / "home"),
    )
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    assert checks["min_eval_rows"].passed is False
    assert "datasets.d.eval_fraction" in checks["min_eval_rows"].description
    assert checks["min_train_rows"].passed is True
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"dataset/d/clean"}  # training never started


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_quotes_in_paths_are_data_not_sql(tmp_path, ext):
    """Source and output paths reach DuckDB as bound parameters: a quote in a folder or file name (``it's``) is
    read and written like any other name (pasted into the SQL text, it ended the string literal)."""
    home = tmp_path / "it's here"
    home.mkdir()
    src = home / f"o'brien.{ext}"
    if ext == "parquet":
        import duckdb

        duckdb.execute(
            "COPY (SELECT 'question ' || i AS prompt, 'answer ' || i AS completion FROM range(20) t(i)) "
            "TO ? (FORMAT parquet)",
            [str(src)],
        )
    else:
        src.write_text(jsonl(pairs(20)), encoding="utf-8")
    r = clean(src, home)
    assert (r.rows_train + r.rows_eval, r.rows_quarantined) == (20, 0)
    assert all(row["source"].startswith(f"{src}:") for row in read_split(r, "train") + read_split(r, "eval"))
