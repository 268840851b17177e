"""Hostile and odd images: bounded memory and time, symlinked folders, validated arrays, high-bit depths.

Each test takes one kind of input that once crashed, hung or blew up memory, and asserts the
documented behaviour: the error type and its message, the files found, the RSS bound.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_bundle import write_tiny_bundle

from edgetl import data
from edgetl.recipe import DataConfig
from edgetl.runtime.predictor import Predictor
from edgetl.runtime.preprocess import ImageDecodeError, ImageTooLarge, Preprocessing, load_rgb, preprocess_uint8
from edgetl.runtime.resize import vertical_first
from edgetl.runtime.walk import candidate_files
from edgetl.runtime.warnlog import route_warnings

PRE = Preprocessing(32, 36, "bicubic", (0.5,) * 3, (0.5,) * 3)

# Predicts each file in a fresh process and prints its peak RSS (VmHWM): the device's view.
PEAK_RSS = """
import json, sys, time
from edgetl.runtime.bench import peak_rss_kb
from edgetl.runtime.predictor import Predictor
from edgetl.runtime.preprocess import ImageDecodeError
predictor = Predictor.load(sys.argv[1])
results = {}
for path in sys.argv[2:]:
    started = time.perf_counter()
    try:
        outcome = predictor.predict(path).label
    except ImageDecodeError as exc:
        outcome = type(exc).__name__ + ": " + str(exc)
    results[path] = {"outcome": outcome, "seconds": time.perf_counter() - started}
print(json.dumps({"results": results, "peak_rss_mb": peak_rss_kb() / 1024}))
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def peak_rss(bundle: Path, files: list[Path]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(bundle), *map(str, files)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_extreme_aspect_ratios_and_bombs_stay_bounded(bundle: Path, tmp_path: Path) -> None:
    """A 118-byte 1×20000 PNG took 8 s and 1.25 GB; a 140 KB 12000² PNG decoded to 1.2 GB."""
    shapes = {
        "tall.png": ("L", (1, 20000)),
        "wide.png": ("L", (65000, 1)),
        "wide3.png": ("RGB", (30001, 3)),
        "bomb.png": ("L", (12000, 12000)),
        "bomb14k.png": ("L", (14000, 14000)),
    }
    files = []
    for name, (mode, size) in shapes.items():
        Image.new(mode, size).save(tmp_path / name)
        files.append(tmp_path / name)
    measured = peak_rss(bundle, files)
    outcomes = {Path(path).name: result["outcome"] for path, result in measured["results"].items()}
    assert all(outcomes[name] in ("red", "green", "blue") for name in ("tall.png", "wide.png", "wide3.png"))
    assert (
        outcomes["bomb.png"].startswith("ImageTooLarge")
        and "12000×12000" in outcomes["bomb.png"]
        and "20000000" in outcomes["bomb.png"]
    )
    assert outcomes["bomb14k.png"].startswith("ImageTooLarge") and "196000000 pixels" in outcomes["bomb14k.png"]
    assert max(result["seconds"] for result in measured["results"].values()) < 5
    assert measured["peak_rss_mb"] < 300


def test_pixel_limit_is_checked_from_the_header_for_every_kind_of_input(tmp_path: Path) -> None:
    image = Image.new("RGB", (200, 100))
    image.save(tmp_path / "a.gif")
    image.save(tmp_path / "a.tiff")
    sources = [tmp_path / "a.gif", (tmp_path / "a.tiff").read_bytes(), image, np.zeros((100, 200, 3), np.uint8)]
    for source in sources:
        with pytest.raises(ImageTooLarge, match=r"200×100 = 20000 pixels, more than the limit of 19999"):
            load_rgb(source, "input", max_pixels=19999)
        assert load_rgb(source, "input", max_pixels=20000).size == (200, 100)


def test_pass_order_rule_matches_pillows_own_resize() -> None:
    """resize.py decides Pillow's pass order from the sizes alone; Pillow's full resize is the truth."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        width, height, new_width, new_height = (int(v) for v in rng.integers(2, 160, 4))
        if new_width == width or new_height == height:
            continue
        noise = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        full = noise.resize((new_width, new_height), Image.Resampling.BICUBIC, reducing_gap=None).tobytes()
        first = (width, new_height) if vertical_first((width, height), (new_width, new_height)) else (new_width, height)
        two = noise.resize(first, Image.Resampling.BICUBIC, reducing_gap=None).resize(
            (new_width, new_height), Image.Resampling.BICUBIC, reducing_gap=None
        )
        assert two.tobytes() == full, (width, height, new_width, new_height)
        checked += 1
    assert checked > 200


def test_symlinked_folders_and_files_are_followed_and_broken_links_reported(tmp_path: Path) -> None:
    root, extra = tmp_path / "images", tmp_path / "x"
    for name, count in (("a", 6), ("b", 8)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (40, 40), (40 * i, 20, 200)).save(root / name / f"{i}.png")
    extra.mkdir()
    for i in range(10):
        Image.new("RGB", (40, 40), (10, 10 * i, 0)).save(extra / f"more{i}.png")
    (root / "a" / "more").symlink_to(extra, target_is_directory=True)
    (root / "b" / "linked.png").symlink_to(extra / "more0.png")
    (root / "b" / "broken.png").symlink_to(tmp_path / "gone.png")
    (root / "a" / "loop").symlink_to(root / "a", target_is_directory=True)  # must not walk forever

    assert len(candidate_files(root / "a")) == 16  # as torchvision's ImageFolder counts
    dataset = data.run(DataConfig(path=root, val_split=0.2, test_split=0.2), PRE, seed=0)
    assert sum(len(dataset.split(s).labels) for s in data.SPLITS) == 16 + 9
    assert [(Path(s.path).name, s.reason.endswith("is a broken symbolic link")) for s in dataset.skipped] == [
        ("broken.png", True)
    ]


def test_predict_walks_symlinks_reports_broken_ones_and_refuses_empty_folders(bundle: Path, tmp_path: Path) -> None:
    folder, elsewhere, empty = tmp_path / "photos", tmp_path / "elsewhere", tmp_path / "empty"
    for path in (folder, elsewhere, empty):
        path.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(elsewhere / "blue.png")
    (folder / "more").symlink_to(elsewhere, target_is_directory=True)
    (folder / "dead.png").symlink_to(tmp_path / "nowhere.png")
    done = edgetl("predict", str(bundle), str(folder), "--json")
    printed = json.loads(done.stdout)
    assert done.returncode == 2
    assert sorted(Path(p["path"]).name for p in printed["predictions"]) == ["blue.png", "red.png"]
    assert [(Path(e["path"]).name, "broken symbolic link" in e["error"]) for e in printed["errors"]] == [
        ("dead.png", True)
    ]
    refused = edgetl("predict", str(bundle), str(empty))
    assert refused.returncode == 2 and f"folder {empty} has no files to classify" in refused.stderr


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros((0, 0, 3), np.uint8), r"is empty \(0×0 pixels\)"),
        (np.zeros((8, 8, 2), np.uint8), r"got shape \(8, 8, 2\)"),
        (np.zeros((1, 8, 8, 3), np.uint8), r"got shape \(1, 8, 8, 3\)"),
        (np.array([[None]]), r"must hold numbers .* got object"),
        (np.full((4, 4), np.nan), r"NaN or infinite"),
        (np.full((4, 4), 3.5), r"values from 3.5 to 3.5, which is not an unambiguous pixel range"),
        (np.full((4, 4), -3, np.int16), r"values from -3 to -3"),
    ],
)
def test_bad_arrays_raise_image_decode_error_with_a_reason(bundle: Path, array: np.ndarray, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason):
        Predictor.load(bundle).predict(array)


def test_paths_that_are_not_regular_files_are_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "camera.jpg"
    os.mkfifo(fifo)  # opening it for reading would block forever
    (tmp_path / "folder.jpg").mkdir()
    cases = {
        fifo: "is not a regular file",
        tmp_path / "folder.jpg": "is a folder",
        tmp_path / "no.jpg": "does not exist",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageDecodeError, match=reason):
            load_rgb(path)


def test_bench_validates_its_arguments(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    missing = edgetl("bench", str(bundle), "--image", str(tmp_path / "nope.jpg"))
    assert missing.returncode == 2 and "nope.jpg does not exist" in missing.stderr and "Traceback" not in missing.stderr
    text = edgetl("bench", str(bundle), "--image", str(tmp_path / "notes.txt"))
    assert text.returncode == 2 and "notes.txt is not an image file" in text.stderr
    zero = edgetl("bench", str(bundle), "--batch", "0")
    assert zero.returncode == 2 and "--batch: must be an integer ≥ 1; got '0'" in zero.stderr


def test_high_bit_depth_and_float_images_convert_by_their_value_range(tmp_path: Path) -> None:
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "unit.tif")  # mode F, a spectrogram-like 0..1 image
    Image.fromarray((ramp * 255).round().astype(np.int32)).save(tmp_path / "eight.tif")  # mode I, 8-bit values
    Image.fromarray((ramp * 65535).round().astype(">u2")).save(tmp_path / "big_endian.tif")  # I;16B
    expected = (ramp * 255).round().astype(np.uint8)
    for name in ("unit.tif", "eight.tif", "big_endian.tif"):
        assert np.array_equal(np.asarray(load_rgb(tmp_path / name))[:, :, 0], expected), name
    Image.fromarray(ramp * 40 - 40).save(tmp_path / "decibels.tif")
    with pytest.raises(ImageDecodeError, match=r"decibels.tif has mode F values from -40 to 0.*rescale it"):
        load_rgb(tmp_path / "decibels.tif")


def test_the_build_decodes_odd_images_as_the_device_does(bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(5):
            values = np.random.default_rng(i).random((40, 40), dtype=np.float32) * (0.5 if name == "a" else 1.0)
            Image.fromarray(values).save(root / name / f"{i}.tif")
    dataset = data.run(DataConfig(path=root, val_split=0.2, test_split=0.2), PRE, seed=0)
    predictor = Predictor.load(bundle)
    for split in data.SPLITS:
        for crop, source in zip(dataset.split(split).images, dataset.split(split).sources):
            assert np.array_equal(crop, preprocess_uint8(source, PRE)) and np.array_equal(
                predictor.crop(source).shape, (32, 32, 3)
            )


def test_library_warnings_are_logged_once_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    saved = warnings.showwarning
    try:
        route_warnings(logging.getLogger("edgetl.warnings"))
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            for tag in (282, 283, 296):
                warnings.warn(
                    f"Metadata Warning, tag {tag} had too many entries", UserWarning, stacklevel=1
                )  # one kind
            warnings.warn("Corrupt EXIF data", RuntimeWarning, stacklevel=1)
    finally:
        warnings.showwarning = saved
    lines = [r.getMessage() for r in caplog.records if r.name == "edgetl.warnings"]
    assert (
        len(lines) == 2
        and lines[0].startswith("UserWarning: Metadata Warning, tag 282")
        and "RuntimeWarning" in lines[1]
    )


def test_class_names_with_emoji_chart_without_warnings() -> None:
    from edgetl.report_charts import confusion_svg

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        svg = confusion_svg([[3, 1], [0, 4]], ["cat 🐱", "dog 🐶"])
    assert "cat 🐱" in svg and not [w for w in caught if "Glyph" in str(w.message)]


def test_server_survives_hostile_uploads_and_returns_to_its_idle_memory(bundle: Path, tmp_path: Path) -> None:
    """Three concurrent hostile uploads, then 100 normal requests: every normal one answered, RSS
    back within 50 MB of what it was before (it once kept 1-2 GB)."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "edgetl", "serve", str(bundle), "--port", str(port)], stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(url)
        hostile = []
        for name, (mode, size) in {
            "tall.png": ("L", (1, 20000)),
            "bomb.png": ("L", (12000, 12000)),
            "wide.png": ("L", (65000, 2)),
        }.items():
            Image.new(mode, size).save(tmp_path / name)
            hostile.append((tmp_path / name).read_bytes())
        normal = tmp_path / "red.png"
        Image.new("RGB", (64, 48), (255, 0, 0)).save(normal)
        _post(url, normal.read_bytes())  # warm: the idle RSS includes one prediction's buffers
        before = _rss_mb(server.pid)
        with ThreadPoolExecutor(3) as pool:
            statuses = list(pool.map(lambda body: _post(url, body)[0], hostile))
        assert statuses == [200, 413, 200]
        answers = [_post(url, normal.read_bytes()) for _ in range(100)]
        assert all(status == 200 and body["label"] == "red" for status, body in answers)
        assert _rss_mb(server.pid) - before < 50
    finally:
        server.terminate()
        server.wait(timeout=30)


def edgetl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgetl", *args], capture_output=True, text=True, timeout=120)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url + "/predict", data=body, method="POST", headers={"Content-Type": "application/octet-stream"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _wait_until_up(url: str) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("edgetl serve did not come up within 60 s")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
