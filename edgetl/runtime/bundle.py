"""Open a deploy bundle on the device: read its manifest, unpack it safely, check every file.

A bundle is a folder or a `.tar.gz` with `edgetl.json` and the files it lists. Nothing is
trusted before it is checked: the manifest must follow its schema (`edgetl.runtime.manifest`),
and match the pinned digest when there is one. An archive is read manifest first; then only
the files the manifest lists are unpacked, each checked against its recorded size before a
byte is written, and anything else (an unlisted file, a link, a device, an absolute or `..`
path) refuses the whole archive with nothing written. Every listed file must have the
sha256 the build recorded. Torch-free.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgetl.errors import BundleError
from edgetl.runtime.manifest import MANIFEST, MAX_MANIFEST_BYTES, SUPPORTED_SCHEMA, expected_digest, parse_manifest
from edgetl.runtime.preprocess import Preprocessing

__all__ = ["MANIFEST", "SUPPORTED_SCHEMA", "Bundle", "open_bundle", "sha256"]
# Bundles built before edgetl.json recorded `sizes`: a generous bound on all their files together.
UNSIZED_TOTAL_BYTES = 2 << 30
LAYOUT = (
    "a bundle archive holds edgetl.json and the files it lists, at its top level or in one folder "
    "(as `edgetl build` packs it, or `tar -czf NAME.tar.gz -C RUN_DIR bundle`)"
)


@dataclass(frozen=True)
class Bundle:
    folder: Path  # where the files are: the bundle folder, or where the archive was unpacked
    manifest: dict
    preprocessing: Preprocessing
    labels: tuple[str, ...]
    digest: str  # sha256 of edgetl.json's bytes, which list every other file's sha256 and size
    source: Path  # what was opened (a folder or an archive): messages name it, not a temp folder

    @property
    def model(self) -> Path:
        return self.folder / self.manifest["model"]

    def where(self, name: str) -> str:
        """How messages name the bundle's file `name`: its path in a folder, or `name in ARCHIVE`."""
        return _where(self.source, name)


def open_bundle(path: Path, unpack_to: Path | None = None, expected_sha256: str | None = None) -> Bundle:
    """A checked bundle from a folder or a `.tar.gz` (unpacked into `unpack_to`, default a temp folder).

    `expected_sha256` pins the bundle's digest (`Bundle.digest`). Raises BundleError naming
    the file or field for a missing, malformed, unpinned, oversized or modified bundle.

    >>> open_bundle(Path("runs/quickstart/quickstart.tar.gz")).labels[:3]
    ('0', '1', '2')
    """
    path, pinned = Path(path), expected_digest(expected_sha256)
    if path.is_file():
        if unpack_to is None:
            unpack_to = Path(tempfile.mkdtemp(prefix="edgetl-bundle-"))
            atexit.register(shutil.rmtree, unpack_to, True)  # the engine holds the model in memory by then
        folder = Path(unpack_to)
        manifest, digest = _unpack(path, folder, pinned)
    elif path.is_dir():
        folder = path
        manifest, digest = parse_manifest(_read_manifest(folder), str(folder / MANIFEST), pinned)
    else:
        raise BundleError(
            f"bundle {path} does not exist; pass a bundle folder or its .tar.gz "
            "(written by `edgetl build` to RUN_DIR/bundle and RUN_DIR/<name>.tar.gz)."
        )
    _verify(folder, manifest, path)
    pre = Preprocessing.from_dict(manifest["preprocessing"])  # the schema checked every field it reads
    return Bundle(folder, manifest, pre, tuple(manifest["labels"]), digest, path)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _where(source: Path, name: str) -> str:
    return str(source / name) if source.is_dir() else f"{name} in {source}"


def _read_manifest(folder: Path) -> bytes:
    path = folder / MANIFEST
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path} is {path.stat().st_size} bytes; an edgetl.json is at most {MAX_MANIFEST_BYTES}.")
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path} is missing: {folder} is not an edgetl bundle.") from None
    except OSError as exc:
        raise BundleError(f"{path} is not readable ({exc}).") from None


def _unpack(archive: Path, target: Path, pinned: str | None) -> tuple[dict, str]:
    """Read `archive`'s manifest, check every member against it, then write the listed files into `target`."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            manifest, digest, members = _scan(archive, tar, pinned)
            target.mkdir(parents=True, exist_ok=True)
            for name, member in members.items():
                with tar.extractfile(member) as source, (target / name).open("wb") as dest:
                    shutil.copyfileobj(source, dest)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise BundleError(f"{archive} is not a readable .tar.gz bundle ({exc}).") from None
    return manifest, digest


def _scan(archive: Path, tar: tarfile.TarFile, pinned: str | None) -> tuple[dict, str, dict[str, tarfile.TarInfo]]:
    """One pass over the headers (nothing written): the manifest, and the members it lists by name."""
    manifest, digest, folder = None, "", None
    members: dict[str, tarfile.TarInfo] = {}
    for member in tar:
        name, folder = _member_name(archive, member, folder)
        if name is None:
            continue
        if name in members or (name == MANIFEST and manifest is not None):
            raise _refused(archive, member, f"a second {name}; {LAYOUT}")
        if name == MANIFEST:
            manifest, digest = _archive_manifest(archive, tar, member, pinned)
            for seen in members.values():
                _check_listed(archive, manifest, seen)
        else:
            if manifest is not None:
                _check_listed(archive, manifest, member)
            members[name] = member
    if manifest is None:
        raise BundleError(f"{archive} holds no {MANIFEST}: {LAYOUT}.")
    total = sum(member.size for member in members.values())
    if "sizes" not in manifest and total > UNSIZED_TOTAL_BYTES:
        raise BundleError(
            f"{archive} would unpack to {total} bytes, over the {UNSIZED_TOTAL_BYTES} allowed to a bundle whose "
            f"{MANIFEST} records no file sizes (built before edgetl recorded them); rebuild it. Nothing was unpacked."
        )
    return manifest, digest, members


def _member_name(archive: Path, member: tarfile.TarInfo, folder: str | None) -> tuple[str | None, str | None]:
    """A member's file name in the bundle (None for a folder) and the one folder ("" for none) all members share."""
    parts = PurePosixPath(member.name).parts  # "./x" → ("x",); "." and "./" → ()
    unsafe = member.name.startswith("/") or ".." in parts or len(parts) > 2 or not (member.isfile() or member.isdir())
    if unsafe or (member.isdir() and len(parts) == 2) or (member.isfile() and not parts):
        raise _refused(archive, member, f"{LAYOUT}; no links, devices, nested folders, absolute or `..` paths")
    if not parts:  # the archive's root itself, as `tar -C bundle -czf NAME.tar.gz .` writes it
        return None, folder
    here = parts[0] if len(parts) == 2 or member.isdir() else ""
    if folder is not None and here != folder:
        spread = f"{folder or 'the top level'} and {here or 'the top level'}"
        raise _refused(archive, member, f"the archive's files are in more than one place ({spread}); {LAYOUT}")
    return (parts[-1] if member.isfile() else None), here


def _refused(archive: Path, member: tarfile.TarInfo, why: str) -> BundleError:
    return BundleError(f"{archive}: refusing archive member {member.name!r}: {why}. Nothing was unpacked.")


def _archive_manifest(archive: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, pinned: str | None):
    if member.size > MAX_MANIFEST_BYTES:
        raise _refused(archive, member, f"{member.size} bytes, and an {MANIFEST} is at most {MAX_MANIFEST_BYTES}")
    with tar.extractfile(member) as handle:
        return parse_manifest(handle.read(), f"{MANIFEST} in {archive}", pinned)


def _check_listed(archive: Path, manifest: dict, member: tarfile.TarInfo) -> None:
    """Refuse a member the manifest does not list, or whose size is not the one it records."""
    name = PurePosixPath(member.name).name
    if name not in manifest["files"]:
        raise _refused(archive, member, f"{MANIFEST} does not list it, and {LAYOUT}")
    recorded = manifest.get("sizes", {}).get(name)
    if recorded is not None and member.size != recorded:
        sizes = f"{member.size} bytes, but {MANIFEST} records {recorded}"
        raise _refused(archive, member, f"{sizes}: the archive is corrupt or was modified")


def _verify(folder: Path, manifest: dict, source: Path) -> None:
    """Every listed file exists with its recorded size (checked first: cheap) and sha256."""
    for name, expected in manifest["files"].items():
        file, recorded = folder / name, manifest.get("sizes", {}).get(name)
        if not file.is_file():
            raise BundleError(f"{_where(source, name)} is missing from the bundle; copy the whole bundle again.")
        if recorded is not None and file.stat().st_size != recorded:
            mismatch = f"is {file.stat().st_size} bytes, but {MANIFEST} records {recorded}"
        elif sha256(file) != expected:
            mismatch = f"does not match the sha256 in {MANIFEST}"
        else:
            continue
        raise BundleError(f"{_where(source, name)} {mismatch}: the bundle is corrupt or was modified. Copy it again.")
