"""A dataset's paths never lead outside its folder; an output never lands outside its target.

Datasets come from strangers: a COCO `file_name`, a line of a list file, a CSV cell or a
symbolic link can name any path on the machine. Every such path is checked here before it
is read (`inside`, `walk_files`), and every path an output is written to is built from a
cleaned relative path and checked against the target folder (`target_inside`).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

OUTSIDE = "path outside the input folder"
NOT_UTF8 = "file name is not valid UTF-8"
LINK_LOOP = "symbolic link loop"
NOT_REGULAR = "not a regular file"
_SEPARATORS = re.compile(r"[\\/]+")
_DRIVE = re.compile(r"^[A-Za-z]:")


def resolve(path: str | Path) -> Path | None:
    """`path` with every symbolic link and `..` resolved, or None for a link loop."""
    try:
        return Path(os.path.realpath(path, strict=False))
    except (OSError, RuntimeError, ValueError):
        return None


def inside(root: str | Path, path: str | Path, resolved_root: Path | None = None) -> bool:
    """Whether `path`, links followed, lies inside `root` (or is it)."""
    target = resolve(path)
    base = resolved_root or resolve(root)
    return target is not None and base is not None and target.is_relative_to(base)


def printable(name: str) -> str:
    """A name as UTF-8 can store it: bytes that were not UTF-8 become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean_relpath(name: str) -> str:
    """A '/'-separated relative path from any name: both separators split it; empty, `.`
    and `..` parts, a drive letter, NUL and a leading `/` are dropped.

    Raises:
        ValueError: when nothing of a file name is left.
    """
    parts = [p for p in _SEPARATORS.split(name.replace("\0", "")) if p not in ("", ".", "..")]
    if parts:
        parts[0] = _DRIVE.sub("", parts[0])
        parts = [p for p in parts if p not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"{name!r} names no file")
    return "/".join(parts)


def relpath_inside(root: Path, name: str, resolved_root: Path | None = None) -> str | None:
    """`name` (relative to `root`, or absolute) as a clean path under `root`, or None when it
    leads outside `root`, lexically or through a symbolic link."""
    joined = os.path.normpath(os.path.join(root, name.replace("\\", "/")))
    rel = os.path.relpath(joined, root)
    if rel == "." or rel == ".." or rel.startswith("../") or os.path.isabs(rel):
        return None
    if not inside(root, joined, resolved_root):
        return None
    return rel.replace(os.sep, "/")


def walk_files(folder: Path, root: Path | None = None) -> Iterator[tuple[str, str | None]]:
    """Every file under `folder`: (path relative to `folder`, '/'-separated; None, or the
    reason it cannot be read). Sorted within each folder, hidden files left out.

    Links are followed where they lead inside `root` (default: `folder`) and to no folder
    being walked already; any other link, a special file (a FIFO would block a reader) and
    a name that is not UTF-8 are yielded with their reason, never skipped in silence.
    """
    base = resolve(root or folder)
    start = resolve(folder)
    if base is None or start is None or not start.is_relative_to(base):
        yield "", OUTSIDE
        return
    yield from _walk(folder, "", base, (start,))


def _walk(folder: Path, prefix: str, base: Path, ancestors: tuple[Path, ...]):
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name)
    except OSError as error:
        yield prefix.rstrip("/"), f"cannot list the folder: {error.strerror}"
        return
    for entry in entries:
        rel = prefix + entry.name
        if not is_utf8(rel):
            yield printable(rel), NOT_UTF8
            continue
        if entry.is_symlink():
            real = resolve(entry.path)
            if real is None or real in ancestors:
                yield rel, LINK_LOOP
                continue
            if not real.is_relative_to(base):
                yield rel, OUTSIDE
                continue
            try:
                mode = os.stat(entry.path).st_mode
            except OSError as error:
                yield (
                    rel,
                    LINK_LOOP if error.errno == errno.ELOOP else f"cannot read: {error.strerror}",
                )
                continue
            is_dir, is_file = stat.S_ISDIR(mode), stat.S_ISREG(mode)
        else:  # the kind comes with the listing: no system call per file
            real = ancestors[-1] / entry.name
            is_dir, is_file = (
                entry.is_dir(follow_symlinks=False),
                entry.is_file(follow_symlinks=False),
            )
        if is_dir:
            yield from _walk(Path(entry.path), rel + "/", base, (*ancestors, real))
        elif entry.name.startswith("."):
            continue  # hidden files: editor and OS droppings, not data
        elif is_file:
            yield rel, None
        else:
            yield rel, NOT_REGULAR


def target_inside(to: Path, relpath: str) -> Path:
    """Where an output whose input path was `relpath` is written under `to`.

    Raises:
        ValueError: when the folder it would land in leads outside `to` (a link in `to`).
    """
    target = to / clean_relpath(relpath)
    if not inside(to, target.parent):
        raise ValueError(f"refusing to write {target}: its folder leads outside {to}")
    return target
