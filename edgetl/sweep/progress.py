"""The sweep's progress: trials done, running and failed, with an ETA; a rich bar on a terminal, log lines in CI."""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.tune import Callback

from edgetl.progress import is_terminal

log = logging.getLogger("edgetl.sweep")
_FAILED = ("failed", "crashed")


class SweepProgress(Callback):
    """A Ray Tune callback, run in the driver: one line (or one bar update) per trial that starts or ends.

    The ETA assumes the trials left take as long, at the same concurrency, as the ones done.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.started = time.monotonic()
        self.running: set[str] = set()
        self.done = self.failed = 0
        self.bar: Any = None
        self.task: Any = None

    def setup(self, **info: Any) -> None:
        if is_terminal():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
            )
            self.bar.start()
            self.task = self.bar.add_task("sweep", total=self.total)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self._show()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        status = (trial.last_result or {}).get("status", "stopped")
        self._finish(trial, status in _FAILED)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the terminal bar (idempotent): at the experiment's end, or when Ray Tune raised before it."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def line(self) -> str:
        """`3/8 trials done (1 failed), 2 running, eta 2m10s`."""
        elapsed = time.monotonic() - self.started
        left = max(self.total - self.done, 0)
        eta = f"eta {_duration(elapsed / self.done * left)}" if self.done else "eta unknown"
        failed = f" ({self.failed} failed)" if self.failed else ""
        return f"{self.done}/{self.total} trials done{failed}, {len(self.running)} running, {eta}"

    def _finish(self, trial: Any, failed: bool) -> None:
        self.running.discard(trial.trial_id)
        self.done += 1
        self.failed += failed
        self._show()

    def _show(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, description=f"sweep: {self.line()}")
        else:
            log.info("sweep: %s", self.line())


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
