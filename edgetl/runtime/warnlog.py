"""Library warnings as log lines, once per kind.

Pillow warns per image (an EXIF tag with too many entries, a large image), matplotlib per
missing glyph: a folder of 10,000 photos with the same quirk must not print 10,000 raw
warnings. The CLI routes them into the log (stderr and build.log), one line for each kind,
a kind being the warning's category and the line of library code that raised it.
Standard library only.
"""

from __future__ import annotations

import logging
import threading
import warnings


def route_warnings(logger: logging.Logger) -> None:
    """From now on, each kind of warning is logged once on `logger` instead of printed.

    >>> route_warnings(logging.getLogger("edgetl.warnings"))
    """
    seen: set[tuple[type, str, int]] = set()
    lock = threading.Lock()  # the data stage and the server decode on several threads

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        with lock:
            if (category, filename, lineno) in seen:
                return
            seen.add((category, filename, lineno))
        logger.warning("%s: %s (further warnings of this kind are not shown)", category.__name__, message)

    warnings.showwarning = show
