"""Which files a dataset path names: one file or a glob (a wildcard never enters a symlinked directory), what a
path that names none is (for the error), and the hash of their bytes (for the fingerprint)."""

from __future__ import annotations

import errno
import fnmatch
import os
from pathlib import Path


def resolve_sources(pattern: str | Path) -> list[Path]:
    """The files a dataset path names: the file itself, or every match of a glob (sorted).

    A wildcard never enters a symlinked directory (``up -> ..`` would take ``**`` out of the tree, and round a
    loop); a symlinked file, or a symlinked directory written out in the pattern, is followed.
    """
    p = str(pattern)
    if _has_magic(p):
        return sorted(set(_glob_files(p)[0]))
    return [Path(p)] if Path(p).is_file() else []


def _has_magic(part: str) -> bool:
    return any(ch in part for ch in "*?[")


def _glob_files(pattern: str) -> tuple[list[Path], list[Path]]:
    """Files matching a glob (``**``: zero or more directories), and the symlinked directories not entered."""
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if _has_magic(part))
    root = Path(*parts[:first]) if first else Path()
    files: list[Path] = []
    skipped: list[Path] = []

    def entries(d: Path, name_pattern: str) -> list[os.DirEntry]:
        try:
            with os.scandir(d) as it:  # names starting with '.' only when the pattern asks for them, as glob
                return [
                    e
                    for e in it
                    if (name_pattern.startswith(".") or not e.name.startswith("."))
                    and fnmatch.fnmatchcase(e.name, name_pattern)
                ]
        except OSError:  # unreadable or vanished: no match, as glob
            return []

    def subdir(e: os.DirEntry) -> bool:
        if e.is_symlink() and e.is_dir():
            skipped.append(Path(e.path))
            return False
        return e.is_dir(follow_symlinks=False)

    def walk(d: Path, rest: tuple[str, ...]) -> None:
        head, tail = rest[0], rest[1:]
        if head == "**":
            dirs = [d]
            for here in dirs:  # every real directory below d, breadth first
                dirs += [Path(e.path) for e in entries(here, "*") if subdir(e)]
            for here in dirs:
                if tail:
                    walk(here, tail)
                else:
                    files.extend(Path(e.path) for e in entries(here, "*") if e.is_file())
        elif not _has_magic(head):  # a name written out in the pattern is followed, symlink or not
            if tail and (d / head).is_dir():
                walk(d / head, tail)
            elif not tail and (d / head).is_file():
                files.append(d / head)
        else:
            for e in entries(d, head):
                if tail and subdir(e):
                    walk(Path(e.path), tail)
                elif not tail and e.is_file():
                    files.append(Path(e.path))

    if root == Path() or root.is_dir():
        walk(root, parts[first:])
    return files, skipped


def describe_missing(source: str | Path) -> str:
    """What a dataset path that gave no file is, in words (for the error)."""
    p = Path(source)
    if _has_magic(str(source)):
        files, skipped = _glob_files(str(source))
        note = (
            f" (the symlinked directories {sorted(set(map(str, skipped)))[:3]} were not entered: a wildcard does not "
            "follow a symlinked directory; name it in the pattern to read it)"
            if skipped
            else ""
        )
        return f"matches no file{note}"
    if p.is_symlink():
        try:
            p.stat()
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "is a symlink loop (it resolves back to itself)"
            return f"is a symlink to {os.readlink(p)!r}, which does not exist"
    if p.is_dir():
        return f"is a directory, not a file (to read the files in it, use a glob such as '{p / '*.jsonl'}')"
    if p.exists():
        return "is not a regular file (a device, FIFO or socket)"
    return "does not exist"
