"""Hostile or careless input reaching the real CLI: a glob through a directory of symlinks to itself, paths no file
could have, a home that is a file, and `registry sql` past its time and memory limits. Each is refused fast, by
name, with a short message and the CLI's exit code, never a hang or a traceback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lora_assets.files
from lora_assets.clean import CleanError, clean_dataset, resolve_sources
from lora_assets.spec import load_spec
from orchestration.cli import app
from registry.store import AdapterRegistry

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "sentiment.jsonl"
LORAFOUNDRY = Path(sys.executable).with_name("lorafoundry")


def write_spec(where: Path, path: str = str(DATA), base: str = "builtin:tiny", adapter: str = "") -> Path:
    spec = where / "spec.yaml"
    extra = f", {adapter}" if adapter else ""
    spec.write_text(
        f"base_model: {base}\ndatasets:\n  d: {{path: {path}}}\nadapters:\n  a: {{dataset: d{extra}}}\n",
        encoding="utf-8",
    )
    return spec


def invoke(*args: str) -> tuple[int, str, float]:
    """The CLI in this process: exit code, output (stdout and stderr), seconds taken."""
    start = time.perf_counter()
    res = CliRunner().invoke(app, list(args))
    assert not isinstance(res.exception, Exception), repr(res.exception)  # typer.Exit is a SystemExit
    return res.exit_code, res.output, time.perf_counter() - start


def flat(output: str) -> str:
    return " ".join(output.split())


# -- 3. a `**` glob never enters a symlinked directory, and looks at a bounded number of entries ---------------------


@pytest.fixture
def looped(tmp_path) -> Path:
    """`data/` holding one real.jsonl and l1, l2, l3 -> `.`: Python's recursive glob walks 3**40 paths there."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "real.jsonl").write_bytes(DATA.read_bytes())
    for link in ("l1", "l2", "l3"):
        (data / link).symlink_to(".")
    return write_spec(tmp_path, path='"data/**/*.jsonl"')


def test_glob_through_symlinks_to_itself_validates_at_once(looped):
    start = time.perf_counter()
    done = subprocess.run(
        [str(LORAFOUNDRY), "validate", str(looped)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok:" in done.stdout and time.perf_counter() - start < 30  # most of it is the CLI starting
    start = time.perf_counter()
    load_spec(looped)
    assert time.perf_counter() - start < 2


def test_cleaner_matches_the_files_the_spec_checked(looped, tmp_path):
    spec = load_spec(looped)
    assert resolve_sources(spec.dataset_path("d")) == [tmp_path / "data" / "real.jsonl"]
    report = clean_dataset("d", spec.datasets["d"], spec.dataset_path("d"), tmp_path / "out")
    assert [Path(f.path) for f in report.files] == [tmp_path / "data" / "real.jsonl"]


def test_glob_past_its_bound_is_a_spec_problem_and_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.setattr(lora_assets.files, "MAX_GLOB_ENTRIES", 20)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(30):
        (data / f"part{i:02}.jsonl").write_bytes(DATA.read_bytes())
    code, output, _ = invoke("validate", str(write_spec(tmp_path, path='"data/**/*.jsonl"')))
    assert code == 2, output
    text = flat(output)
    assert "datasets.d.path: the glob 'data/**/*.jsonl' looks at more than 20 files and directories" in text
    assert "Fix: narrow it" in text
    with pytest.raises(CleanError, match="looks at more than 20 files and directories"):
        resolve_sources(str(data / "**" / "*.jsonl"))


# -- 6. a path no file could have is a spec problem, cut short, exit 2 ------------------------------------------------


@pytest.mark.parametrize(
    ("field", "spec_args"),
    [
        ("base_model", {"base": "./" + "m" * 300}),
        ("base_model", {"base": "org/" + "m" * 300}),
        ("datasets.d.path", {"path": "d/" + "x" * (1 << 20) + ".jsonl"}),
        ("datasets.d.path", {"path": "d/" + "x" * (50 << 20) + ".jsonl"}),
    ],
    ids=["base-300-local", "base-300-hub", "path-1MiB", "value-50MiB"],
)
def test_path_too_long_for_any_file_is_a_short_spec_problem(tmp_path, field, spec_args):
    spec = write_spec(tmp_path, adapter="r: 0", **spec_args)  # and one more problem, listed with it
    code, output, seconds = invoke("validate", str(spec))
    assert code == 2, output[:2000]
    assert len(output) < 2000 and "Traceback" not in output, output[:2000]
    text = flat(output)
    assert "2 problem(s)" in text and "adapters.a.r:" in text
    assert f"{field}: '" in text and "longer than any file name can be (255)" in text and "Fix:" in text
    assert seconds < 10, seconds


def test_path_with_a_nul_character_is_a_spec_problem(tmp_path):
    code, output, _ = invoke("validate", str(write_spec(tmp_path, path='"d/a\\0b.jsonl"')))
    assert code == 2, output
    assert "datasets.d.path: 'd/a\\x00b.jsonl' contains a NUL character" in flat(output)


# -- 7. a home that is a file is refused by every command that takes --home -------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["registry", "list"], ["registry", "sql", "SELECT 1"], ["clean", "{spec}"], ["serve", "{spec}"], ["stop"]],
    ids=["registry-list", "registry-sql", "clean", "serve", "stop"],
)
@pytest.mark.parametrize("below", [False, True], ids=["home", "below"])
def test_home_that_is_a_file_is_refused(tmp_path, command, below):
    not_a_dir = tmp_path / "home-file"
    not_a_dir.write_text("not a directory\n")
    home = not_a_dir / "sub" if below else not_a_dir
    spec = str(write_spec(tmp_path))
    code, output, _ = invoke(*[arg.format(spec=spec) for arg in command], "--home", str(home))
    assert code == 1, output
    text = flat(output)
    assert f"home {home}:" in text and "is a file, not a directory. Fix: pass --home a directory" in text
    assert "adapter version(s)" not in output and "starting:" not in output  # neither listed nor started vLLM
    assert not_a_dir.read_text() == "not a directory\n"


# -- 8. `registry sql` stops at its time and memory limits ------------------------------------------------------------


@pytest.fixture
def registry_home(tmp_path) -> Path:
    home = tmp_path / "home"
    AdapterRegistry(home / "registry.duckdb").init()
    return home


def test_sql_stops_at_its_time_limit(registry_home):
    code, output, seconds = invoke(
        "registry", "sql", "SELECT sum(hash(range)) FROM range(30000000000)", "--home", str(registry_home),
        "--timeout", "1",
    )  # fmt: skip
    assert code == 1, output
    text = flat(output)
    assert "time limit of 1 s" in text and "--timeout" in text and "Traceback" not in output
    assert seconds < 10, seconds


def test_sql_stops_at_its_memory_limit_without_spilling_to_disk(registry_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # DuckDB would spill to ./.tmp
    query = "SELECT count(*) AS n FROM (SELECT DISTINCT range::VARCHAR || 'x' FROM range(1000000))"
    code, output, _ = invoke("registry", "sql", query, "--home", str(registry_home), "--memory-limit", "10MB")
    assert code == 1, output
    text = flat(output)
    assert "memory limit of 10MB" in text and "--memory-limit" in text and "Traceback" not in output
    assert not (tmp_path / ".tmp").exists()
    code, output, _ = invoke("registry", "sql", query, "--home", str(registry_home), "--json")
    assert code == 0 and '"n": 1000000' in output, output  # within the default limits, the same query answers


@pytest.mark.parametrize(("option", "value"), [("--memory-limit", "10XB"), ("--timeout", "0")])
def test_sql_limit_that_is_not_a_limit_is_refused(registry_home, option, value):
    code, output, _ = invoke("registry", "sql", "SELECT 1", "--home", str(registry_home), option, value)
    assert code == 1 and "Fix: pass" in flat(output), output
