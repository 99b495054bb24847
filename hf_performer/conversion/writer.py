"""Atomic output folders: everything is written to a temporary folder next to the target, then renamed.

A failure (or Ctrl-C) removes the temporary folder, so the target is either the complete new checkpoint or
untouched. An existing target is replaced only with ``overwrite=True``, and only if it is a folder that is empty or
holds a model (``config.json``): nothing else is deleted. The folder
gets the permissions ``mkdir`` would give it (0777 minus the umask, like ``save_pretrained``), not
``tempfile.mkdtemp``'s private 0700. A disk too small for the checkpoint is refused before the work
(``check_free_space``); one that fills up while writing ends in a ``ConversionError`` saying so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ConversionError


def _nearest_existing_parent(path: Path) -> Path | None:
    """The closest folder above ``path`` that exists: where ``atomic_directory`` creates the missing folders and its
    temporary folder, so the file system the checkpoint is written to."""
    return next((p for p in path.parents if p.exists()), None)


def check_target(target: str | os.PathLike, overwrite: bool) -> Path:
    """Validate an output folder before any work: returns its absolute path."""
    path = Path(os.path.expanduser(str(target))).absolute()
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise ConversionError(f"output {str(target)!r} exists and is not a folder; choose another path.")
        if not overwrite:
            raise ConversionError(f"output folder {str(target)!r} already exists; pass --overwrite to replace it.")
        if any(path.iterdir()) and not (path / "config.json").is_file():
            raise ConversionError(
                f"output folder {str(target)!r} is not empty and holds no model (no config.json): --overwrite replaces "
                "model folders only, so nothing else is deleted. Choose another path, or remove it yourself.")
    parent = _nearest_existing_parent(path)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConversionError(f"cannot create output folder {str(target)!r}: {str(parent)!r} is not writable.")
    return path


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how libraries that wrap the OS error report it (safetensors: a SafetensorError holding Rust's io::Error)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull", "QuotaExceeded")


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from, says the disk (or the user's quota) is full: an OSError
    with ENOSPC / EDQUOT, or a library's wrapping of one that names it (safetensors raises its own error type)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(t in str(exc) for t in DISK_FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def check_free_space(target: str | os.PathLike, needed_bytes: int) -> None:
    """Raise ConversionError when the file system that will hold ``target`` has fewer than ``needed_bytes`` free
    (bytes; the caller's estimate of the checkpoint's size), so that a conversion is refused before its work rather
    than after it."""
    parent = _nearest_existing_parent(Path(target).absolute())  # (not the target: a mount point of its own, say)
    if parent is None:
        return
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise ConversionError(
            f"not enough disk space for the converted model at {str(target)!r}: it needs about "
            f"{needed_bytes / 2**20:.0f} MiB, and {free / 2**20:.0f} MiB are free on that disk. Free some space or "
            "choose an output folder on another disk.")


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``target`` (replacing it if ``overwrite``)."""
    path = check_target(target, overwrite)
    created = [p for p in reversed(path.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the output is an ordinary folder
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            try:
                os.replace(path, old / path.name)
            except OSError as e:  # (a mount point, say): the target stays as it was, and nothing is left behind
                old.rmdir()
                raise ConversionError(f"cannot replace output folder {str(target)!r}: {e}") from e
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):  # folders made for this output only
            with contextlib.suppress(OSError):
                p.rmdir()
        if disk_full(e):
            raise ConversionError(
                f"the disk holding {str(target)!r} filled up while the converted model was written ({e}). The partial "
                "folder was removed and an existing output left as it was. Free some space or choose an output folder "
                "on another disk.") from e
        raise
