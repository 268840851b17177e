"""Multi-label data: the seeded split of label-set rows, the check that every label can be learned, and the
bundled digit mosaics (`data.builtin: digits-mosaic`).

A label set is listed as a tuple of 0/1, one per label (the labels sorted); decoded splits hold
them as (N, C) uint8. Splitting is a seeded random permutation, not stratified: stratifying
label sets needs iterative stratification (Sechidis et al., 2011), and a random split of a few
hundred images or more leaves each label near its share; a label without a positive train image
is an error instead.
"""

from __future__ import annotations

import numpy as np

from edgetl.errors import DataError

MOSAIC_GRID = 2  # digits per side of a mosaic: 4 real digits, the label set is the distinct ones


def digit_images() -> tuple[list, np.ndarray]:
    """sklearn's 1,797 real 8×8 handwritten digits as 8-bit grayscale PIL images, and their (N,) classes."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink → 0..255
    return [Image.fromarray(img, "L") for img in pixels], digits.target


def digit_mosaics(val_split: float, test_split: float, seed: int) -> tuple[tuple[str, ...], dict[str, list], str]:
    """2×2 mosaics of real digits, a 16×16 image each, labeled with the digits they show.

    The digits are split first (seeded), so no digit image appears in two splits; each split then
    gets as many mosaics as it has digits, each tiling 4 of its digits drawn at random.
    """
    from PIL import Image

    images, targets = digit_images()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    val, test = round(len(order) * val_split), round(len(order) * test_split)
    pools = {"val": order[:val], "test": order[val : val + test], "train": order[val + test :]}
    listing: dict[str, list] = {}
    for split, pool in pools.items():
        listing[split] = []
        for i in range(len(pool)):
            chosen = rng.choice(pool, MOSAIC_GRID * MOSAIC_GRID, replace=False)
            mosaic = Image.new("L", (8 * MOSAIC_GRID, 8 * MOSAIC_GRID))
            for k, index in enumerate(chosen):
                mosaic.paste(images[index], (8 * (k % MOSAIC_GRID), 8 * (k // MOSAIC_GRID)))
            present = {int(targets[index]) for index in chosen}
            labels = tuple(int(d in present) for d in range(10))
            listing[split].append((mosaic, labels, f"digits-mosaic-{split}[{i}]"))
    return tuple(str(d) for d in range(10)), listing, "builtin:digits-mosaic"


def random_split(items: list, only: tuple[str, ...], fractions: dict[str, float], seed: int) -> dict[str, list]:
    """Seeded random split of label-set items into train and the splits `only` (at their `fractions`)."""
    order = np.random.default_rng(seed).permutation(len(items))
    out, start = {}, 0
    for split in only:
        count = min(max(1, round(len(items) * fractions[split])), len(items) - start - 1)
        out[split] = [items[i] for i in order[start : start + count]]
        start += count
    out["train"] = [items[i] for i in order[start:]]
    return out


def require_usable(labels: np.ndarray, classes: tuple[str, ...], split: str, origin: str) -> None:
    """Raises DataError when the (N, C) `labels` of `split` have no (readable) image, or, for train, naming the
    labels that no train image has; val and test measure the labels they have."""
    if not len(labels) and split != "train":
        raise DataError(
            f"The {split} split of {origin} has no readable images. Add some, or fix the unreadable ones listed above."
        )
    if split != "train":
        return
    missing = [classes[c] for c in np.flatnonzero(labels.sum(axis=0) == 0)] if len(labels) else list(classes)
    if missing:
        raise DataError(
            f"The train split of {origin} has no image with label(s) {missing}: a label needs at least one positive "
            "training image. Add images with it, move some into train, or drop the label."
        )
