"""Data stage: find the images, split them, decode each once into a uint8 cache on disk.

Every image is decoded and cropped once, through the same functions the device runtime uses
(`edgetl.runtime.preprocess`), into shard files of the disk cache (`edgetl.datacache`), keyed
by the files' bytes and the preprocessing contract: epochs never re-decode JPEGs, eval sees
what the device will see, later builds of the same data decode nothing, and a split larger
than RAM is read a batch at a time.

When training augments, the train split also keeps a larger square "train frame" per image:
the whole center square of the image at the contract's resize size (256 px for a 224 px crop
with crop_pct 0.875), so that the random resized crop can reach beyond the eval crop, as
torchvision's reference recipe crops from the whole image. Val, test and calibration read the
exact contract crop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgetl import datacache, label_sets, manifests, multitask_data
from edgetl.datacache import DiskArray, ShardWriter
from edgetl.errors import DataError
from edgetl.progress import track
from edgetl.recipe import DataConfig
from edgetl.runtime.preprocess import ImageDecodeError, Preprocessing, crop_uint8, load_rgb
from edgetl.runtime.walk import candidate_files

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
_DECODE_CHUNK = 256  # images decoded between writes


@dataclass(frozen=True)
class SkippedImage:
    path: str
    reason: str


@dataclass(frozen=True)
class Split:
    images: np.ndarray | DiskArray  # (N, S, S, 3) uint8, the eval crop
    labels: np.ndarray  # (N,) int64 class indices, or (N, C) uint8 0/1 label sets
    sources: tuple[str, ...]  # file path, or "digits[i]"
    key: str = ""  # the disk cache entry's key (files' bytes, labels, contract); "" for arrays made in memory
    frames: DiskArray | None = None  # (N, F, F, 3) uint8 train frames, F the resize size; when augmenting
    tasks: tuple = ()  # a multi-task build's LabelTasks, whose 0/1 blocks lie side by side in (N, Σ classes) labels

    def class_counts(self, num_classes: int) -> list[int]:
        if self.labels.ndim == 2:  # label sets: images per label
            return self.labels.sum(axis=0, dtype=np.int64).tolist()
        return np.bincount(self.labels, minlength=num_classes).tolist()

    def fingerprint(self) -> str:
        """A short hash of the pixels and labels: stages that learn from this split key on it (the cache key
        when the split came from the disk cache: it hashes the files the pixels come from)."""
        if self.key:
            return self.key
        return hashlib.sha256(self.labels.tobytes() + images_fingerprint(self.images).encode()).hexdigest()[:16]


def images_fingerprint(images: np.ndarray | DiskArray) -> str:
    """A short hash of uint8 images: a disk array's cache key, else the pixels, read a chunk at a time."""
    if getattr(images, "key", ""):
        return images.key
    digest = hashlib.sha256(str(images.shape).encode())
    for start in range(0, len(images), _DECODE_CHUNK):
        digest.update(np.ascontiguousarray(images[start : start + _DECODE_CHUNK]).tobytes())
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
    decoded: int = 0  # images this run decoded (0: every split came from the disk cache)

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


def run(
    config: DataConfig, pre: Preprocessing, seed: int, frames: bool = False, multilabel: bool = False, tasks=None
) -> Dataset:
    """Load the recipe's data into decoded, split arrays on disk (`data.cache_dir`); with `frames`, the train
    split also gets its train frames (for augmentation); `multilabel`: a manifest's rows have label sets
    (`edgetl.label_sets`), each split's labels (N, C) uint8; `tasks` (the recipe's): `edgetl.multitask_data`.

    Raises DataError (a missing or badly laid out folder, a class without images, an unreadable
    image with `data.on_bad_image: error`), OutputError (the cache folder cannot be written).

    >>> ds = run(DataConfig(builtin="digits"), pre, seed=0)
    >>> ds.train.images.shape[1:] == (pre.input_size, pre.input_size, 3)
    True
    """
    label_tasks = ()
    if tasks:
        label_tasks, classes, listing, origin = multitask_data.listing(config, tasks, seed)
    elif config.builtin == "digits":
        classes, listing, origin = _digits_listing(config, seed)
    elif config.builtin == "digits-mosaic":
        classes, listing, origin = label_sets.digit_mosaics(config.val_split, config.test_split, seed)
    elif config.manifest is not None:
        classes, listing, origin = _manifest_listing(Path(config.manifest), config, seed, multilabel)
    else:
        classes, listing, origin = _folder_listing(Path(str(config.path)), config, seed)
    skipped: list[SkippedImage] = []
    loaded = {name: _load(listing[name], pre, name, skipped, config, frames and name == "train") for name in SPLITS}
    splits = {name: replace(split, tasks=label_tasks) for name, (split, _) in loaded.items()}
    for name, split in splits.items():
        _require_every_class(split, classes, name, origin)
    if skipped:
        log.warning("skipped %d unreadable file(s); they are listed in metrics.json", len(skipped))
    parts = (splits["train"], splits["val"], splits["test"], tuple(skipped), _content_hash(classes, splits), origin)
    return Dataset(classes, *parts, sum(count for _, count in loaded.values()))


def load_unlabeled(folder: Path, pre: Preprocessing, config: DataConfig, field: str) -> Split:
    """Every image file under `folder` (any layout), decoded once; labels are -1."""
    if not folder.is_dir():
        raise DataError(
            f"`{field}` {folder} is not a folder. Point it at a folder of images from the deployment domain."
        )
    split, _ = _load([(path, -1, str(path)) for path in candidate_files(folder)], pre, field, [], config)
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
    split, _ = _load(_list_files(folder, classes, allow_empty=True), pre, field, [], config)
    if not len(split.labels):
        raise DataError(f"`{field}` {folder} has no readable images in any class folder.")
    return split


def _digits_listing(config: DataConfig, seed: int) -> tuple[tuple[str, ...], _Listing, str]:
    """sklearn's real 8×8 handwritten digits as 8-bit grayscale images (the crop upscales them)."""
    images, targets = label_sets.digit_images()
    items = [(image, int(label), f"digits[{i}]") for i, (image, label) in enumerate(zip(images, targets))]
    classes = tuple(str(name) for name in range(10))
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


def _manifest_listing(
    manifest: Path, config: DataConfig, seed: int, multilabel: bool
) -> tuple[tuple[str, ...], _Listing, str]:
    """The rows of a label manifest, listed as an ImageFolder with the same images would be."""
    classes, listing, named_splits = manifests.listing(manifest, multilabel, config.allow_empty_labels)
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
    """Seeded per-class split; every class gets at least one image in every split. Label sets: a seeded random
    split (`label_sets.random_split`)."""
    fractions = fractions or {"val": config.val_split, "test": config.test_split}
    if items and isinstance(items[0][1], tuple):
        return label_sets.random_split(items, only, fractions, seed)
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


def _load(
    items, pre: Preprocessing, split: str, skipped: list[SkippedImage], config: DataConfig, frames: bool = False
) -> tuple[Split, int]:
    """The split's crops (and, with `frames`, its train frames) from the disk cache, decoded into it
    when no intact entry has them; and how many images this call decoded (0 when reused)."""
    folder = cache_root(config) / "decoded" / _listing_key(items, pre, config)
    entry = datacache.load_or_build(
        folder,
        lambda staging: _decode_into(staging, items, pre, split, config, frames),
        usable=lambda meta: bool(meta["frame_size"]) or not frames,  # an entry with frames serves both
    )
    meta = entry.meta
    for name, reason in meta["skipped"]:  # in listing order, as when they were decoded
        if config.on_bad_image == "error":
            raise DataError(_bad_image_advice(reason))
        log.warning("skipping %s", reason)
        skipped.append(SkippedImage(name, reason))
    count = entry.arrays["images"].count
    if entry.reused:
        log.info("data %s: reused %d decoded images from %s (decoded none)", split, count, folder)
    width = len(items[0][1]) if items and isinstance(items[0][1], tuple) else None  # label sets: (N, C) 0/1
    labels = np.asarray(meta["labels"], dtype=np.int64 if width is None else np.uint8)
    labels = labels if width is None else labels.reshape(-1, width)  # (0, C) when every image was skipped
    return Split(entry.arrays["images"], labels, tuple(meta["sources"]), folder.name, entry.arrays.get("frames")), (
        0 if entry.reused else len(items)
    )


def _decode_into(staging: Path, items, pre: Preprocessing, split: str, config: DataConfig, frames: bool):
    """Decode every item once into shards in `staging`: its eval crop (and train frame); the entry's metadata."""
    frame_pre = replace(pre, input_size=pre.resize_size)  # the whole center square at the resize size
    writers = [ShardWriter(staging, "images", (pre.input_size, pre.input_size, 3))]
    if frames:
        writers.append(ShardWriter(staging, "frames", (frame_pre.input_size, frame_pre.input_size, 3)))
    min_side = pre.resize_size if pre.decode == "reduced" else None

    def one(item):
        source, label, name = item
        try:
            image = load_rgb(source, name, config.max_image_pixels, min_side)
        except ImageDecodeError as exc:
            if config.on_bad_image == "error":
                raise DataError(_bad_image_advice(str(exc))) from None
            return SkippedImage(name, str(exc))
        crops = [crop_uint8(image, pre)]  # `preprocess_uint8`'s crop: what the device sees
        if frames:
            crops.append(crop_uint8(image, frame_pre))  # from the same decoded image
        return crops, label, name

    def outcomes():
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # Pillow releases the GIL while decoding
            for start in range(0, len(items), _DECODE_CHUNK):  # chunks: RAM holds one chunk of crops, not a split
                yield from pool.map(one, items[start : start + _DECODE_CHUNK])

    labels, sources, skipped = [], [], []
    for outcome in track(outcomes(), total=len(items), description=f"decode {split}"):
        if isinstance(outcome, SkippedImage):
            skipped.append([outcome.path, outcome.reason])
            continue
        crops, label, name = outcome
        for writer, crop in zip(writers, crops):
            writer.append(crop[None])
        labels.append(label)
        sources.append(name)
    meta = {"labels": labels, "sources": sources, "skipped": skipped, "frame_size": frame_pre.input_size * frames}
    return meta, writers


def _bad_image_advice(reason: str) -> str:
    return f"{reason}. Remove or replace it, or set `data.on_bad_image: skip` to skip unreadable images."


def _listing_key(items, pre: Preprocessing, config: DataConfig) -> str:
    """The cache key of a listing: every file's bytes (not its size and mtime, which an edit or a copy
    can keep or change regardless of the pixels), names, labels, the preprocessing contract and the pixel limit."""
    sources = [item[0] for item in items]
    chunks = [sources[i : i + _DECODE_CHUNK] for i in range(0, len(sources), _DECODE_CHUNK)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # a task per chunk: 37,000 futures cost 1.5 s
        contents = [digest for chunk in pool.map(lambda c: [_source_digest(s) for s in c], chunks) for digest in chunk]
    digest = hashlib.sha256(json.dumps([datacache.FORMAT, pre.to_dict(), config.max_image_pixels]).encode())
    for (_, label, name), content in zip(items, contents):
        digest.update(f"{name}\0{label}\0{content}\n".encode())
    return digest.hexdigest()[:24]


def _source_digest(source) -> str:
    if isinstance(source, (str, Path)):
        try:
            with open(source, "rb") as handle:
                return hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError as exc:  # reported as unreadable when decoded
            return f"unreadable: {exc}"
    return hashlib.sha256(f"{source.mode}{source.size}".encode() + source.tobytes()).hexdigest()  # a PIL image


def _require_every_class(split: Split, classes: tuple[str, ...], name: str, origin: str) -> None:
    if split.labels.ndim == 2:  # label sets: train needs every label; val/test measure those they have
        return label_sets.require_usable(split.labels, classes, name, origin)
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
        digest.update(f"{name}:{splits[name].fingerprint()}".encode())
    return digest.hexdigest()[:16]


def cache_root(config: DataConfig) -> Path:
    """`data.cache_dir`, else the default shared by every build of this user (`edgetl.datacache.default_root`)."""
    return Path(config.cache_dir) if config.cache_dir is not None else datacache.default_root()
