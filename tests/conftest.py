"""Tiny real data for tests: crops of sklearn's bundled photos, and its digits."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's disk cache (decoded images, features, logits) in its own tmp folder, never ~/.cache;
    builds in subprocesses inherit it."""
    cache = tmp_path / "edgetl-cache"
    monkeypatch.setenv("EDGETL_CACHE_DIR", str(cache))
    return cache


def photo_crops(count: int, size: int = 48, seed: int = 0) -> dict[str, list[Image.Image]]:
    """`count` random crops per class of the two bundled photos (a palace and a flower)."""
    rng = np.random.default_rng(seed)
    crops: dict[str, list[Image.Image]] = {}
    for name, photo in zip(("china", "flower"), load_sample_images().images):
        height, width = photo.shape[:2]
        crops[name] = []
        for _ in range(count):
            side = int(rng.integers(120, 240))
            top, left = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
            crops[name].append(Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size)))
    return crops


def write_folder(root: Path, count: int = 12, size: int = 48, seed: int = 0) -> Path:
    """<root>/<class>/<i>.jpg (and some .png) from `photo_crops`."""
    for name, images in photo_crops(count, size, seed).items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(root / name / (f"{i:03d}.png" if i % 3 == 0 else f"{i:03d}.jpg"))
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "images")


def build_cli(recipe: Path, run: Path) -> subprocess.CompletedProcess:
    """`edgetl build RECIPE -o RUN` in a fresh interpreter, as a user runs it; its exit code and output."""
    args = [sys.executable, "-m", "edgetl", "build", str(recipe), "-o", str(run)]
    return subprocess.run(args, capture_output=True, text=True)


def write_recipe(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def tiny_recipe(tmp_path: Path, image_folder: Path) -> Path:
    """A fast real build: two photo classes, pretrained lite0 at 32 px, linear probe,
    exported and validated in FP32 only (the quantization tests add their variants)."""
    return write_recipe(
        tmp_path / "recipe.yaml",
        f"""
        name: tiny
        seed: 0
        data:
          path: {image_folder}
          val_split: 0.2
          test_split: 0.2
          image_size: 32
          augment: none
        model:
          backbone: efficientnet_lite0
        train:
          strategy: linear_probe
          epochs: 5
          batch_size: 8
          lr: 0.01
        quantize: []
        measure:
          latency_rounds: 2
          latency_runs: 3
          warmup: 2
          throughput_batch: 4
        """,
    )
