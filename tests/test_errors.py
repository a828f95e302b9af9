"""Registry errors are types: real operations raise the type that says what went wrong, and the CLI maps types
(never messages) to exit codes in one place."""

from __future__ import annotations

import duckdb
import pytest
from typer.testing import CliRunner

from orchestration import cli
from registry.errors import (
    AdapterNotFoundError,
    RegistryBusyError,
    RegistryConflictError,
    RegistryCorruptError,
    RegistryError,
    RegistryFileError,
    RegistryInputError,
    RegistrySchemaError,
    RegistryUnavailableError,
)
from registry.records import NewAdapter
from registry.schema import SCHEMA_VERSION
from registry.store import AdapterRegistry
from tests.test_registry import make_adapter_dir

ERRORS = [
    RegistryInputError,
    AdapterNotFoundError,
    RegistryConflictError,
    RegistryBusyError,
    RegistryFileError,
    RegistryCorruptError,
    RegistrySchemaError,
]


def test_every_registry_error_is_a_registry_error():
    for error in ERRORS:
        assert issubclass(error, RegistryError)


@pytest.fixture
def reg(tmp_path) -> AdapterRegistry:
    reg = AdapterRegistry(tmp_path / "r.duckdb")
    reg.register(NewAdapter(name="a", path=make_adapter_dir(tmp_path / "a1"), base_model="b"))
    rejected = make_adapter_dir(tmp_path / "a2", seed=1)
    reg.register(NewAdapter(name="a", path=rejected, base_model="b", status="rejected"))
    return reg


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda reg: reg.get("a@9"), AdapterNotFoundError),
        (lambda reg: reg.get("a:prod"), AdapterNotFoundError),
        (lambda reg: reg.promote("a", 9), AdapterNotFoundError),
        (lambda reg: reg.promote("a", 2), RegistryConflictError),  # rejected
        (lambda reg: reg.set_alias("a", "prod", 2), RegistryConflictError),
        (lambda reg: reg.set_alias("a", "champion", 1), RegistryInputError),
        (lambda reg: reg.get(".hidden"), RegistryInputError),
        (lambda reg: reg.list(order_by="no such metric"), RegistryInputError),
        (lambda reg: reg.query("DELETE FROM adapters"), RegistryInputError),
    ],
)
def test_operations_raise_the_type_that_says_what_went_wrong(reg, call, error):
    with pytest.raises(error):
        call(reg)


def test_a_bad_adapter_dir_is_an_input_error(reg, tmp_path):
    with pytest.raises(RegistryInputError, match="no adapter_config.json"):
        reg.register(NewAdapter(name="a", path=tmp_path, base_model="b"))


def test_a_newer_schema_is_a_schema_error(reg):
    con = duckdb.connect(str(reg.path))
    con.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', now())", [SCHEMA_VERSION + 1])
    con.close()
    with pytest.raises(RegistrySchemaError, match="newer than this lorafoundry"):
        reg.register(NewAdapter(name="a", path=make_adapter_dir(reg.path.parent / "a3", seed=3), base_model="b"))


def _show_raising(monkeypatch, tmp_path, error: BaseException):
    """`registry show a@1` with the registry raising ``error``."""

    def get(self, *a, **k):
        raise error

    monkeypatch.setattr(AdapterRegistry, "get", get)
    return CliRunner().invoke(cli.app, ["registry", "show", "a@1", "--home", str(tmp_path)])


#: The documented contract (docs/registry.md: "Every error is one message on stderr and exit 1"), written out here
#: rather than read from cli.EXIT_CODES, so that a change to that table fails this test until the docs change too.
DOCUMENTED_EXIT_CODES = {
    RegistryInputError: 1,
    AdapterNotFoundError: 1,
    RegistryConflictError: 1,
    RegistryBusyError: 1,
    RegistryFileError: 1,
    RegistryCorruptError: 1,
    RegistrySchemaError: 1,
    RegistryUnavailableError: 1,
}


def test_every_registry_error_type_has_a_documented_exit_code():
    """A new type in registry/errors.py fails here until its exit code is written into the contract above."""
    import registry.errors

    defined = {c for c in vars(registry.errors).values() if isinstance(c, type) and issubclass(c, RegistryError)}
    assert defined - {RegistryError} == set(DOCUMENTED_EXIT_CODES)


@pytest.mark.parametrize(("error", "code"), DOCUMENTED_EXIT_CODES.items(), ids=lambda v: getattr(v, "__name__", v))
def test_cli_exit_code_comes_from_the_type(monkeypatch, tmp_path, error, code):
    res = _show_raising(monkeypatch, tmp_path, error("some message"))
    assert res.exit_code == code and "some message" in res.output
    assert not isinstance(res.exception, Exception)  # a clean exit, no traceback


@pytest.mark.parametrize("message", ["no adapter 'a' version 1", "reworded: this text means nothing to the CLI", ""])
def test_rewording_a_message_keeps_the_exit_code(monkeypatch, tmp_path, message):
    monkeypatch.setitem(cli.EXIT_CODES, AdapterNotFoundError, 7)  # a code only the type can lead to
    res = _show_raising(monkeypatch, tmp_path, AdapterNotFoundError(message))
    assert res.exit_code == 7 and message in res.output
    assert _show_raising(monkeypatch, tmp_path, RegistryConflictError(message)).exit_code == 1


def test_a_subclass_takes_its_parents_code(monkeypatch, tmp_path):
    class NewKindOfConflict(RegistryConflictError):
        pass

    monkeypatch.setitem(cli.EXIT_CODES, RegistryConflictError, 9)
    assert _show_raising(monkeypatch, tmp_path, NewKindOfConflict("x")).exit_code == 9


def test_os_and_duckdb_errors_are_reported_and_bugs_keep_their_traceback(monkeypatch, tmp_path):
    assert _show_raising(monkeypatch, tmp_path, PermissionError("denied")).exit_code == 1
    assert _show_raising(monkeypatch, tmp_path, duckdb.IOException("io")).exit_code == 1
    res = _show_raising(monkeypatch, tmp_path, ValueError("a bug"))
    assert isinstance(res.exception, ValueError)
