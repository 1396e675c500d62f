"""Atomic file and folder writes: the one helper every writer of the package uses.

A file is written under a temporary name in its destination folder, flushed to disk and renamed into
place with ``os.replace`` (atomic on POSIX and Windows within one file system); a folder is filled
under a temporary name beside its destination and renamed likewise. A crash, a full disk or Ctrl-C
at any point leaves either the old content or the new one at the destination, never a half-written
mix; the temporary, and any parent folder the call created, is removed on error. Results get the
permissions a plain ``open``/``mkdir`` would give (the process umask), not the private ones of
``tempfile``. A write that fails for want of room or rights (a full disk, a file-size limit, a folder
made read-only meanwhile; ``OSError`` or safetensors' I/O error) is raised as one :class:`WriteError`
naming the destination, whoever wrote the bytes. :func:`replaced_input` tells whether writing an output
would replace one of a command's inputs. This module imports nothing from the package (any layer may
use it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

__all__ = [
    "WriteError",
    "atomic_file",
    "atomic_write_text",
    "folder_write_problem",
    "replaced_input",
    "staged_dir",
]


class WriteError(OSError):
    """Writing ``path`` failed (no space, a file-size limit, no permission); nothing changed there.

    Its message is one line naming the destination and the system's reason; ``errno`` is the system's
    when known. It is an ``OSError``, so callers that catch those keep working.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it becomes ``path``, on error it is removed.

    The caller writes the whole file to the yielded path. Missing parent folders are created (and
    removed again on error). With ``replace=False`` an existing ``path`` is an error
    (:class:`FileExistsError`, before anything is written, and again, leaving it untouched, if it
    appeared meanwhile).
    """
    path = Path(path)
    if not replace and _exists(path):
        raise FileExistsError(f"{path}: output path already exists; choose a new one")
    created = _missing_folders(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        _remove_folders(created)
        _raise_write_error(err, path)
        raise
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _flush(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_UMASK)
        _promote_file(tmp, path, replace)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        _remove_folders(created)
        _raise_write_error(err, path)
        raise
    tmp.unlink(missing_ok=True)  # still there after a hard link (``replace=False``)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def staged_dir(
    target: str | os.PathLike[str], replace: bool | Callable[[Path], bool] = False
) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; on success it becomes ``target``.

    Without ``replace`` an existing ``target`` is an error (:class:`FileExistsError`, before
    anything is written, and again if it appeared meanwhile). With ``replace`` an existing
    ``target`` is moved aside, the staging folder renamed into place, then the old one deleted,
    so ``target`` is at every moment either complete-old or complete-new. A callable ``replace``
    decides for the ``target`` it finds (``replace=is_stale`` refreshes a cache but keeps a folder
    another process has just finished: that case is a :class:`FileExistsError` too). On error the
    staging folder and any parent folders this call created are removed.
    """
    target = Path(target)
    if _exists(target) and not _may_replace(target, replace):
        raise FileExistsError(f"{target}: output path already exists; choose a new one")
    created = _missing_folders(target.parent)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        _remove_folders(created)
        _raise_write_error(err, target)
        raise
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_UMASK)
        _promote_dir(staging, target, replace)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_folders(created)
        _raise_write_error(err, target)
        raise


def folder_write_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the folder ``path`` cannot be created or written into (``"is not a folder ..."``), or None.

    Nothing is created: the nearest existing folder above ``path`` is checked instead.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        return "is not a folder (a file is there)"
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            return f"cannot be created: {existing} is a broken link"
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot be created: {existing} is not a folder (a file)"
    if not os.access(existing, os.R_OK | os.W_OK | os.X_OK):
        return "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
    return None


def replaced_input(
    output: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None], inside: bool = True
) -> Path | None:
    """The first of ``inputs`` that writing ``output`` would replace, or ``None``.

    Links resolved on both sides, writing ``output`` (a file, or a folder written whole) replaces an
    input when ``output`` *is* it, *holds* it (a folder around the input), or lies *inside* an input
    folder where something already is (that entry would be overwritten); a hard link to an input is the
    input. A new file inside an input folder replaces nothing. ``None`` entries are skipped.
    ``inside=False`` leaves out the third case (for an entry known to be an earlier output).
    """
    given = Path(output).expanduser()
    out = given.resolve()
    for source in inputs:
        if source is None:
            continue
        path = Path(source).expanduser()
        real = path.resolve()
        if out == real or out in real.parents or (inside and real in out.parents and _exists(given)):
            return path
        with contextlib.suppress(OSError):  # either side missing: no hard link
            if os.path.samefile(given, path):
                return path
    return None


_OS_ERROR = re.compile(r"os error (\d+)")


def _raise_write_error(err: BaseException, path: Path) -> None:
    """Raise ``err`` as a :class:`WriteError` for ``path`` if it is a failed write (else return).

    ``OSError`` (not the refusals of this module, ``FileExistsError``) and safetensors' ``SafetensorError``
    for an I/O failure, whose message carries the system's ``os error N``, are failed writes.
    """
    if isinstance(err, WriteError | FileExistsError):
        return
    if isinstance(err, OSError):
        code, reason = err.errno, err.strerror or str(err)
    elif type(err).__name__ == "SafetensorError" and "I/O error" in str(err):
        found = _OS_ERROR.search(str(err))
        code = int(found.group(1)) if found else None
        reason = os.strerror(code) if code else str(err).splitlines()[0]
    else:
        return
    raise WriteError(f"{path}: cannot write ({reason}); nothing was changed there", code) from err


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _may_replace(target: Path, replace: bool | Callable[[Path], bool]) -> bool:
    return bool(replace(target)) if callable(replace) else bool(replace)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, innermost first."""
    return [p for p in [folder, *folder.parents] if not p.exists()]


def _remove_folders(created: list[Path]) -> None:
    for folder in created:  # innermost first; a folder someone else has filled meanwhile stays
        with contextlib.suppress(OSError):
            folder.rmdir()


def _flush(tmp: Path, mode: int) -> None:
    """Give ``tmp`` its final permissions and push its bytes to disk (before the rename makes it visible)."""
    os.chmod(tmp, mode)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # fsync of a read-only descriptor is refused on some systems
            os.fsync(fd)
    finally:
        os.close(fd)


def _appeared(target: Path) -> FileExistsError:
    return FileExistsError(f"{target}: output path appeared while writing; the new content is discarded")


def _promote_file(tmp: Path, path: Path, replace: bool) -> None:
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic and never overwrites; the caller's cleanup unlinks ``tmp``
    except FileExistsError:
        raise _appeared(path) from None
    except OSError:  # a file system without hard links: check, then rename
        if _exists(path):
            raise _appeared(path) from None
        os.replace(tmp, path)


def _rename_new(staging: Path, target: Path) -> None:
    """Rename ``staging`` to a ``target`` that should not exist; a non-empty one that appeared is kept."""
    try:
        os.rename(staging, target)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise _appeared(target) from err
        raise


def _promote_dir(staging: Path, target: Path, replace: bool | Callable[[Path], bool]) -> None:
    if not _exists(target):
        _rename_new(staging, target)
        return
    if not _may_replace(target, replace):
        raise _appeared(target)
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old = aside / target.name
    with contextlib.suppress(FileNotFoundError):  # gone meanwhile: nothing to move aside
        os.replace(target, old)
    try:
        _rename_new(staging, target)
    except BaseException:
        with contextlib.suppress(OSError):  # put the old content back if its place is still free
            if _exists(old):
                os.rename(old, target)
        if not _exists(old):
            aside.rmdir()  # empty: the old content is back (or there was none)
        raise  # (else the old content stays in ``aside``: never deleted when it could not go back)
    shutil.rmtree(aside, ignore_errors=True)  # the replaced content: ``target`` holds the new one
