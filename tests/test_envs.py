"""Every environment variable is declared once, in lora_assets/envs.py, and read through it (issue 26, item 2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_assets import envs

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lora_assets", "registry", "serving", "orchestration", "bench")
# a variable's name as a string literal in code: the only place that may hold one is envs.py
NAME_LITERAL = re.compile(r"""["'](LORAFOUNDRY_[A-Z0-9_]+|VLLM_API_KEY)["']""")


def test_no_module_but_envs_spells_a_variable_name_in_code():
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "lora_assets" / "envs.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if NAME_LITERAL.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "read these through lora_assets/envs.py:\n" + "\n".join(found)


def test_each_name_is_declared_once_and_documented():
    names = [var.name for var in envs.ALL.values()]
    assert len(names) == len(set(names))
    source = (ROOT / "lora_assets" / "envs.py").read_text()
    for var in envs.ALL.values():
        assert source.count(f'"{var.name}"') == 1
        assert var.doc


def test_unset_and_empty_mean_the_default_and_values_are_typed():
    assert envs.RESOLVE_TTL_S.get({}) == 2.0
    assert envs.RESOLVE_TTL_S.get({envs.RESOLVE_TTL_S.name: " "}) == 2.0
    assert envs.RESOLVE_TTL_S.get({envs.RESOLVE_TTL_S.name: "0.5"}) == 0.5
    assert envs.MAX_LORA_RANK.get({envs.MAX_LORA_RANK.name: "64"}) == 64
    assert envs.HOME.get({}) is None
    assert not envs.ADMIN_KEY.is_set({envs.ADMIN_KEY.name: ""})


@pytest.mark.parametrize(
    ("var", "text"),
    [(envs.RESOLVE_TTL_S, "soon"), (envs.BODY_TIMEOUT_S, "-1"), (envs.MAX_CONNECTIONS_PER_CLIENT, "0")],
)
def test_a_bad_value_names_the_variable_the_value_and_the_fix(var, text):
    with pytest.raises(ValueError) as info:
        var.get({var.name: text})
    message = str(info.value)
    assert var.name in message and repr(text) in message and var.doc in message


def test_a_test_setting_reaches_the_reader(monkeypatch):
    """Values are read when asked for, not at import, so monkeypatch.setenv takes effect."""
    monkeypatch.setenv(envs.SERVING_URL.name, "http://lb.internal:8000")
    assert envs.SERVING_URL.get() == "http://lb.internal:8000"
