"""The device runtime: torch-free commands, the Predictor API, and bundles that must be refused."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl.errors import BundleError
from edgetl.runtime.bundle import open_bundle
from edgetl.runtime.predictor import Predictor
from tests.tiny_bundle import write_tiny_bundle

NO_TORCH = """
import sys
for name in ("torch", "torchvision", "timm", "nncf"):
    sys.modules[name] = None  # `import torch` now raises ImportError
from edgetl.cli import main
code = main(sys.argv[1:])
assert not any(m in sys.modules and sys.modules[m] is not None for m in ("torch", "torchvision", "timm", "nncf"))
sys.exit(code)
"""


def no_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return write_tiny_bundle(tmp_path / "bundle")


def colour_images(folder: Path) -> Path:
    folder.mkdir()
    Image.new("RGB", (50, 40), (220, 10, 10)).save(folder / "red.jpg")
    Image.new("RGB", (64, 64), (10, 200, 10)).convert("P").save(folder / "green.png")
    Image.new("L", (30, 30), 0).save(folder / "dark.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_info_and_bench_run_with_torch_unimportable(bundle: Path, tmp_path: Path) -> None:
    images = colour_images(tmp_path / "images")
    done = no_torch("predict", str(bundle), str(images), "--json", "--top-k", "2")
    assert done.returncode == 2, done.stderr  # one unreadable file: reported, skipped, non-zero
    result = json.loads(done.stdout)
    labels = {Path(p["path"]).name: p["label"] for p in result["predictions"]}
    assert labels["red.jpg"] == "red" and labels["green.png"] == "green" and len(result["predictions"][0]["top_k"]) == 2
    assert [Path(e["path"]).name for e in result["errors"]] == ["notes.txt"] and "notes.txt" in done.stderr

    one = no_torch("predict", str(bundle), str(images / "red.jpg"))
    assert one.returncode == 0 and one.stdout.split("\t")[1].startswith("red ")

    info = no_torch("info", str(bundle))
    assert info.returncode == 0 and "labels (3): red, green, blue" in info.stdout and "sha256" in info.stdout

    bench = no_torch("bench", str(bundle), "--runs", "10", "--batch", "4", "--json")
    assert bench.returncode == 0, bench.stderr
    figures = json.loads(bench.stdout)
    assert (
        figures["latency_ms"]["end_to_end"]["p50"] >= figures["latency_ms"]["model"]["p50"] > 0
        and figures["throughput_ips"] > 0
    )


def test_predictor_takes_paths_bytes_pil_images_and_arrays(bundle: Path, tmp_path: Path) -> None:
    predictor = Predictor.load(bundle)
    red = Image.new("RGB", (40, 40), (250, 0, 0))
    red.save(tmp_path / "red.png")
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (0, 0, 250)).save(buffer, "PNG")
    green = np.zeros((20, 30, 3), np.uint8)
    green[..., 1] = 240
    assert predictor.predict(tmp_path / "red.png").label == "red"
    assert predictor.predict(str(tmp_path / "red.png")).label == "red"
    assert predictor.predict(buffer.getvalue()).label == "blue"
    assert predictor.predict(green).label == "green"
    batch = predictor.predict_batch([red, green], top_k=3)
    assert [p.label for p in batch] == ["red", "green"]
    assert batch[0].scores == sorted(batch[0].scores, reverse=True) and sum(batch[0].scores) == pytest.approx(1.0)
    assert Predictor.load(bundle, runtime="openvino").predict(red).label == "red"  # OpenVINO reads the ONNX model too


def test_a_tar_bundle_is_unpacked_and_checked(bundle: Path, tmp_path: Path) -> None:
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in bundle.iterdir():
            tar.add(path, arcname=f"tiny/{path.name}")
    assert Predictor.load(archive).predict(np.full((8, 8, 3), (0, 0, 255), np.uint8)).label == "blue"


def test_a_tampered_or_incomplete_bundle_is_refused_naming_the_file(bundle: Path) -> None:
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx does not match the sha256"):
        Predictor.load(bundle)
    (bundle / "README.md").unlink()
    with pytest.raises(BundleError, match=r"README\.md is missing"):
        Predictor.load(bundle)
    (bundle / "edgetl.json").unlink()
    with pytest.raises(BundleError, match="edgetl.json is missing"):
        Predictor.load(bundle)


def test_a_bundle_built_with_another_pillow_major_version_warns(bundle: Path) -> None:
    manifest = json.loads((bundle / "edgetl.json").read_text())
    manifest["versions"] = {"pillow": metadata.version("pillow")}
    (bundle / "edgetl.json").write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same version: silent
        Predictor.load(bundle)
    manifest["versions"] = {"pillow": "9.5.0"}
    (bundle / "edgetl.json").write_text(json.dumps(manifest))
    with pytest.warns(RuntimeWarning, match=r"validated with Pillow 9\.5\.0.*pip install 'pillow==9\.5\.0'"):
        Predictor.load(bundle)


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "hardlink"])
def test_unsafe_archive_members_are_refused_before_anything_is_written(bundle: Path, tmp_path: Path, kind: str) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in bundle.iterdir():
            tar.add(path, arcname=f"tiny/{path.name}")
        member = tarfile.TarInfo(
            {"parent": "tiny/../../escape.txt", "absolute": "/tmp/escape.txt"}.get(kind, "tiny/link")
        )
        if kind == "symlink":
            member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            member.type, member.linkname = tarfile.LNKTYPE, "tiny/model.onnx"
        payload = b"x"
        member.size = len(payload) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    target = tmp_path / "unpacked"
    with pytest.raises(BundleError, match="refusing archive member"):
        open_bundle(archive, target)
    assert not target.exists() and not (tmp_path / "escape.txt").exists()
