"""The decode-once cache on disk: arrays too big for RAM, written once, read by many builds.

An entry is a folder `<cache root>/<kind>/<key>/` holding raw shard files (`<array>-00000.bin`,
at most `SHARD_BYTES` each) and `index.json` (each array's dtype, row shape and row count, each
shard's byte size and CRC-32, and the caller's metadata). It is written under a temporary name
and renamed into place (`edgetl.fileio.atomic_dir`), so a killed build never leaves a
complete-looking entry; an exclusive lock file (`<key>.lock`, `fcntl.flock`) makes a second
process that wants the same entry wait for the first and then reuse it instead of decoding again.

Every reuse checks each shard's size, and its CRC-32 (about 2-3 GB/s on one core; it detects
torn writes, truncation and changed bytes, not tampering: the cache is the user's own folder)
unless the shard is provably untouched since its last full check, or since it was written (its
CRC-32 was taken from the bytes written): `checked.json` keeps each such shard's size, mtime,
ctime and inode, and any write to a file changes its ctime (which no user call can set back).
So the build that wrote an entry, and every rerun, stat its shards (5.4 GB of them for 36,000
crops at 224 px) instead of reading them, while a shard that was written to, truncated or
replaced is read in full. A shard that fails is refused with one log paragraph naming it, and
the entry is rebuilt.

Rows are read with `os.preadv` into fresh arrays, not through `np.memmap`: the pages of a
memory map count in the process's resident set once touched, so one pass over 36,000 crops at
224 px would show 5.4 GB of RSS; `preadv` keeps the OS page cache's speed while a build's RSS
stays bounded by its batches.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl.errors import DataError, OutputError
from edgetl.fileio import atomic_dir, write_json

log = logging.getLogger(__name__)

FORMAT = 1  # bumped when the layout of an entry changes: older entries are then ignored
SHARD_BYTES = 256 * 2**20  # small enough to rebuild or re-check in a second, few enough to keep open
_CHUNK = 16 * 2**20
_CHECKED = "checked.json"  # shard stamps of the last full check


def default_root() -> Path:
    """`$EDGETL_CACHE_DIR`, else `$XDG_CACHE_HOME/edgetl`, else `~/.cache/edgetl`: shared by every build of a user."""
    if os.environ.get("EDGETL_CACHE_DIR"):
        return Path(os.environ["EDGETL_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "edgetl"


class DiskArray:
    """A read-only (N, *row) array stored as consecutive rows in shard files.

    Indexing with an int, a slice or an integer array (numpy or torch) returns a new ndarray;
    `np.asarray` reads the whole array (for small splits only). Picklable: DataLoader workers
    reopen the shards themselves.

    >>> images = DiskArray([Path("images-00000.bin")], rows_per_file=1024, count=10, row_shape=(224, 224, 3))
    >>> images[np.array([3, 1])].shape
    (2, 224, 224, 3)
    """

    def __init__(
        self,
        files: Sequence[Path],
        rows_per_file: int,
        count: int,
        row_shape: tuple[int, ...],
        dtype="uint8",
        key: str = "",
    ) -> None:
        self.files = [Path(f) for f in files]
        self.key = key  # the cache entry's key: what the rows were made from
        self.rows_per_file = rows_per_file
        self.count = count
        self.dtype = np.dtype(dtype)
        self.shape = (count, *row_shape)
        self.ndim = len(self.shape)
        self._row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, tuple):  # rows first, then the rest on what was read (`images[..., 0]` reads all)
            head, rest = (index[0], index[1:]) if index else (slice(None), ())
            if head is Ellipsis:
                return np.asarray(self)[index]
            rows = self[head]
            return rows[rest] if isinstance(head, (int, np.integer)) else rows[(slice(None), *rest)]
        if isinstance(index, (int, np.integer)):
            position = range(self.count)[index]  # negative indices, IndexError past the end
            return self._rows(position, position + 1)[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(self.count)
            if step == 1:
                return self._rows(start, max(start, stop))
            index = np.arange(start, stop, step)
        picks = np.asarray(index)
        if picks.dtype == bool:
            picks = np.flatnonzero(picks)
        out = np.empty((len(picks), *self.shape[1:]), self.dtype)
        for j, position in enumerate(picks.tolist()):
            self._read(range(self.count)[position], 1, out[j : j + 1])
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self._rows(0, self.count)
        return whole if dtype is None else whole.astype(dtype)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}  # descriptors do not travel to another process

    def __del__(self) -> None:
        for fd in self._fds.values():
            os.close(fd)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        done = 0
        while start + done < stop:  # one read per shard the range touches
            row = start + done
            count = min(stop - row, self.rows_per_file - row % self.rows_per_file)
            self._read(row, count, out[done : done + count])
            done += count
        return out

    def _read(self, row: int, count: int, out: np.ndarray) -> None:
        shard, first = divmod(row, self.rows_per_file)
        view = memoryview(out).cast("B")
        offset, got = first * self._row_bytes, 0
        while got < len(view):
            n = os.preadv(self._fd(shard), [view[got:]], offset + got)
            if n == 0:
                raise DataError(
                    f"data cache shard {self.files[shard]} ended early (it changed after it was checked); delete "
                    f"{self.files[shard].parent} and rerun."
                )
            got += n

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(self.files[shard], os.O_RDONLY)
        return self._fds[shard]


class ShardWriter:
    """Appends rows of one array to shard files in a staging folder, counting bytes and CRC-32 as it goes."""

    def __init__(self, folder: Path, name: str, row_shape: tuple[int, ...], dtype="uint8") -> None:
        self.folder, self.name, self.row_shape, self.dtype = folder, name, tuple(row_shape), np.dtype(dtype)
        row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.rows_per_file = max(1, SHARD_BYTES // max(row_bytes, 1))
        self.count = 0
        self.shards: list[dict] = []
        self._handle = None

    def append(self, rows: np.ndarray) -> None:
        """Write (B, *row_shape) rows after the ones written so far."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        done = 0
        while done < len(rows):
            if self.count % self.rows_per_file == 0 and (self._handle is None or self.count > 0):
                self._next_shard()
            room = self.rows_per_file - self.count % self.rows_per_file
            chunk = rows[done : done + room]
            data = memoryview(chunk).cast("B")
            self._handle.write(data)
            record = self.shards[-1]
            record["bytes"] += len(data)
            record["crc32"] = zlib.crc32(data, record["crc32"])
            done += len(chunk)
            self.count += len(chunk)

    def finish(self) -> dict:
        """The array's record for index.json."""
        if self._handle is not None:
            self._handle.close()
        return {
            "dtype": self.dtype.str,
            "row_shape": list(self.row_shape),
            "count": self.count,
            "rows_per_file": self.rows_per_file,
            "shards": self.shards,
        }

    def _next_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        name = f"{self.name}-{len(self.shards):05d}.bin"
        self._handle = open(self.folder / name, "wb")
        self.shards.append({"file": name, "bytes": 0, "crc32": 0})


@dataclass(frozen=True)
class Entry:
    """A complete, checked cache entry: its arrays and the metadata its builder recorded."""

    folder: Path
    meta: dict
    arrays: dict[str, DiskArray]
    reused: bool


def load_or_build(
    folder: Path,
    build: Callable[[Path], tuple[dict, list[ShardWriter]]],
    usable: Callable[[dict], bool] = lambda meta: True,
) -> Entry:
    """The entry at `folder`: reused when complete, intact and `usable(meta)`, else built by `build(staging)`.

    `build` writes its arrays with `ShardWriter`s into the staging folder and returns its metadata
    and the writers. Raises whatever `build` raises (the staging folder is removed), OutputError
    when the disk refuses a write.

    >>> entry = load_or_build(root / "decoded" / key, lambda staging: decode_into(staging))
    >>> entry.arrays["images"].shape
    """
    with _locked(folder):
        if folder.is_dir():
            entry = _open(folder)
            if entry is not None and usable(entry.meta):
                return entry
        with atomic_dir(folder) as staging:
            meta, writers = build(staging)
            arrays = {writer.name: writer.finish() for writer in writers}
            write_json(staging / "index.json", {"format": FORMAT, "meta": meta, "arrays": arrays})
            # The CRCs were taken from the bytes as they were written: stamping the shards now spares the check
            # below reading back what this process just wrote (5.4 GB for 36,000 crops at 224 px). Renaming the
            # folder leaves its files' stamps alone.
            shards = [s["file"] for record in arrays.values() for s in record["shards"]]
            write_json(staging / _CHECKED, {name: _stamp((staging / name).stat()) for name in shards})
        entry = _open(folder)
        if entry is None:
            raise DataError(f"data cache entry {folder} failed its check right after it was written; is the disk full?")
        return Entry(entry.folder, entry.meta, entry.arrays, reused=False)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock per entry: a second process waits while the first builds, then reuses its entry.

    Raises OutputError when the cache folder cannot be made or written."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = open(folder.parent / f"{folder.name}.lock", "a")
    except OSError as exc:
        raise OutputError(
            f"cannot write the data cache {folder.parent}: {exc.strerror or exc}. Set `data.cache_dir` in the recipe "
            "(or $EDGETL_CACHE_DIR) to a writable folder with free space."
        ) from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open(folder: Path) -> Entry | None:
    """The entry when index.json reads and every shard has its recorded size and CRC-32; None (logged) otherwise."""
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError) as exc:
        log.warning("data cache entry %s has no readable index.json (%s); it is refused and built again.", folder, exc)
        return None
    if index.get("format") != FORMAT:
        log.info("data cache entry %s has format %s, not %d; it is built again.", folder, index.get("format"), FORMAT)
        return None
    shards = [(folder / s["file"], s) for record in index["arrays"].values() for s in record["shards"]]
    try:
        stamps = json.loads((folder / _CHECKED).read_text())
    except (OSError, ValueError):  # never checked yet, or an unreadable record: check every shard in full
        stamps = {}
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # zlib releases the GIL
        outcomes = list(pool.map(lambda pair: _check(*pair, stamps.get(pair[1]["file"])), shards))
    problems = [problem for problem, _ in outcomes if problem]
    if problems:
        log.warning(
            "data cache: %s. The entry %s is refused and built again (nothing else is affected; if this repeats, "
            "check the disk).",
            "; ".join(problems),
            folder,
        )
        return None
    checked = {record["file"]: stamp for (_, record), (_, stamp) in zip(shards, outcomes)}
    if checked != stamps:
        write_json(folder / _CHECKED, checked)
    arrays = {
        name: DiskArray(
            [folder / s["file"] for s in record["shards"]],
            record["rows_per_file"],
            record["count"],
            tuple(record["row_shape"]),
            record["dtype"],
            key=f"{folder.name}/{name}",
        )
        for name, record in index["arrays"].items()
    }
    return Entry(folder, index["meta"], arrays, reused=True)


def _check(path: Path, record: dict, stamp: list[int] | None) -> tuple[str | None, list[int]]:
    """Why the shard at `path` does not match its record (size, then CRC-32 unless `stamp` shows it untouched
    since its last full check), or None; and its stamp now."""
    try:
        stat = path.stat()
        now = _stamp(stat)
        if stat.st_size != record["bytes"]:
            return f"shard {path} is truncated or extended: {stat.st_size} bytes, {record['bytes']} recorded", now
        if now == stamp:
            return None, now
        crc = 0
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                crc = zlib.crc32(chunk, crc)
    except OSError as exc:
        return f"shard {path} cannot be read ({exc})", []
    if crc != record["crc32"]:
        return f"shard {path} is corrupt: CRC-32 {crc:08x}, {record['crc32']:08x} recorded", now
    return None, now


def _stamp(stat: os.stat_result) -> list[int]:
    """What changes when a file is written to, truncated or replaced: size, mtime, ctime (no user call sets it
    back) and inode."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
