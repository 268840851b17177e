"""Progress for long steps: a rich bar with ETA on a terminal, plain log lines in CI.

CI logs are files, so a redrawn bar would fill them with control codes; there we print a
line every ~10% (and at least every 30 s) with the rate and the ETA instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("edgetl")


def is_terminal() -> bool:
    return sys.stderr.isatty()


def track(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Yield `items`, showing progress towards `total`.

    >>> for batch in track(batches, total=len(batches), description="epoch 1/10"):
    ...     step(batch)
    """
    if total <= 0:
        yield from items
        return
    if is_terminal():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    yield from _plain(items, total, description)


def _plain(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    start = last = time.monotonic()
    step = max(1, total // 10)
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if done == total or done % step == 0 or now - last > 30:
            last = now
            rate = done / max(now - start, 1e-9)
            log.info("%s: %d/%d (%.1f/s, eta %.0fs)", description, done, total, rate, (total - done) / rate)
