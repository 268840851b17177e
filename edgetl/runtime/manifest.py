"""`edgetl.json`, a bundle's manifest: its digest, its schema, and the check of both.

The manifest lists the sha256 and size of every other file of the bundle, so the sha256
of its own bytes covers the whole bundle: that is the bundle's digest, which the build
prints and a device can pin (`--expect-sha256`). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any, get_args

from edgetl.errors import BundleError
from edgetl.runtime.engines import RUNTIMES
from edgetl.runtime.preprocess import Decode, Interpolation

MANIFEST = "edgetl.json"
SUPPORTED_SCHEMA = 3  # 2: adds `task` (a multi-label bundle), 3: `tasks` (several); single-label ones are still 1
MULTILABEL_SCHEMA = 2
MULTITASK_SCHEMA = 3
MAX_MANIFEST_BYTES = 1 << 20  # a real one is ~5 KB; the bound keeps a hostile one from filling memory
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ABSENT = object()


def parse_manifest(raw: bytes, where: str, expected_sha256: str | None = None) -> tuple[dict, str]:
    """`raw` (the bytes of an edgetl.json, called `where` in messages) → (manifest, digest).

    Raises BundleError when the digest is not `expected_sha256` (checked first: a pinned
    device trusts nothing else), when it is not JSON, or when a field breaks the schema.

    >>> parse_manifest(Path("bundle/edgetl.json").read_bytes(), "bundle/edgetl.json")[1][:12]
    '3f8a0c…'
    """
    digest = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise BundleError(
            f"{where} has sha256 {digest}, but --expect-sha256 pins {expected_sha256}: this is not the bundle that was "
            "built and pinned (its manifest differs, so its labels, contract or files may too). Copy the pinned bundle "
            "again, or pin the new build's digest."
        )
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BundleError(f"{where} is not readable JSON ({exc}).") from None
    check_schema(manifest, where)
    return manifest, digest


def expected_digest(value: str | None) -> str | None:
    """A pinned digest as given by a user, normalized; BundleError unless it is 64 hex digits."""
    if value is None:
        return None
    digest = value.strip().lower()
    if not _hex64(digest):
        raise BundleError(
            "--expect-sha256 must be a bundle's digest: 64 hex digits, the sha256 of its edgetl.json "
            f"(`edgetl build` and `edgetl info` print it); got {value!r}."
        )
    return digest


def check_schema(manifest: Any, where: str) -> None:
    """Raise BundleError naming the first field of `manifest` that breaks `_SCHEMA`, with its rule and value."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{where} must hold a JSON object; got {type(manifest).__name__}.")
    version = manifest.get("schema_version")
    if type(version) is int and version > SUPPORTED_SCHEMA:
        raise BundleError(
            f"{where} has schema_version {version}; this edgetl reads up to {SUPPORTED_SCHEMA}: "
            "upgrade with `pip install -U edgetl`."
        )
    for field, rule, required, check in _SCHEMA:
        value = _lookup(manifest, field)
        if value is _ABSENT and required:
            raise BundleError(f"{where} lacks `{field}` ({rule}); rebuild the bundle with `edgetl build`.")
        if value is not _ABSENT and not check(value, manifest):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise BundleError(
                f"{where}: `{field}` must be {rule}; got {shown}. "
                "The manifest was edited or is not from `edgetl build`; rebuild the bundle."
            )


def _lookup(manifest: dict, field: str) -> Any:
    value: Any = manifest
    for key in field.split("."):  # parents come earlier in _SCHEMA, so they are mappings by now
        value = value.get(key, _ABSENT) if isinstance(value, dict) else _ABSENT
    return value


def _integer(value: Any, low: int, high: float = math.inf) -> bool:
    return type(value) is int and low <= value <= high


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _numbers(value: Any, count: int) -> bool:
    return isinstance(value, list) and len(value) == count and all(_number(v) for v in value)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(s, str) and s for s in value)


def _hex64(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and PurePosixPath(name).name == name and name not in ("", "..", MANIFEST)


def _model_file(name: Any, manifest: dict) -> bool:
    """A listed .onnx, or a listed .xml whose .bin (OpenVINO's weights) is listed too."""
    if not isinstance(name, str) or name not in manifest["files"]:
        return False
    path = PurePosixPath(name)
    return path.suffix == ".onnx" or (path.suffix == ".xml" and path.with_suffix(".bin").name in manifest["files"])


def _metrics(value: Any) -> bool:
    latency = value.get("latency_ms") if isinstance(value, dict) else None
    numbers = ("accuracy", "agreement", "size_mb")
    return isinstance(latency, dict) and _number(latency.get("p50")) and all(_number(value.get(k)) for k in numbers)


def _task(value: Any, manifest: dict) -> bool:
    """A multi-label bundle's readout: kind multilabel and one threshold in [0, 1] per label."""
    if not isinstance(value, dict) or value.get("kind") != "multilabel":
        return False
    if manifest["schema_version"] < 2 or "tasks" in manifest:  # an older runtime would read it as single-label
        return False
    thresholds = value.get("thresholds")
    return _numbers(thresholds, len(manifest["labels"])) and all(0 <= t <= 1 for t in thresholds)


def _tasks(value: Any, manifest: dict) -> bool:
    """A multi-task bundle's tasks: distinct names, each a kind, its labels (the manifest's `labels` are every task's
    `name:label` in order) and its thresholds (one in [0, 1] per label of a multilabel task, none otherwise)."""
    if not isinstance(value, list) or len(value) < 2 or manifest["schema_version"] < 3 or "task" in manifest:
        return False
    if not all(isinstance(t, dict) and _strings(t.get("labels")) for t in value):
        return False
    names = [t.get("name") for t in value]
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        return False
    joined = [f"{t['name']}:{label}" for t in value for label in t["labels"]]
    if joined != manifest["labels"]:
        return False
    for task in value:
        thresholds, count = task.get("thresholds"), len(task["labels"]) if task.get("kind") == "multilabel" else 0
        if task.get("kind") not in ("single", "multilabel") or not _numbers(thresholds, count):
            return False
        if not all(0 <= t <= 1 for t in thresholds):
            return False
    return True


_Check = Callable[[Any, dict], bool]
# (field, rule, required, check): in order, each parent before its fields. `edgetl info`,
# `Predictor` and the server read these fields; the rest of the manifest is informative.
_SCHEMA: tuple[tuple[str, str, bool, _Check], ...] = (
    ("schema_version", f"an integer from 1 to {SUPPORTED_SCHEMA}", True, lambda v, m: _integer(v, 1, SUPPORTED_SCHEMA)),
    ("name", "a non-empty string", True, lambda v, m: isinstance(v, str) and bool(v)),
    (
        "files",
        "a mapping of plain file names (not edgetl.json) to sha256 digests (64 lowercase hex digits)",
        True,
        lambda v, m: isinstance(v, dict) and all(_plain_name(k) and _hex64(d) for k, d in v.items()),
    ),
    (
        "sizes",
        "a mapping of exactly the names in `files` to sizes in bytes (integers ≥ 0)",
        False,
        lambda v, m: isinstance(v, dict) and v.keys() == m["files"].keys() and all(_integer(s, 0) for s in v.values()),
    ),
    ("model", "the name of a listed .onnx file, or of a listed .xml whose .bin is listed too", True, _model_file),
    ("runtime", f"one of {', '.join(RUNTIMES)}", True, lambda v, m: isinstance(v, str) and v in RUNTIMES),
    (
        "labels",
        "a list of distinct non-empty strings",
        True,
        lambda v, m: isinstance(v, list) and v and all(isinstance(s, str) and s for s in v) and len(set(v)) == len(v),
    ),
    (
        "task",
        'a mapping with kind "multilabel" and `thresholds`, one number in [0, 1] per label, with schema_version 2 or '
        "more and no `tasks` (absent: single-label)",
        False,
        _task,
    ),
    (
        "tasks",
        "a list of 2 or more mappings with distinct `name`s, each with kind single|multilabel, its `labels` (the "
        "manifest's `labels` are every task's name:label in order) and `thresholds` (multilabel: one in [0, 1] per "
        "label; single: []), with schema_version 3 or more and no `task`",
        False,
        _tasks,
    ),
    ("preprocessing", "a mapping", True, lambda v, m: isinstance(v, dict)),
    ("preprocessing.input_size", "an integer ≥ 1", True, lambda v, m: _integer(v, 1)),
    (
        "preprocessing.resize_size",
        "an integer ≥ preprocessing.input_size",
        True,
        lambda v, m: _integer(v, m["preprocessing"]["input_size"]),
    ),
    (
        "preprocessing.interpolation",
        f"one of {', '.join(get_args(Interpolation))}",
        True,
        lambda v, m: v in get_args(Interpolation),
    ),
    ("preprocessing.mean", "a list of 3 finite numbers", True, lambda v, m: _numbers(v, 3)),
    ("preprocessing.std", "a list of 3 finite numbers > 0", True, lambda v, m: _numbers(v, 3) and min(v) > 0),
    ("preprocessing.layout", '"NCHW"', False, lambda v, m: v == "NCHW"),
    (
        "preprocessing.decode",
        f"one of {', '.join(get_args(Decode))} (absent: full)",
        False,
        lambda v, m: v in get_args(Decode),
    ),
    (
        "metrics",
        "a mapping with numbers `accuracy`, `agreement`, `size_mb` and `latency_ms.p50`",
        False,
        lambda v, m: _metrics(v),
    ),
    (
        "versions",
        "a mapping of package names to version strings (or null)",
        False,
        lambda v, m: isinstance(v, dict) and all(s is None or isinstance(s, str) for s in v.values()),
    ),
)
