"""Stage cache: each stage's output is a folder named by a hash of everything it depends on.

`RUN_DIR/stages/<stage>-<key>/` is written under a temporary name and renamed into place
when the stage finishes, so a folder with that name is always complete: a rerun whose
key matches reuses it (changing a gate retrains nothing), a killed build leaves only a
temporary folder (`.<stage>-<key>.*.tmp`) that the next build removes (`pipeline`
clears them all when it starts), and `--force` rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
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

    def __init__(self, root: Path, force: bool = False) -> None:
        self.root = root
        self.force = force
        self.status: dict[str, str] = {}

    def run(self, stage: str, stage_key: str, make: Callable[[Path], None], label: str | None = None) -> Path:
        """The folder of `stage` at `stage_key`: reused if complete, else made by `make(staging_dir)`.

        >>> cache.run("export", key(train_key, recipe.export.model_dump()), lambda out: export_into(out))
        """
        label = label or stage
        final = self.root / f"{stage}-{stage_key}"
        if final.is_dir() and not self.force:
            self.status[label] = "reused"
            log.info("%s: reused %s", label, final.relative_to(self.root.parent))
            return final
        with atomic_dir(final) as staging:
            make(staging)
        self.status[label] = "built"
        return final
