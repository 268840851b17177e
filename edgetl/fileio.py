"""Atomic writes: a crash never leaves a file that looks complete.

Everything is written next to its destination under a temporary name
(`.<name>.<random>.tmp`) and renamed into place, which is atomic on POSIX file systems.
A killed process leaves only such temporaries; `remove_temporaries` clears them on the
next run. A disk that is full, read-only or not ours to write becomes an `OutputError`
(exit 2) naming the destination, never a traceback.
"""

from __future__ import annotations

import errno
import glob
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgetl.errors import OutputError

# Errors that can only come from writing: whatever the file, the destination cannot take the output.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
# Errors that can also come from reading an input: ours only when they name a path under the
# destination's folder, or a folder on the way to it (being created).
_ACCESS_ERRNOS = {errno.EACCES, errno.EPERM}
# What to do about each; EPERM gets EACCES's.
_ADVICE = {
    errno.ENOSPC: "Free space on that disk",
    errno.EDQUOT: "Free space within your disk quota",
    errno.EFBIG: "The file system (or `ulimit -f`) limits file sizes: pass an `--output` on another disk",
    errno.EROFS: "The file system is read-only: pass an `--output` on a writable disk",
    errno.EACCES: "Make that folder writable for this user, or pass another `--output`",
}


@contextmanager
def output_errors(dest: Path) -> Iterator[None]:
    """Turn an OSError that stops `dest` from being written into an OutputError naming it.

    Raises OutputError (disk full, quota, read-only, file too large, permission denied
    under `dest`'s folder); other exceptions pass through unchanged.

    >>> with output_errors(run_dir / "build.log"):
    ...     handler = logging.FileHandler(run_dir / "build.log")
    """
    dest = Path(dest)
    try:
        yield
    except OSError as exc:
        if not _is_output_error(exc, dest):
            raise
        reason = f"{exc.strerror or exc} [{errno.errorcode.get(exc.errno, exc.errno)}]"
        raise OutputError(
            f"cannot write {dest}: {reason}. {_ADVICE.get(exc.errno, _ADVICE[errno.EACCES])}, then rerun the same "
            "command with --resume: finished stages and epochs are reused."
        ) from None


def _is_output_error(exc: OSError, dest: Path) -> bool:
    if exc.errno in _WRITE_ERRNOS:
        return True
    if exc.errno in _ACCESS_ERRNOS and exc.filename is not None:
        failed, dest = Path(os.path.abspath(exc.filename)), Path(os.path.abspath(dest))
        return failed.is_relative_to(dest.parent) or dest.is_relative_to(failed)
    return False


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` only if the block succeeds.

    Raises OutputError when the disk refuses the write (see `output_errors`).

    >>> with atomic_path(Path("out.json")) as tmp:
    ...     tmp.write_text("{}")
    """
    dest = Path(dest)
    with output_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            tmp.chmod(0o644)  # mkstemp makes 0600; outputs are for CI pages and other users too
            yield tmp
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


def write_json(dest: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically. Raises OutputError when the disk refuses it."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_torch(obj: Any, dest: Path) -> None:
    """`torch.save`, atomically. Raises OutputError when the disk refuses it.

    Serialized in memory, then written: torch's own writer reports a short write (a full
    disk, a file size limit) as an opaque RuntimeError ("unexpected pos 998528 vs 998424"),
    even through a Python file; a plain write raises the OSError it is.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(buffer.getbuffer())


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `dest`; it replaces `dest` only on success.

    Raises OutputError when the disk refuses a write inside it (see `output_errors`).
    """
    dest = Path(dest)
    with output_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes 0700
            yield tmp
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def remove_temporaries(folder: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporaries a killed process left in `folder`: `.<name>.*.tmp` for each of
    `names`, or every `.*.tmp` when `names` is None (folders only edgetl writes). Returns them.

    >>> remove_temporaries(run_dir, ["bundle", "report.json"])
    [PosixPath('runs/quickstart/.bundle.k2j4_x9a.tmp')]
    """
    patterns = [".*.tmp"] if names is None else [f".{glob.escape(name)}.*.tmp" for name in names]
    removed = sorted({path for pattern in patterns for path in Path(folder).glob(pattern)})
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed
