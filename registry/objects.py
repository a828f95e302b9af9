"""The adapter store in S3-compatible object storage, shared by several machines: adapters by content.

An adapter's two files (:data:`registry.records.ADAPTER_FILES`) live under ``<prefix>/<sha256>/``, the sha256 the
registry records for the version (over both files' names and bytes). So:

- the same bytes are stored once, whoever registers them, and an object is never overwritten (a put that finds
  the sha256 complete uploads nothing);
- a writer uploads both files, and only then commits the registry row that points at them: no version ever points
  at a missing or partial object (an S3 object appears whole or not at all);
- before uploading, a writer leaves a marker ``<prefix>/_uploads/<sha256>.<writer>``, and removes it after its
  row commits. A marker older than :data:`ORPHAN_AFTER_S` whose sha256 no row points at is an interrupted upload:
  the next writer removes its objects and the marker;
- a reader (a server) pulls a version's files into a new local dir, checks their sha256 against the registry's, and
  only then hands the dir to the verified store (:func:`serving.integrity.stage`), exactly as for local files.

Credentials and the endpoint come from the usual places (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``~/.aws``), read by boto3; no message shows a key.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import RegistryConflictError, RegistryInputError, RegistryUnavailableError
from registry.records import ADAPTER_FILES, adapter_sha256

#: URL scheme of the store (:func:`registry.location.is_object_url`).
SCHEME = "s3://"

#: An upload marker older than this, with no registry row for its sha256, belongs to a writer that died.
ORPHAN_AFTER_S = 15 * 60.0

#: Where writers leave their upload markers, under the store's prefix. Not ``.uploads``: SeaweedFS keeps its own
#: multipart uploads there and lists nothing under it.
UPLOADS = "_uploads"


@dataclass(frozen=True)
class AdapterStore:
    """``s3://BUCKET/PREFIX``: the adapters of a shared registry.

    Args:
        url: the bucket and the key prefix the adapters go under.
        orphan_after_s: an upload marker this old, whose sha256 no row points at, is an interrupted upload.
    """

    url: str
    orphan_after_s: float = ORPHAN_AFTER_S

    def __post_init__(self) -> None:
        bucket, _, prefix = self.url.removeprefix(SCHEME).partition("/")
        if not self.url.startswith(SCHEME) or not bucket or "@" in bucket or ".." in prefix.split("/"):
            raise RegistryInputError(
                f"adapter store {self.url[:200]!r} is not an s3://BUCKET/PREFIX URL. Fix: e.g. "
                "s3://team-adapters/lorafoundry; the endpoint goes in AWS_ENDPOINT_URL, the keys in "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws."
            )

    @property
    def bucket(self) -> str:
        return self.url.removeprefix(SCHEME).partition("/")[0]

    @property
    def prefix(self) -> str:
        return self.url.removeprefix(SCHEME).partition("/")[2].strip("/")

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def object_url(self, sha256: str) -> str:
        """The URL a registry row stores for the adapter with these bytes."""
        return f"{SCHEME}{self.bucket}/{self._key(sha256)}"

    def holds(self, url: str) -> bool:
        """Whether ``url`` names an adapter of this store."""
        try:
            self.sha256_of(url)
            return True
        except RegistryConflictError:
            return False

    def etags(self, sha256: str) -> tuple[str, ...]:
        """The ETags of the adapter's objects now (one HEAD each): they change whenever an object is rewritten."""
        with self._errors("lookup"):
            s3 = self._client()
            return tuple(s3.head_object(Bucket=self.bucket, Key=self._key(sha256, n))["ETag"] for n in ADAPTER_FILES)

    def sha256_of(self, url: str) -> str:
        """The sha256 an object URL of this store names; refuses a URL of another store."""
        base = f"{SCHEME}{self.bucket}/{self._key()}".rstrip("/") + "/"
        sha = url.removeprefix(base)
        if not url.startswith(base) or len(sha) != 64 or not all(c in "0123456789abcdef" for c in sha):
            raise RegistryConflictError(f"{url[:200]!r} is not an adapter of the store {self.url}.")
        return sha

    # -- writing --------------------------------------------------------------------------------------------

    def begin_upload(self, adapter_dir: Path, sha256: str) -> str:
        """Put the adapter's files under its sha256 (unless they are there already), after leaving this writer's
        marker; returns the marker, which :meth:`end_upload` removes once the registry row committed."""
        marker = self._key(UPLOADS, f"{sha256}.{os.getpid()}-{secrets.token_hex(4)}")
        with self._errors("upload"):
            s3 = self._client()
            s3.put_object(Bucket=self.bucket, Key=marker, Body=b"")
            for name in ADAPTER_FILES:
                key = self._key(sha256, name)
                if self._exists(s3, key):
                    continue  # content-addressed: the same bytes, put by whoever registered them first
                s3.upload_file(str(Path(adapter_dir) / name), self.bucket, key)
        return marker

    def end_upload(self, marker: str) -> None:
        with self._errors("upload"):
            self._client().delete_object(Bucket=self.bucket, Key=marker)

    def stale_uploads(self) -> list[tuple[str, str]]:
        """(marker key, sha256) of every upload marker older than :attr:`orphan_after_s`."""
        with self._errors("clean up"):
            markers = self._list(self._client(), self._key(UPLOADS) + "/")
        now = time.time()
        return [
            (m["Key"], _marker_sha(m["Key"]))
            for m in markers
            if now - m["LastModified"].timestamp() >= self.orphan_after_s
        ]

    def remove_orphans(self, in_use: set[str]) -> list[str]:
        """Remove the objects of interrupted uploads: stale markers (:meth:`stale_uploads`) whose sha256 is not in
        ``in_use`` (the sha256s registry rows point at) and that no writer is uploading again now (a fresh marker
        for the same sha256). Returns the sha256s removed."""
        removed = []
        with self._errors("clean up"):
            s3 = self._client()
            markers = self._list(s3, self._key(UPLOADS) + "/")
            stale = {m["Key"] for m in markers if time.time() - m["LastModified"].timestamp() >= self.orphan_after_s}
            busy = {_marker_sha(m["Key"]) for m in markers if m["Key"] not in stale}
            for key in sorted(stale):
                sha = _marker_sha(key)
                if sha not in in_use and sha not in busy and sha not in removed:
                    for name in ADAPTER_FILES:
                        s3.delete_object(Bucket=self.bucket, Key=self._key(sha, name))
                    removed.append(sha)
                s3.delete_object(Bucket=self.bucket, Key=key)
        return removed

    # -- reading --------------------------------------------------------------------------------------------

    def pull(self, url: str, sha256: str, into: Path) -> Path:
        """Download the adapter at ``url`` into a new dir under ``into`` and check its sha256 against ``sha256``
        (the registry's); returns the dir. A mismatch (the object changed after registration) removes the download
        and raises :class:`RegistryConflictError`."""
        if self.sha256_of(url) != sha256:
            raise RegistryConflictError(f"{url} does not name the registered sha256 {sha256[:16]}….")
        into.mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix=f".pull-{sha256[:16]}-", dir=into))
        try:
            with self._errors("download"):
                s3 = self._client()
                for name in ADAPTER_FILES:
                    s3.download_file(self.bucket, self._key(sha256, name), str(dest / name))
            got, _ = adapter_sha256(dest)
            if got != sha256:
                raise RegistryConflictError(
                    f"the adapter at {url} changed after it was registered: its sha256 is {got[:16]}…, the "
                    f"registry's {sha256[:16]}…. Fix: `lorafoundry registry verify` names every such version."
                )
            return dest
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise

    def check(self, url: str, sha256: str) -> str | None:
        """Why the stored adapter at ``url`` does not match ``sha256`` (None: it does), read in full."""
        scratch = Path(tempfile.mkdtemp(prefix="lorafoundry-verify-"))
        try:
            self.pull(url, sha256, scratch)
            return None
        except RegistryConflictError as e:
            return str(e)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # -- S3 -------------------------------------------------------------------------------------------------

    @staticmethod
    def _client() -> Any:
        import boto3
        from botocore.config import Config

        config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"})
        return boto3.client("s3", config=config)

    def _exists(self, s3: Any, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            s3.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def _list(self, s3: Any, prefix: str) -> list[dict]:
        out: list[dict] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out += page.get("Contents", [])
        return out

    def _errors(self, what: str) -> Any:
        return _StoreErrors(self.url, what)


def _marker_sha(key: str) -> str:
    return key.rsplit("/", 1)[1].split(".", 1)[0]


class _StoreErrors:
    """Turn boto3's errors into :class:`RegistryUnavailableError` naming the store (never a key)."""

    def __init__(self, url: str, what: str) -> None:
        self.url, self.what = url, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        if error is None or not isinstance(error, BotoCoreError | ClientError | OSError):
            return False
        if isinstance(error, ClientError):
            code = error.response.get("Error", {}).get("Code", "?")
            detail = f"{code}: {error.response.get('Error', {}).get('Message', '')}".strip(": ")
        else:
            detail = f"{type(error).__name__}: {error}"
        raise RegistryUnavailableError(
            f"the adapter store at {self.url} failed during {self.what} ({detail}). Fix: check that it is up and "
            "that this machine may reach it (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
            "~/.aws); nothing was registered."
        ) from None
