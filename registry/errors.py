"""The registry's errors: one type per way an operation can fail, so callers dispatch on the type, never on the text.

Modelled on vLLM's ``vllm/exceptions.py``: the layers above map these types to their own answers in one place each
(the CLI to exit codes, ``orchestration/cli.py:EXIT_CODES``; the server's guard to HTTP statuses,
``serving/resolver.py:REGISTRY_ERRORS``), taking the entry of the nearest class in the error's MRO. Messages say what
failed, the bad value and the fix; they may be reworded freely.

::

    RegistryError                     anything the registry cannot do (the base; also a query's own DuckDB error)
    ├── RegistryInputError            a name, alias, version, status, metric, SQL statement, adapter dir or
    │                                 export dir that the registry refuses (the caller's to fix)
    ├── AdapterNotFoundError          no such adapter name, version or alias
    ├── RegistryConflictError         the request contradicts what is registered: a version that exists with
    │                                 other bytes, files that no longer match their sha256, a status that forbids
    │                                 the change (promoting a rejected version, aliasing an archived one)
    ├── RegistryBusyError             another writer or program kept the registry past the wait (retry later)
    ├── RegistryUnavailableError      the shared registry's server cannot be reached or refused this machine
    └── RegistryFileError             the registry file itself cannot be used as it is
        ├── RegistryCorruptError      not a valid or complete DuckDB database (restore a backup)
        └── RegistrySchemaError       written by a newer lorafoundry (upgrade)
"""

from __future__ import annotations


class RegistryError(RuntimeError):
    """A registry operation that cannot succeed; the base of every registry error."""


class RegistryInputError(RegistryError):
    """A name, alias, version, status, metric, SQL statement, adapter dir or export dir that the registry refuses."""


class AdapterNotFoundError(RegistryError):
    """No such adapter name, version or alias."""


class RegistryConflictError(RegistryError):
    """The request contradicts what is registered: a version present with another sha256, files that no longer
    match their sha256, or a status that forbids the change (only candidates and the champion can be promoted or
    aliased)."""


class RegistryBusyError(RegistryError):
    """The registry stayed locked by another writer or program for longer than the wait allowed."""


class RegistryUnavailableError(RegistryError):
    """The shared registry's server (Postgres) cannot be reached, or refused this machine's credentials."""


class RegistryFileError(RegistryError):
    """The registry file itself cannot be used as it is (the base of the two below)."""


class RegistryCorruptError(RegistryFileError):
    """The registry file is not a valid or complete DuckDB database."""


class RegistrySchemaError(RegistryFileError):
    """The registry file has a newer schema than this lorafoundry understands."""


__all__ = [
    "AdapterNotFoundError",
    "RegistryBusyError",
    "RegistryConflictError",
    "RegistryCorruptError",
    "RegistryError",
    "RegistryFileError",
    "RegistryInputError",
    "RegistrySchemaError",
    "RegistryUnavailableError",
]
