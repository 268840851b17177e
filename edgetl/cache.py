"""Stage cache: each stage's output is a folder named by a hash of everything it depends on.

`RUN_DIR/stages/<stage>-<key>/` is written under a temporary name and renamed into place
when the stage finishes, so a folder with that name is always complete: a rerun whose
key matches reuses it (changing a gate retrains nothing), a killed build leaves only a
temporary folder (`.<stage>-<key>.*.tmp`) that the next build removes (`pipeline`
clears them all when it starts), and `--force` rebuilds.

A `shared` cache (one root for the trials of a sweep, which run in several processes) makes
each stage under an exclusive lock on `.locks/<stage>-<key>`: a second trial that needs the
same stage waits for the first and then reuses its folder instead of making it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edgetl.fileio import atomic_dir

log = logging.getLogger(__name__)


def key(*parts: object) -> str:
    """A short hash of JSON-serializable parts (recipe sections, other stages' keys, data hashes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """A short hash of a file's bytes (another run's checkpoint, for instance)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:16]


class StageCache:
    """Folders under `root`, one per (stage, key); `status` says which were reused or built."""

    def __init__(self, root: Path, force: bool = False, shared: bool = False) -> None:
        self.root = root
        self.force = force
        self.shared = shared
        self.status: dict[str, str] = {}

    def run(self, stage: str, stage_key: str, make: Callable[[Path], None], label: str | None = None) -> Path:
        """The folder of `stage` at `stage_key`: reused if complete, else made by `make(staging_dir)`.

        >>> cache.run("export", key(train_key, recipe.export.model_dump()), lambda out: export_into(out))
        """
        label = label or stage
        final = self.root / f"{stage}-{stage_key}"
        with self._lock(final.name):
            if final.is_dir() and not self.force:
                self.status[label] = "reused"
                log.info("%s: reused %s", label, final.relative_to(self.root.parent))
                return final
            with atomic_dir(final) as staging:
                make(staging)
        self.status[label] = "built"
        return final

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """Held while a shared cache checks for and makes one stage folder."""
        if not self.shared:
            yield
            return
        with exclusive(self.root / ".locks" / name):
            yield


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (made if missing) across processes; the OS releases it when the
    holder dies, so a killed trial never blocks the next."""
    import fcntl  # POSIX only: imported here so a plain build runs on Windows too

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
