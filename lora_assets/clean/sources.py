"""Which files a dataset path names: one file or a glob (a wildcard never enters a symlinked directory), what a
path that names none is (for the error), and the hash of their bytes (for the fingerprint)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from lora_assets.clean.report import CleanError
from lora_assets.files import GlobTooBroadError, cut, glob_files, has_magic, is_file


def resolve_sources(pattern: str | Path) -> list[Path]:
    """The files a dataset path names: the file itself, or every match of a glob (sorted), found by
    :func:`lora_assets.files.glob_files`, as the spec's check finds them.

    A wildcard never enters a symlinked directory (``up -> ..`` would take ``**`` out of the tree, and round a
    loop); a symlinked file, or a symlinked directory written out in the pattern, is followed.

    Raises:
        CleanError: the glob looks at too many files and directories.
    """
    p = str(pattern)
    if not has_magic(p):
        return [Path(p)] if is_file(Path(p)) else []
    try:
        return glob_files(p).files
    except GlobTooBroadError as e:
        raise CleanError(f"the glob {cut(p)!r} {e}.") from None


def describe_missing(source: str | Path) -> str:
    """What a dataset path that gave no file is, in words (for the error)."""
    p = Path(source)
    if has_magic(str(source)):
        return f"matches no file{glob_files(str(source)).why_empty()}"
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
