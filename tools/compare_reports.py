"""Compare two report.json files in every field except timings, latencies and timestamps.

Usage: python tools/compare_reports.py BEFORE/report.json AFTER/report.json [--allow-added]

For a change that must not change behaviour (a refactor): prints each differing field by its
path and exits 1, or says the reports are equal and exits 0. Ignored, because they are measured
or stamped anew by every build: wall times (`*seconds`, `timings`), latency and throughput,
load time and peak memory of the probe process, millisecond figures quoted in notes, and the
bundle digest (its manifest carries a
creation time and the measured latencies). With `--allow-added`, fields only AFTER has are
listed but allowed: report.json's schema only ever adds fields.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

IGNORED = {
    "timings",
    "build_seconds",
    "train_seconds",
    "seconds",
    "latency_ms",
    "throughput_ips",
    "load_seconds",
    "peak_rss_mb",
    "bundle_sha256",
}
MILLISECONDS = re.compile(r"\d+(\.\d+)? ms\b")


def differences(before: Any, after: Any, path: str = "") -> list[str]:
    """Paths where `before` and `after` differ, IGNORED keys skipped at any depth."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(set(before) | set(after)):
            if key in IGNORED:
                continue
            where = f"{path}.{key}" if path else key
            if key not in before or key not in after:
                found.append(f"{where}: only in {'after' if key in after else 'before'}")
            else:
                found.extend(differences(before[key], after[key], where))
        return found
    if isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            return [f"{path}: {len(before)} items before, {len(after)} after"]
        return [d for i, (b, a) in enumerate(zip(before, after)) for d in differences(b, a, f"{path}[{i}]")]
    if isinstance(before, str) and isinstance(after, str):  # a note may quote a latency it measured
        before, after = MILLISECONDS.sub("<ms>", before), MILLISECONDS.sub("<ms>", after)
    return [] if before == after else [f"{path}: {before!r} before, {after!r} after"]


def main() -> int:
    before, after = (json.loads(Path(arg).read_text()) for arg in sys.argv[1:3])
    found = differences(before, after)
    if "--allow-added" in sys.argv[3:]:
        added = [line for line in found if line.endswith(": only in after")]
        for line in added:
            print(f"added (allowed): {line.removesuffix(': only in after')}")
        found = [line for line in found if line not in added]
    for line in found:
        print(line)
    print(
        f"{len(found)} difference(s) outside timings, latencies and timestamps"
        if found
        else "equal outside timings, latencies and timestamps"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
