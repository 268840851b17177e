"""The contract's decode mode (full | reduced) and the throughput path: what they must keep true.

`reduced` scales a large image down by a power of two while decoding; the build's data stage and
the device decode the same way, and contracts written before the field existed mean `full`.
`Predictor.stream` (behind `predict_batch` and `edgetl predict` on folders) decodes on a thread
ahead of the model: the same predictions as one by one, in order, errors in their places.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl.errors import BundleError, RecipeError
from edgetl.recipe import load_recipe
from edgetl.runtime.decode import load_rgb, reduction
from edgetl.runtime.predictor import Predictor
from edgetl.runtime.preprocess import ImageDecodeError, Preprocessing, preprocess_uint8
from tests.tiny_bundle import write_manifest, write_tiny_bundle

PRE = Preprocessing(32, 36, "bilinear", (0.5,) * 3, (0.5,) * 3)


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Smooth colour gradients with noise: JPEG-like content whose decode scale shows in the pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 127 / sum(size)], axis=-1) + rng.normal(
        0, 25, (size[1], size[0], 3)
    )
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def test_reduced_scales_by_the_largest_power_of_two_that_keeps_the_shorter_side() -> None:
    assert [
        reduction(size, 100) for size in [(1030, 800), (1030, 799), (400, 1000), (250, 200), (250, 199), (99, 5000)]
    ] == [8, 4, 4, 2, 1, 1]
    assert reduction((4032, 3024), 256) == 8 and reduction((500, 375), 256) == 1 and reduction((4032, 3024), None) == 1
    image = photo((1030, 800))
    jpeg, png = encoded(image, "JPEG", quality=90), encoded(image, "PNG")
    # 8 × 100 = 800 rows fit: 1/8 scale, sizes rounded up as libjpeg's scaled decoding does
    assert load_rgb(jpeg, min_side=100).size == load_rgb(png, min_side=100).size == (129, 100)
    assert load_rgb(np.asarray(image), min_side=101).size == load_rgb(jpeg, min_side=101).size == (258, 200)
    assert load_rgb(jpeg, min_side=800).size == load_rgb(jpeg).size == (1030, 800)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait: the scale is chosen from the shorter side either way
    assert load_rgb(encoded(image, "JPEG", exif=exif), min_side=100).size == (100, 129)
    # the DCT-domain decode is a smaller picture of the same photo, not a crop: near the full decode's block averages
    full_then_reduced = np.asarray(load_rgb(jpeg).reduce(8), np.int16)
    assert np.abs(np.asarray(load_rgb(jpeg, min_side=100), np.int16) - full_then_reduced).mean() < 4


def test_the_build_and_the_device_decode_a_reduced_contract_alike(tmp_path: Path) -> None:
    from edgetl import data
    from edgetl.recipe import DataConfig

    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(1200, 900), (640, 480), (70, 50)]):
        (folder / f"{i}.jpg").write_bytes(encoded(photo(size, i), "JPEG", quality=90))
    reduced = replace(PRE, decode="reduced")
    config = DataConfig(path=folder)
    built = data.load_unlabeled(folder, reduced, config, "adapt.target_images").images  # the build's data stage
    predictor = Predictor.load(write_tiny_bundle(tmp_path / "bundle", decode="reduced"))
    assert predictor.bundle.preprocessing == reduced
    on_device = np.stack([predictor.crop(path) for path in sorted(folder.iterdir())])
    np.testing.assert_array_equal(built, on_device)
    full = data.load_unlabeled(folder, PRE, config, "adapt.target_images").images
    changed = [int(np.abs(a.astype(int) - b).max()) for a, b in zip(full, on_device)]
    assert (
        changed[0] > 1 and changed[1] > 1 and changed[2] == 0
    )  # 1200×900 and 640×480 scaled; 70×50 has fewer than 2 × 36 rows


def test_contracts_without_the_field_mean_full_and_a_wrong_value_is_refused(tmp_path: Path) -> None:
    old = {"input_size": 32, "resize_size": 36, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert Preprocessing.from_dict(old).decode == "full"
    assert Preprocessing.from_dict({**old, "decode": "reduced"}).to_dict()["decode"] == "reduced"
    with pytest.raises(ValueError, match="decode must be one of"):
        Preprocessing.from_dict({**old, "decode": "fast"})
    predictor = Predictor.load(write_tiny_bundle(tmp_path / "old"))  # no `decode` in edgetl.json nor in the model
    assert predictor.bundle.preprocessing.decode == "full"
    big = encoded(photo((1200, 900)), "JPEG", quality=90)
    np.testing.assert_array_equal(predictor.crop(big), preprocess_uint8(big, PRE))

    bundle = write_tiny_bundle(tmp_path / "edited")
    manifest = json.loads((bundle / "edgetl.json").read_text())
    manifest["preprocessing"]["decode"] = "fast"
    write_manifest(bundle, {k: v for k, v in manifest.items() if k not in ("files", "sizes")})
    with pytest.raises(BundleError, match=r"`preprocessing.decode` must be one of full, reduced"):
        Predictor.load(bundle)


def test_the_recipe_sets_the_decode_mode(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: r\ndata:\n  builtin: digits\n")
    assert load_recipe(recipe, ["data.decode=reduced"]).data.decode == "reduced"
    with pytest.raises(RecipeError, match="data.decode"):
        load_recipe(recipe, ["data.decode=fast"])


def test_stream_gives_the_sequential_predictions_in_order_with_errors_in_place(tmp_path: Path) -> None:
    predictor = Predictor.load(write_tiny_bundle(tmp_path / "bundle"))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images: list = [encoded(Image.new("RGB", (40 + i, 30), colours[i % 3]), "PNG") for i in range(11)]
    images[5] = b"not an image"
    images[9] = tmp_path / "missing.jpg"
    outcomes = list(predictor.stream(images, top_k=2, batch=4))  # batches of 4 crops across the two errors
    assert len(outcomes) == 11
    assert isinstance(outcomes[5], ImageDecodeError) and "bytes is not an image" in str(outcomes[5])
    assert isinstance(outcomes[9], ImageDecodeError) and "missing.jpg does not exist" in str(outcomes[9])
    for i, outcome in enumerate(outcomes):
        if i not in (5, 9):
            assert outcome == predictor.predict(images[i], top_k=2)
            assert outcome.label == ["red", "green", "blue"][i % 3]
    good = [image for i, image in enumerate(images) if i not in (5, 9)]
    assert predictor.predict_batch(good, top_k=2) == [o for i, o in enumerate(outcomes) if i not in (5, 9)]
    with pytest.raises(ImageDecodeError, match="bytes is not an image"):
        predictor.predict_batch(images)


def test_a_consumer_that_stops_early_leaves_no_decoding_thread(tmp_path: Path) -> None:
    predictor = Predictor.load(write_tiny_bundle(tmp_path / "bundle"))
    red = encoded(Image.new("RGB", (40, 30), (255, 0, 0)), "PNG")
    stream = predictor.stream([red] * 50, batch=4)
    assert next(stream).label == "red"
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("edgetl-decode")]


STREAM_RSS = """
import json, sys
from edgetl.runtime.bench import peak_rss_kb
from edgetl.runtime.predictor import Predictor
outcomes = [getattr(o, "label", type(o).__name__) for o in Predictor.load(sys.argv[1]).stream(sys.argv[2:])]
print(json.dumps({"outcomes": outcomes, "peak_rss_mb": peak_rss_kb() / 1024}))
"""


def test_streaming_a_folder_of_large_and_hostile_images_stays_under_300_mb(tmp_path: Path) -> None:
    """One decode at a time: two 16 MP photos, a 1×20000 strip and a bomb refused from its header."""
    files = []
    for name, image in [
        ("big1.jpg", Image.new("RGB", (4000, 4000), (200, 10, 10))),
        ("tall.png", Image.new("L", (1, 20000))),
        ("bomb.png", Image.new("L", (12000, 12000))),
        ("big2.jpg", Image.new("RGB", (4000, 4000), (10, 10, 200))),
    ]:
        image.save(tmp_path / name)
        files.append(tmp_path / name)
    bundle = write_tiny_bundle(tmp_path / "bundle")
    done = subprocess.run(
        [sys.executable, "-c", STREAM_RSS, str(bundle), *map(str, files)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout)
    assert measured["outcomes"] == ["red", "red", "ImageTooLarge", "blue"]
    assert measured["peak_rss_mb"] < 300
