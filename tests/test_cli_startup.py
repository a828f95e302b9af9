"""The CLI's light commands start without the heavy libraries: `--help`, `registry`, `validate` and `stop` import
no torch, Dagster, transformers, peft or vLLM (issue 26: each added seconds before any command did anything).

Each command runs in a fresh interpreter, as the `lorafoundry` console script runs it (`orchestration.cli:app`),
which then names the heavy modules it holds. How fast the commands start is measured by
`bench/cli_startup_bench.py`, not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_assets import envs

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "dagster", "transformers", "peft", "vllm", "datasets", "bitsandbytes", "matplotlib"]
MARK = "HEAVY_MODULES="

# Runs the CLI as the console script does, then (at exit, after Typer's SystemExit) prints the heavy modules loaded.
WRAPPER = f"""
import atexit, json, sys
atexit.register(lambda: print({MARK!r} + json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules))))
from orchestration.cli import app
app(sys.argv[1:], prog_name="lorafoundry")
"""


def run_cli(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``lorafoundry ARGS`` in a fresh interpreter; return the finished process and the heavy modules it
    imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFOUNDRY_")}
    env[envs.HOME.name] = str(tmp_path / "default-home")  # never the checkout's ./.lorafoundry
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    marks = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert marks, f"the wrapper printed no module list:\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(marks[-1].removeprefix(MARK))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--help"], "registry"),
        (["registry", "--help"], "list"),
        (["registry", "list", "--home", "{home}"], ""),
        (["validate", "examples/tiny.yaml"], "ok: examples/tiny.yaml"),
        (["stop", "--home", "{home}"], "nothing is serving"),
    ],
    ids=["help", "registry-help", "registry-list", "validate", "stop"],
)
def test_a_light_command_imports_no_heavy_library(args, says, tmp_path):
    assert (ROOT / "examples" / "tiny.yaml").is_file()
    home = tmp_path / "home"
    proc, heavy = run_cli([a.format(home=home) for a in args], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert says in proc.stdout
    assert heavy == []


def test_the_component_type_is_listed_without_importing_dagster():
    # `dg` finds component types by dir() of the registry module (pyproject's dagster_dg_cli.registry_modules)
    code = "import sys, orchestration; print('LoraFoundryPipeline' in dir(orchestration), 'dagster' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["True", "False"], proc.stderr


def test_an_unknown_attribute_of_the_package_is_an_attribute_error():
    import orchestration

    with pytest.raises(AttributeError, match="no_such_thing"):
        orchestration.no_such_thing  # noqa: B018


def test_the_component_type_is_still_the_package_attribute():
    from orchestration import LoraFoundryPipeline
    from orchestration.component import LoraFoundryPipeline as component_type

    assert LoraFoundryPipeline is component_type
