"""Files on disk: writing them so that readers see the old content or the new, never half of it; which files a
glob matches (never entering a symlinked directory, and looking at a bounded number of entries); and whether a path
could be opened at all."""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Directory entries (files and directories together) one glob may look at: far more than any dataset's shards, and
#: few enough that a pattern over a huge tree (`/**/*.jsonl`) is refused in about a second instead of walking a disk.
MAX_GLOB_ENTRIES = 100_000
#: The longest name in a path, and the longest path, that Linux opens (NAME_MAX, PATH_MAX), in bytes.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


def write_json_atomic(path: Path, data: Any, indent: int | None = None) -> None:
    """Write `data` as JSON to `path` through a temporary file in the same folder and a rename.

    The temporary name is unique per call, so two processes writing the same file at once each publish a
    complete file (the last rename wins) instead of interleaving into one shared `.tmp`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; keep what write_text would give
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_files(files: list[Path]) -> str:
    """SHA-256 over each file's name and bytes, in order (the source part of the fingerprint)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cut(text: str, keep: int = 100) -> str:
    """``text``, cut to its first ``keep`` characters and "…" when longer (a path quoted in a message)."""
    return text if len(text) <= keep else text[:keep] + "…"


def unopenable(path: str | Path) -> str | None:
    """Why no file could ever be opened at ``path``, in words (a NUL character, a name or the whole too long for
    Linux), or None. Checked before the path is used, so a 50 MiB value is a message, not an ``OSError``."""
    text = str(path)
    if "\0" in text:
        return "contains a NUL character, which no file name can"
    raw = text.encode("utf-8", "surrogatepass")
    longest = max(len(name) for name in raw.split(b"/"))
    if longest > MAX_NAME_BYTES:
        return f"holds a name of {longest:,} bytes, longer than any file name can be ({MAX_NAME_BYTES})"
    if len(raw) > MAX_PATH_BYTES:
        return f"is {len(raw):,} bytes long, longer than any path can be ({MAX_PATH_BYTES:,})"
    return None


def is_file(path: Path) -> bool:
    """``path.is_file()``, False (not an ``OSError``) for a path that cannot be looked at."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def is_dir(path: Path) -> bool:
    """``path.is_dir()``, False (not an ``OSError``) for a path that cannot be looked at."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def has_magic(text: str) -> bool:
    """Whether ``text`` is a glob (holds ``*``, ``?`` or ``[``)."""
    return any(ch in text for ch in "*?[")


class GlobTooBroadError(ValueError):
    """A glob that looked at more than its bound of directory entries; the message is a phrase about the glob."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"looks at more than {limit:,} files and directories (a pattern over a large tree). Fix: narrow it "
            "to the dataset's own folder, e.g. `data/**/*.jsonl` rather than `/**/*.jsonl`, or name fewer levels"
        )


@dataclass(frozen=True)
class GlobMatch:
    """What a glob found: the files it matches (sorted, each once) and the symlinked directories it did not enter."""

    files: list[Path]
    skipped: list[Path]

    def why_empty(self) -> str:
        """Why the glob may have matched nothing, for the message: the symlinked directories it did not enter."""
        if not self.skipped:
            return ""
        return (
            f" (the symlinked directories {sorted(set(map(str, self.skipped)))[:3]} were not entered: a wildcard does "
            "not follow a symlinked directory; name it in the pattern to read it)"
        )


def glob_files(pattern: str, limit: int | None = None) -> GlobMatch:
    """The files a glob matches (``**``: zero or more directories), as :func:`glob.glob` with ``recursive=True``
    would, except that a wildcard never enters a symlinked directory (``up -> ..`` would take ``**`` out of the
    tree, and round a loop); a symlinked file, or a symlinked directory written out in the pattern, is followed.

    Raises:
        GlobTooBroadError: the glob looked at more than ``limit`` (default :data:`MAX_GLOB_ENTRIES`) directory
            entries.
    """
    walk = _GlobWalk(MAX_GLOB_ENTRIES if limit is None else limit)
    parts = Path(pattern).parts
    first = next((i for i, part in enumerate(parts) if has_magic(part)), len(parts))
    root = Path(*parts[:first]) if first else Path()
    if first < len(parts) and (root == Path() or is_dir(root)):
        walk.walk(root, parts[first:])
    return GlobMatch(sorted(set(walk.files)), walk.skipped)


class _GlobWalk:
    """One glob's walk: the files found, the symlinked directories skipped, and the entries looked at so far."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0
        self.files: list[Path] = []
        self.skipped: list[Path] = []

    def entries(self, d: Path, name_pattern: str) -> list[os.DirEntry]:
        """The entries of ``d`` whose name matches (names starting with '.' only when the pattern asks for them,
        as glob); none when ``d`` is unreadable or vanished."""
        try:
            with os.scandir(d) as it:
                listed = list(itertools.islice(it, self.limit - self.seen + 1))
        except (OSError, ValueError):
            return []
        self.seen += len(listed)
        if self.seen > self.limit:
            raise GlobTooBroadError(self.limit)
        hidden_too = name_pattern.startswith(".")
        return [
            e
            for e in listed
            if (hidden_too or not e.name.startswith(".")) and fnmatch.fnmatchcase(e.name, name_pattern)
        ]

    def subdir(self, e: os.DirEntry) -> bool:
        """Whether a wildcard may enter ``e``: a real directory, not a symlink to one (noted as skipped)."""
        try:
            if e.is_symlink() and e.is_dir():
                self.skipped.append(Path(e.path))
                return False
            return e.is_dir(follow_symlinks=False)
        except OSError:
            return False

    def matching_files(self, d: Path, name_pattern: str) -> list[Path]:
        """The files (or symlinks to files) in ``d`` whose name matches."""
        found = []
        for e in self.entries(d, name_pattern):
            try:
                if e.is_file():
                    found.append(Path(e.path))
            except OSError:  # a symlink loop, or a file that vanished
                continue
        return found

    def walk(self, d: Path, rest: tuple[str, ...]) -> None:
        """Add the matches of the pattern parts ``rest`` below ``d``."""
        head, tail = rest[0], rest[1:]
        if head == "**":
            dirs = [d]
            for here in dirs:  # every real directory below d, breadth first
                dirs += [Path(e.path) for e in self.entries(here, "*") if self.subdir(e)]
            for here in dirs:
                if tail:
                    self.walk(here, tail)
                else:
                    self.files += self.matching_files(here, "*")
        elif not has_magic(head):  # a name written out in the pattern is followed, symlink or not
            if tail and is_dir(d / head):
                self.walk(d / head, tail)
            elif not tail and is_file(d / head):
                self.files.append(d / head)
        elif tail:
            for e in self.entries(d, head):
                if self.subdir(e):
                    self.walk(Path(e.path), tail)
        else:
            self.files += self.matching_files(d, head)
