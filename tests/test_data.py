"""Data stage on real images: layouts, splits, image modes and every kind of bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl import data
from edgetl.errors import DataError
from edgetl.recipe import DataConfig
from edgetl.runtime.preprocess import ImageDecodeError, Preprocessing, load_rgb
from tests.conftest import write_folder

PRE = Preprocessing(32, 36, "bilinear", (0.5,) * 3, (0.5,) * 3)


def config(path: Path, **fields) -> DataConfig:
    return DataConfig(path=path, val_split=0.2, test_split=0.2, **fields)


def test_class_folder_root_is_split_stratified_and_seeded(image_folder: Path) -> None:
    first = data.run(config(image_folder), PRE, seed=1)
    again = data.run(config(image_folder), PRE, seed=1)
    other = data.run(config(image_folder), PRE, seed=2)
    assert first.classes == ("china", "flower")
    assert [len(first.split(s).labels) for s in data.SPLITS] == [16, 4, 4]
    assert first.val.class_counts(2) == [2, 2]
    assert first.train.images.shape == (16, 32, 32, 3) and first.train.images.dtype == np.uint8
    assert first.test.sources == again.test.sources and first.content_hash == again.content_hash
    assert first.test.sources != other.test.sources


def test_split_folders_are_used_and_missing_test_is_carved_from_train(tmp_path: Path) -> None:
    write_folder(tmp_path / "root" / "train", count=10)
    write_folder(tmp_path / "root" / "validation", count=3, seed=5)
    ds = data.run(config(tmp_path / "root"), PRE, seed=0)
    assert len(ds.val.labels) == 6 and all("validation" in s for s in ds.val.sources)
    assert len(ds.test.labels) == 4 and all("/train/" in s for s in ds.test.sources)
    assert not set(ds.test.sources) & set(ds.train.sources)


def test_builtin_digits_are_real_upscaled_rgb() -> None:
    ds = data.run(DataConfig(builtin="digits"), PRE, seed=0)
    assert len(ds.classes) == 10 and sum(len(ds.split(s).labels) for s in data.SPLITS) == 1797
    image = ds.train.images[0]
    assert image.shape == (32, 32, 3) and (image[..., 0] == image[..., 1]).all() and image.max() > 200


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def test_image_modes_become_correct_rgb(tmp_path: Path) -> None:
    gray = load_rgb(_save(Image.new("L", (8, 8), 77), tmp_path / "g.png"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)

    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    assert load_rgb(_save(palette, tmp_path / "p.png")).getpixel((3, 3)) == (200, 10, 30)

    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    loaded = load_rgb(_save(rgba, tmp_path / "a.png"))
    assert loaded.getpixel((0, 0)) == (10, 20, 30) and loaded.getpixel((5, 5)) == (255, 255, 255)

    cmyk = load_rgb(_save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg"))
    red, green, blue = cmyk.getpixel((4, 4))
    assert red > 200 and green < 60 and blue < 60

    wide = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    wide.paste(32896, (0, 0, 4, 8))
    sixteen = load_rgb(_save(wide, tmp_path / "w.png"))
    assert sixteen.getpixel((0, 0)) == (128, 128, 128) and sixteen.getpixel((7, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    upright = load_rgb(_save(image, tmp_path / "r.jpg", exif=exif, quality=95))
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 2))[0] > 200  # the left edge is now the top


def test_bad_files_are_skipped_counted_and_named(image_folder: Path) -> None:
    (image_folder / "china" / "notes.txt").write_text("not an image")
    (image_folder / "china" / "random.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    good = (image_folder / "flower" / "001.jpg").read_bytes()
    (image_folder / "flower" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    ds = data.run(config(image_folder), PRE, seed=0)
    skipped = {Path(s.path).name: s.reason for s in ds.skipped}
    assert set(skipped) == {"notes.txt", "random.jpg", "truncated.jpg"}
    assert "truncated" in skipped["truncated.jpg"] and "not an image" in skipped["notes.txt"]
    assert ds.summary()["skipped"][0]["path"].endswith(tuple(skipped))
    with pytest.raises(DataError, match=r"(notes\.txt|random\.jpg) is not an image.*on_bad_image: skip"):
        data.run(config(image_folder, on_bad_image="error"), PRE, seed=0)


def test_undecodable_bytes_raise_a_named_decode_error() -> None:
    with pytest.raises(ImageDecodeError, match="upload.bin is not an image"):
        load_rgb(b"hello", name="upload.bin")


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda root: (root / "empty").mkdir(), r"Class folder .*empty is empty"),
        (lambda root: shutil.rmtree(root / "flower"), r"has 1 class folder\(s\) \['china'\]; edgetl needs at least 2"),
        (
            lambda root: [p.unlink() for p in sorted((root / "flower").iterdir())[2:]],
            r"Class 'flower' .* has 2 image\(s\); splitting it into train/val/test needs at least 3",
        ),
        (lambda root: shutil.rmtree(root), r"is not a folder"),
    ],
)
def test_unusable_folders_give_clear_errors(image_folder: Path, breakage, message: str) -> None:
    breakage(image_folder)
    with pytest.raises(DataError, match=message):
        data.run(config(image_folder), PRE, seed=0)


def test_a_split_missing_a_class_is_an_error(tmp_path: Path) -> None:
    write_folder(tmp_path / "root" / "train", count=6)
    write_folder(tmp_path / "root" / "val", count=2)
    shutil.rmtree(tmp_path / "root" / "val" / "flower")
    (tmp_path / "root" / "val" / "flower").mkdir()
    with pytest.raises(DataError, match=r"val split .* no readable images of class\(es\) \['flower'\]"):
        data.run(config(tmp_path / "root"), PRE, seed=0)
