"""Find the files under a folder the way users lay them out: symbolic links followed.

People assemble image folders by hand, often by linking other folders in; torchvision's
ImageFolder follows those links, and so does edgetl, in the build and in `edgetl predict`.
Each real folder is walked once, so a link back to a parent ends there instead of looping.
Hidden files and folders (a leading dot) are skipped. Broken links and other entries that
are not regular files are returned too: decoding them fails with a reason that names them,
so they are reported as skipped files like corrupt images. Standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path


def candidate_files(root: Path) -> list[Path]:
    """Every non-hidden entry under `root` that is not a folder, following symbolic links, sorted.

    >>> candidate_files(Path("images/cat"))[:2]
    [PosixPath('images/cat/001.jpg'), PosixPath('images/cat/more/002.jpg')]
    """
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:  # reached again through a link: a loop or a second route
            subfolders.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found.extend(Path(folder, name) for name in names if not name.startswith("."))
    return sorted(found)
