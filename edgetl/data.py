"""Data stage: find the images, split them, decode each once into a uint8 cache.

Every image is decoded and cropped exactly once per run, through the same function the
device runtime uses (`edgetl.runtime.preprocess.preprocess_uint8`), so epochs never
re-decode JPEGs and eval sees what the device will see.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl import manifests
from edgetl.errors import DataError
from edgetl.progress import track
from edgetl.recipe import DataConfig
from edgetl.runtime.preprocess import ImageDecodeError, Preprocessing, preprocess_uint8
from edgetl.runtime.walk import candidate_files

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


@dataclass(frozen=True)
class SkippedImage:
    path: str
    reason: str


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, S, S, 3) uint8, the eval crop
    labels: np.ndarray  # (N,) int64
    sources: tuple[str, ...]  # file path, or "digits[i]"

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()

    def fingerprint(self) -> str:
        """A short hash of the pixels and labels: stages that learn from this split key on it."""
        digest = hashlib.sha256(self.labels.tobytes())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Dataset:
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    skipped: tuple[SkippedImage, ...]
    content_hash: str  # of classes, labels and pixels: stage caches key on it
    origin: str

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def summary(self) -> dict:
        """JSON-ready counts per split and class, and the skipped files."""
        n = len(self.classes)
        return {
            "origin": self.origin,
            "classes": list(self.classes),
            "counts": {
                s: {"total": len(self.split(s).labels), "per_class": self.split(s).class_counts(n)} for s in SPLITS
            },
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "content_hash": self.content_hash,
        }


# (source, label) pairs per split, before decoding; a source is a path or a decoded image.
_Listing = dict[str, list[tuple[object, int, str]]]


def run(config: DataConfig, pre: Preprocessing, seed: int) -> Dataset:
    """Load the recipe's data into decoded, split arrays.

    >>> ds = run(DataConfig(builtin="digits"), pre, seed=0)
    >>> ds.train.images.shape[1:] == (pre.input_size, pre.input_size, 3)
    True
    """
    if config.builtin == "digits":
        classes, listing, origin = _digits_listing(config, seed)
    elif config.manifest is not None:
        classes, listing, origin = _manifest_listing(Path(config.manifest), config, seed)
    else:
        classes, listing, origin = _folder_listing(Path(str(config.path)), config, seed)
    skipped: list[SkippedImage] = []
    splits = {name: _decode(listing[name], pre, name, skipped, config) for name in SPLITS}
    for name, split in splits.items():
        _require_every_class(split, classes, name, origin)
    if skipped:
        log.warning("skipped %d unreadable file(s); they are listed in metrics.json", len(skipped))
    return Dataset(
        classes, splits["train"], splits["val"], splits["test"], tuple(skipped), _content_hash(classes, splits), origin
    )


def load_unlabeled(folder: Path, pre: Preprocessing, config: DataConfig, field: str) -> Split:
    """Every image file under `folder` (any layout), decoded once; labels are -1."""
    if not folder.is_dir():
        raise DataError(
            f"`{field}` {folder} is not a folder. Point it at a folder of images from the deployment domain."
        )
    split = _decode([(path, -1, str(path)) for path in candidate_files(folder)], pre, field, [], config)
    if not len(split.labels):
        raise DataError(f"`{field}` {folder} has no readable images. Add images from the deployment domain.")
    return split


def load_labeled(folder: Path, classes: tuple[str, ...], pre: Preprocessing, config: DataConfig, field: str) -> Split:
    """<folder>/<class>/* with the training classes (some may be absent), decoded once."""
    if not folder.is_dir():
        raise DataError(
            f"`{field}` {folder} is not a folder. Lay it out as <root>/<class>/<image> with the training classes."
        )
    extra = sorted(set(_class_names(folder, need_two=False)) - set(classes))
    if extra:
        raise DataError(
            f"`{field}` {folder} has class folder(s) {extra} that the training data lacks; use the training "
            f"classes {list(classes)}."
        )
    split = _decode(_list_files(folder, classes, allow_empty=True), pre, field, [], config)
    if not len(split.labels):
        raise DataError(f"`{field}` {folder} has no readable images in any class folder.")
    return split


def _digits_listing(config: DataConfig, seed: int) -> tuple[tuple[str, ...], _Listing, str]:
    """sklearn's real 8×8 handwritten digits as 8-bit grayscale images (the crop upscales them)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink → 0..255
    items = [
        (Image.fromarray(img, "L"), int(label), f"digits[{i}]")
        for i, (img, label) in enumerate(zip(pixels, digits.target))
    ]
    classes = tuple(str(name) for name in digits.target_names)
    return classes, _stratified(items, classes, config, seed, "builtin digits"), "builtin:digits"


def _folder_listing(root: Path, config: DataConfig, seed: int) -> tuple[tuple[str, ...], _Listing, str]:
    if not root.is_dir():
        raise DataError(
            f"`data.path` {root} is not a folder. Point it at an image folder laid out as <root>/<class>/*, or use "
            "`data.builtin: digits`."
        )
    split_dirs = {
        name: next((root / f for f in folders if (root / f).is_dir()), None) for name, folders in _SPLIT_FOLDERS.items()
    }
    if split_dirs["train"] is None:
        classes = _class_names(root)
        items = _list_files(root, classes)
        return classes, _stratified(items, classes, config, seed, str(root)), str(root)
    classes = _class_names(split_dirs["train"])
    listing: _Listing = {"train": _list_files(split_dirs["train"], classes)}
    for name in ("val", "test"):
        folder = split_dirs[name]
        if folder is not None:
            extra = sorted(set(_class_names(folder, need_two=False)) - set(classes))
            if extra:
                raise DataError(
                    f"{folder} has class folder(s) {extra} that {split_dirs['train']} lacks. Every class must have "
                    "training images."
                )
            listing[name] = _list_files(folder, classes, allow_empty=True)
    return classes, _carve_missing(listing, classes, config, seed, str(split_dirs["train"])), str(root)


def _manifest_listing(manifest: Path, config: DataConfig, seed: int) -> tuple[tuple[str, ...], _Listing, str]:
    """The rows of a label manifest, listed as an ImageFolder with the same images would be."""
    classes, listing, named_splits = manifests.listing(manifest)
    if not named_splits:
        return classes, _stratified(listing["train"], classes, config, seed, str(manifest)), str(manifest)
    return classes, _carve_missing(listing, classes, config, seed, str(manifest)), str(manifest)


def _carve_missing(listing: _Listing, classes: tuple[str, ...], config: DataConfig, seed: int, origin: str) -> _Listing:
    """Hold the missing val/test split(s) out of train, stratified."""
    missing = [name for name in ("val", "test") if name not in listing]
    if missing:
        fractions = {"val": config.val_split, "test": config.test_split}
        listing.update(_stratified(listing["train"], classes, config, seed, origin, only=missing, fractions=fractions))
    return listing


def _class_names(folder: Path, need_two: bool = True) -> tuple[str, ...]:
    names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if need_two and len(names) < 2:
        raise DataError(
            f"{folder} has {len(names)} class folder(s) {list(names)}; edgetl needs at least 2, laid out as "
            f"{folder}/<class>/<image>."
        )
    return names


def _list_files(folder: Path, classes: tuple[str, ...], allow_empty: bool = False) -> list[tuple[object, int, str]]:
    items = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        files = candidate_files(class_dir) if class_dir.is_dir() else []
        if not files and not allow_empty:  # an empty val/test class is reported once decoding is done
            raise DataError(f"Class folder {class_dir} is empty. Add images of class '{name}' or remove the folder.")
        items.extend((path, label, str(path)) for path in files)
    return items


def _stratified(
    items, classes, config: DataConfig, seed: int, origin: str, only=SPLITS[1:], fractions=None
) -> _Listing:
    """Seeded per-class split; every class gets at least one image in every split."""
    fractions = fractions or {"val": config.val_split, "test": config.test_split}
    rng = np.random.default_rng(seed)
    out: _Listing = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        members = [item for item in items if item[1] == label]
        needed = 1 + len(only)
        if len(members) < needed:
            raise DataError(
                f"Class '{name}' in {origin} has {len(members)} image(s); splitting it into train/{'/'.join(only)} "
                f"needs at least {needed}. Add images, or provide explicit split folders."
            )
        order = rng.permutation(len(members))
        start = 0
        for split in only:
            count = min(max(1, round(len(members) * fractions[split])), len(members) - start - 1)
            out[split].extend(members[i] for i in order[start : start + count])
            start += count
        out["train"].extend(members[i] for i in order[start:])
    return {k: v for k, v in out.items() if k == "train" or k in only}


def _decode(items, pre: Preprocessing, split: str, skipped: list[SkippedImage], config: DataConfig) -> Split:
    def one(item):
        source, label, name = item
        try:
            return preprocess_uint8(source, pre, name, config.max_image_pixels), label, name
        except ImageDecodeError as exc:
            if config.on_bad_image == "error":
                raise DataError(
                    f"{exc}. Remove or replace it, or set `data.on_bad_image: skip` to skip unreadable images."
                ) from None
            return SkippedImage(name, str(exc))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # Pillow releases the GIL while decoding
        outcomes = list(track(pool.map(one, items), total=len(items), description=f"decode {split}"))
    results = []
    for outcome in outcomes:  # in listing order, so skipped files are reported deterministically
        if isinstance(outcome, SkippedImage):
            log.warning("skipping %s", outcome.reason)
            skipped.append(outcome)
        else:
            results.append(outcome)
    size = pre.input_size
    images = np.stack([r[0] for r in results]) if results else np.zeros((0, size, size, 3), np.uint8)
    labels = np.asarray([r[1] for r in results], dtype=np.int64)
    return Split(images, labels, tuple(r[2] for r in results))


def _require_every_class(split: Split, classes: tuple[str, ...], name: str, origin: str) -> None:
    counts = split.class_counts(len(classes))
    missing = [classes[i] for i, c in enumerate(counts) if c == 0]
    if missing:
        raise DataError(
            f"The {name} split of {origin} has no readable images of class(es) {missing}. Every class needs images "
            "in every split: add some, or fix the unreadable ones listed above."
        )


def _content_hash(classes: tuple[str, ...], splits: dict[str, Split]) -> str:
    digest = hashlib.sha256("\n".join(classes).encode())
    for name in SPLITS:
        digest.update(name.encode())
        digest.update(splits[name].labels.tobytes())
        digest.update(np.ascontiguousarray(splits[name].images).tobytes())
    return digest.hexdigest()[:16]
