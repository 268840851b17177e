"""Open a deploy bundle on the device: unpack it safely and check every file's sha256.

A bundle is a folder or a `.tar.gz` with `edgetl.json` and the model file(s) it lists.
Nothing is trusted before it is checked: archive members must be plain files inside the
target folder (no links, no absolute or `..` paths), and every listed file must exist with
the hash the build recorded. numpy-free, torch-free.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgetl.errors import BundleError
from edgetl.runtime.preprocess import Preprocessing

MANIFEST = "edgetl.json"
SUPPORTED_SCHEMA = 1


@dataclass(frozen=True)
class Bundle:
    folder: Path
    manifest: dict
    preprocessing: Preprocessing
    labels: tuple[str, ...]

    @property
    def model(self) -> Path:
        return self.folder / self.manifest["model"]


def open_bundle(path: Path, unpack_to: Path | None = None) -> Bundle:
    """A checked bundle from a folder or a `.tar.gz` (unpacked into `unpack_to`, default a temp folder).

    >>> open_bundle(Path("runs/quickstart/quickstart.tar.gz")).labels[:3]
    ('0', '1', '2')
    """
    path = Path(path)
    if path.is_file():
        if unpack_to is None:
            unpack_to = Path(tempfile.mkdtemp(prefix="edgetl-bundle-"))
            atexit.register(shutil.rmtree, unpack_to, True)  # the engine holds the model in memory by then
        folder = _unpack(path, Path(unpack_to))
    elif path.is_dir():
        folder = path
    else:
        raise BundleError(f"bundle {path} does not exist; pass a bundle folder or its .tar.gz (written by `edgetl build` to RUN_DIR/bundle and RUN_DIR/<name>.tar.gz).")
    manifest = _read_manifest(folder)
    _verify(folder, manifest)
    try:
        pre = Preprocessing.from_dict(manifest["preprocessing"])
    except ValueError as exc:
        raise BundleError(f"{folder / MANIFEST}: {exc}") from None
    return Bundle(folder, manifest, pre, tuple(manifest["labels"]))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unpack(archive: Path, target: Path) -> Path:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                parts = PurePosixPath(member.name).parts
                if not member.isfile() or member.name.startswith("/") or ".." in parts or len(parts) > 2:
                    raise BundleError(f"{archive}: refusing archive member {member.name!r}: a bundle holds only plain files in one folder.")
            target.mkdir(parents=True, exist_ok=True)
            for member in members:
                with tar.extractfile(member) as source, (target / PurePosixPath(member.name).name).open("wb") as dest:
                    shutil.copyfileobj(source, dest)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{archive} is not a readable .tar.gz bundle ({exc}).") from None
    return target


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} is missing: {folder} is not an edgetl bundle.") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} is not readable JSON ({exc}).") from None
    missing = {"schema_version", "model", "runtime", "labels", "preprocessing", "files"} - set(manifest)
    if missing:
        raise BundleError(f"{path} lacks {sorted(missing)}; rebuild the bundle with `edgetl build`.")
    if manifest["schema_version"] > SUPPORTED_SCHEMA:
        raise BundleError(f"{path} has schema_version {manifest['schema_version']}; this edgetl reads up to {SUPPORTED_SCHEMA}: upgrade with `pip install -U edgetl`.")
    return manifest


def _verify(folder: Path, manifest: dict) -> None:
    if manifest["model"] not in manifest["files"]:
        raise BundleError(f"{folder / MANIFEST} does not list the hash of its model {manifest['model']}; the bundle is incomplete.")
    for name, expected in manifest["files"].items():
        file = folder / name
        if PurePosixPath(name).name != name:
            raise BundleError(f"{folder / MANIFEST} lists {name!r}, which is not a plain file name.")
        if not file.is_file():
            raise BundleError(f"{file} is missing from the bundle; copy the whole bundle again.")
        if sha256(file) != expected:
            raise BundleError(f"{file} does not match the sha256 in {MANIFEST}: the bundle is corrupt or was modified. Copy it again from the build.")
