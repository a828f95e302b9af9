"""May this server serve this version: the registry LoRA resolver, and the one admission rule it applies.

:meth:`AdapterResolver.admit` decides for a registry record, the same way for start-up (serving/launch.py, which
leaves out and names what it refuses), for every request and admin load (serving/guard.py) and for vLLM's resolver
plugin (serving/vllm_plugin.py): servable status, the server's base, rank, the adapter root, the registered files'
sha256, the verified copy vLLM reads (staged, or staged again when it changed on disk), and weights vLLM can load.
A refusal is a :class:`Refusal`: an HTTP status, an OpenAI error type and a message that names versions, never
this machine's paths. :meth:`AdapterResolver.resolve` adds the lookup of a model reference and a short cache.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from registry.errors import (
    AdapterNotFoundError,
    RegistryBusyError,
    RegistryConflictError,
    RegistryCorruptError,
    RegistryError,
    RegistryInputError,
    RegistryUnavailableError,
)
from registry.location import is_object_url
from registry.records import AdapterRecord, adapter_sha256
from registry.rules import SERVABLE_STATUSES, parse_ref
from registry.store import AdapterRegistry
from serving.integrity import (
    IntegrityError,
    multi_lora_problem,
    nonfinite_problem,
    restage,
    stage,
    staged_intact,
    weights_problem,
)
from serving.settings import RESOLVE_TTL_S, ServerSettings

log = logging.getLogger(f"vllm.lorafoundry.{__name__}")  # under "vllm": kept and printed by vLLM's logging

#: Registry errors as HTTP answers, by type: (status, OpenAI error type). An error takes the entry of the nearest
#: class in its MRO, so a subclass added to the registry later gets its parent's answer until it has its own.
#: Busy past the wait, a damaged file, anything else the registry cannot do: the server's fault, not the client's.
REGISTRY_ERRORS: dict[type[RegistryError], tuple[int, str]] = {
    RegistryError: (503, "RegistryUnavailable"),
    RegistryInputError: (400, "InvalidModelName"),
    AdapterNotFoundError: (404, "NotFoundError"),
    RegistryConflictError: (409, "RegistryConflict"),
    RegistryBusyError: (503, "RegistryUnavailable"),
    RegistryCorruptError: (503, "RegistryUnavailable"),
    RegistryUnavailableError: (503, "RegistryUnavailable"),
}

#: What a client is told when the registry fails on the server's side (the details, with paths, go to the log).
REGISTRY_UNAVAILABLE = "the adapter registry is unavailable; the server's log says why."

#: Resolver answers shared across the process: (settings..., ref) -> (monotonic times the lookup started and
#: ended, answer).
_ANSWERS: dict[tuple, tuple[float, float, AdapterRecord | Refusal]] = {}
_ANSWERS_LOCK = threading.Lock()  # guards the dict only; lookups run under the per-ref lock below


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: an HTTP status, an OpenAI error type, a message and the offending parameter."""

    status: int
    type: str
    message: str
    param: str | None = "model"

    def body(self) -> bytes:
        return json.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}
        ).encode()


def registry_refusal(error: RegistryError, param: str | None = "model") -> Refusal:
    """The answer to a registry error, chosen by its type in :data:`REGISTRY_ERRORS` (never by its message). A
    server-side failure's message names files of this machine: it goes to the server's log, and the client is
    told only that the registry is unavailable."""
    status, kind = next(REGISTRY_ERRORS[c] for c in type(error).__mro__ if c in REGISTRY_ERRORS)
    if status >= 500:
        log.error("registry unavailable: %s", error)
        return Refusal(status, kind, REGISTRY_UNAVAILABLE, param)
    return Refusal(status, kind, str(error), param)


class _KeyLocks:
    """One lock per key, like vLLM's ``lora_resolver_lock = defaultdict(Lock)``, but a key's lock is dropped once
    no thread holds or waits for it: the keys are client-chosen names, so the table must not grow with them."""

    def __init__(self) -> None:
        self._table_lock = threading.Lock()
        self._locks: dict[Hashable, tuple[threading.Lock, list[int]]] = {}  # key -> (lock, [threads using it])

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        with self._table_lock:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._table_lock:
                users[0] -= 1
                if not users[0]:
                    del self._locks[key]


#: Concurrent requests for one uncached ref wait for a single lookup (and sha256) while other refs proceed.
_LOOKUP_LOCKS = _KeyLocks()


class AdapterResolver:
    """Resolve a model reference to a registered adapter that this server may load, and stage its verified copy.

    Args:
        settings: what the server serves and from where (registry, base hash, adapter root, verified store, rank).
        ttl_s: how long an answer is reused (default :data:`serving.settings.RESOLVE_TTL_S`).
    """

    def __init__(self, settings: ServerSettings, ttl_s: float | None = None) -> None:
        self.settings = settings
        self.registry = AdapterRegistry(settings.registry, max_wait_s=10, actor="vllm", store=settings.store)
        self.base_hash, self.max_rank = settings.base_hash, settings.max_rank
        self.adapter_root = Path(settings.adapter_root).resolve()
        self.stage_root = Path(settings.stage_root)
        self.ttl_s = RESOLVE_TTL_S if ttl_s is None else ttl_s

    @classmethod
    def from_env(cls) -> AdapterResolver | None:
        """The resolver of a server lorafoundry started (:meth:`ServerSettings.from_env`), else None."""
        settings = ServerSettings.from_env()
        return None if settings is None else cls(settings)

    def resolve(self, ref: str, fresh: bool = False) -> AdapterRecord | Refusal:
        """The record to load for ``ref``, or the reason it is refused; answers are kept ``ttl_s`` seconds and
        shared by every resolver of the process with the same settings (the guard and vLLM's resolver plugin
        ask about the same name one after the other: one registry read and one sha256 serve both). Concurrent
        asks for one ref share one lookup; other refs do not wait for it. ``fresh``: ask the registry now (an
        admin load right after a promotion), and keep that answer for the others."""
        key = (str(self.registry.path), self.base_hash, str(self.adapter_root), self.max_rank, ref)
        asked = time.monotonic()
        if not fresh and (hit := self._cached(key)) is not None:
            return hit
        with _LOOKUP_LOCKS.hold(key):
            # an answer found while this thread waited is taken whatever its age (a lookup may outlast ttl_s)
            if not fresh and (hit := self._cached(key, found_after=asked)) is not None:
                return hit
            started = time.monotonic()
            outcome = self._resolve(ref)
            with _ANSWERS_LOCK:
                if len(_ANSWERS) > 10_000:  # names are client-chosen: bound the memory
                    _ANSWERS.clear()
                _ANSWERS[key] = (started, time.monotonic(), outcome)
        return outcome

    def _cached(self, key: tuple, found_after: float | None = None) -> AdapterRecord | Refusal | None:
        """The kept answer for ``key`` if it is under ``ttl_s`` old (counted from the start of its lookup) or its
        lookup ended after ``found_after``; else None."""
        with _ANSWERS_LOCK:
            hit = _ANSWERS.get(key)
        if hit is None:
            return None
        started, finished, outcome = hit
        fresh_enough = time.monotonic() - started < self.ttl_s
        return outcome if fresh_enough or (found_after is not None and finished > found_after) else None

    def resolve_staged(self, ref: str) -> Path | Refusal:
        """The verified copy vLLM reads for ``ref`` (see :meth:`resolve`)."""
        outcome = self.resolve(ref)
        return outcome if isinstance(outcome, Refusal) else self.stage_root / outcome.adapter_sha256

    def _resolve(self, ref: str) -> AdapterRecord | Refusal:
        try:
            rec = self._lookup(ref)
        except RegistryError as e:
            return registry_refusal(e)
        outcome = self.admit(rec)
        return outcome if isinstance(outcome, Refusal) else rec

    def admit(self, rec: AdapterRecord) -> Path | Refusal:
        """May this server serve ``rec``: the one rule for start-up (serving/launch.py), requests and admin loads.
        The record's checks (:meth:`refuse_record`), its registered files' sha256, its verified copy (staged, or
        staged again when the copy changed on disk) and the weights vLLM would read from that copy, their values
        included (NaN or infinity: :func:`serving.integrity.nonfinite_problem`). Returns the verified copy's dir, or
        why not."""
        refusal = self.refuse_record(rec)
        if refusal is not None:
            return refusal
        staged = self._verify_and_stage(rec)
        if isinstance(staged, Refusal):
            return staged
        refusal = _unservable(rec, staged)  # read from the bytes vLLM would be given
        if refusal is None and (problem := nonfinite_problem(staged)):  # values too: not in the catalog's check
            refusal = Refusal(400, "AdapterNotLoadable", f"{rec.name}@{rec.version} cannot be loaded: {problem}.")
        return refusal or staged

    def _lookup(self, ref: str) -> AdapterRecord:
        """The registry's record for ``ref``: ``name@VERSION`` / ``name:ALIAS`` as given, a plain name the version
        served under it (its champion, else its latest candidate). Raises the registry's errors."""
        name, version, alias = parse_ref(ref)  # the registry's name rule, checked before any registry read
        if ".." in ref:  # the rule allows "a..b"; this server has never answered such names
            raise RegistryInputError(f"model {ref[:100]!r} is not a valid name here: it contains '..'.")
        if version is not None or alias is not None:
            return self.registry.get(ref)
        rec = next((r for r in self.registry.servable() if r.name == name), None)
        if rec is None:
            raise AdapterNotFoundError(
                f"model {ref!r} does not exist: no servable adapter of that name in the registry."
            )
        return rec

    def refuse_record(self, rec: AdapterRecord) -> Refusal | None:
        """Why this server may not load ``rec`` (status, base model, rank, location), or None."""
        if rec.status not in SERVABLE_STATUSES:
            return Refusal(
                403,
                "AdapterNotServable",
                f"{rec.name}@{rec.version} is {rec.status}; only candidates and champions are served.",
            )
        if rec.base_model_hash != self.base_hash:
            return Refusal(
                400,
                "BaseModelMismatch",
                f"{rec.name}@{rec.version} was trained on base "
                f"{rec.base_model!r} ({(rec.base_model_hash or '?')[:12]}), not on the model this server "
                f"serves ({self.base_hash[:12]}).",
            )
        if rec.r > self.max_rank:
            return Refusal(
                400,
                "RankTooLarge",
                f"{rec.name}@{rec.version} has r={rec.r}, above this server's "
                f"--max-lora-rank {self.max_rank}. Fix: restart the server (`lorafoundry serve`) so it "
                "sizes the rank for every registered adapter.",
            )
        if is_object_url(rec.path):
            if self.registry.store is None or not self.registry.store.holds(rec.path):
                log.warning("%s@%s: %s is not in this server's adapter store", rec.name, rec.version, rec.path)
                return Refusal(
                    403,
                    "PathNotAllowed",
                    f"{rec.name}@{rec.version} lives outside this server's adapter store; the server reads nothing "
                    "else.",
                )
        elif not Path(rec.path).resolve().is_relative_to(self.adapter_root):
            log.warning("%s@%s: %s is outside the adapter root %s", rec.name, rec.version, rec.path, self.adapter_root)
            return Refusal(
                403,
                "PathNotAllowed",
                f"{rec.name}@{rec.version} lives outside this server's adapter root; the server reads nothing else.",
            )
        return None

    def restage(self, sha256: str) -> Path:
        """Stage ``sha256`` again from its registered files (its verified copy changed on disk): a registered dir
        inside the adapter root with those bytes, else the store's objects, pulled and checked first. Raises
        :class:`IntegrityError` when no registered copy has those bytes."""
        records = [r for r in self.registry.list() if r.adapter_sha256 == sha256]
        dirs = [Path(r.path).resolve() for r in records if not is_object_url(r.path)]
        dirs = [d for d in dirs if d.is_relative_to(self.adapter_root)]
        store = self.registry.store
        objects = [r.path for r in records if is_object_url(r.path) and store is not None and store.holds(r.path)]
        if dirs or not objects:
            return restage(sha256, self.stage_root, dirs)
        try:
            pulled = store.pull(objects[0], sha256, self.stage_root)
        except RegistryError as e:
            raise IntegrityError(f"verified adapter {sha256[:12]}… changed on disk; pulling it failed: {e}") from None
        try:
            return restage(sha256, self.stage_root, [pulled])
        finally:
            shutil.rmtree(pulled, ignore_errors=True)

    def listable(self, rec: AdapterRecord) -> Refusal | None:
        """The catalog's filter: :meth:`refuse_record`, and weights vLLM cannot serve, read from the registered
        files without hashing them (a request for it runs all of :meth:`admit`)."""
        refusal = self.refuse_record(rec)
        if refusal is not None:
            return refusal
        if is_object_url(rec.path):  # not downloaded to be listed: its staged copy if any, else a request checks it
            staged = self.stage_root / rec.adapter_sha256
            return _unservable(rec, staged) if staged.is_dir() else None
        return _unservable(rec, Path(rec.path))

    def _verify_and_stage(self, rec: AdapterRecord) -> Path | Refusal:
        """Hash the registered files in full (no size/mtime shortcut: a changed copy is refused under every name)
        and return the verified copy vLLM reads (checked again there)."""
        changed = Refusal(
            409,
            "AdapterIntegrityError",
            f"{rec.name}@{rec.version}: files changed after registration (sha256 mismatch); refused. "
            "Fix: `lorafoundry registry verify`.",
        )
        if is_object_url(rec.path):
            return self._pull_and_stage(rec, changed)
        path = Path(rec.path).resolve()
        try:
            if adapter_sha256(path)[0] != rec.adapter_sha256:
                return changed
            return stage(path, rec.adapter_sha256, self.stage_root)
        except IntegrityError:
            return changed
        except OSError as e:
            log.error("%s@%s: files unreadable: %s", rec.name, rec.version, e)
            return Refusal(
                409, "AdapterIntegrityError", f"{rec.name}@{rec.version}: files unreadable (see the server log)."
            )

    def _pull_and_stage(self, rec: AdapterRecord, changed: Refusal) -> Path | Refusal:
        """The verified copy of a version in the adapter store. The objects' ETags are asked every time (a HEAD
        each): when they are the ones this process pulled and checked, the intact staged copy is used; otherwise
        the objects are pulled again and their sha256 checked before they are staged, so an object changed in the
        store after registration is refused under every name."""
        store, sha = self.registry.store, rec.adapter_sha256
        assert store is not None  # refuse_record refused an object URL without a store
        try:
            tags = store.etags(sha)
            staged = self.stage_root / sha
            if _PULLED.get(sha) == tags and staged_intact(staged):
                return staged
            pulled = store.pull(rec.path, sha, self.stage_root)
            try:
                out = stage(pulled, sha, self.stage_root)
            finally:
                shutil.rmtree(pulled, ignore_errors=True)
            _PULLED[sha] = tags
            return out
        except (RegistryConflictError, IntegrityError) as e:
            log.error("%s@%s: %s", rec.name, rec.version, e)
            return changed
        except RegistryError as e:
            return registry_refusal(e)


#: sha256 -> the ETags of the store's objects when this process last pulled and checked them.
_PULLED: dict[str, tuple[str, ...]] = {}


def _unservable(rec: AdapterRecord, adapter_dir: Path) -> Refusal | None:
    """Why vLLM cannot serve the adapter files in ``adapter_dir`` as they are: a variant its multi-LoRA kernels do
    not apply (DoRA), or weights it cannot load (not safetensors, tensors that do not fit the config)."""
    if problem := multi_lora_problem(adapter_dir):
        return Refusal(400, "VariantNotServable", f"{rec.name}@{rec.version} is not served here: {problem}.")
    if problem := weights_problem(adapter_dir):
        return Refusal(400, "AdapterNotLoadable", f"{rec.name}@{rec.version} cannot be loaded: {problem}.")
    return None
