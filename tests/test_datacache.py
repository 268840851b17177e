"""The decode-once cache on disk: reuse across builds and processes, refusal of damaged shards, train frames."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgetl import data, datacache, models
from edgetl.errors import OutputError
from edgetl.models import REGISTRY
from edgetl.pipeline import train_model
from edgetl.recipe import DataConfig, TrainConfig, load_recipe
from edgetl.runtime.preprocess import normalize
from edgetl.train.inputs import Inputs, prepare_split, train_loader

PRE = REGISTRY.get("efficientnet_lite0").preprocessing(32)


def config(root: Path, cache: Path, **extra) -> DataConfig:
    return DataConfig(path=root, val_split=0.2, test_split=0.2, cache_dir=cache, **extra)


def pixels(ds: data.Dataset) -> list[np.ndarray]:
    return [np.asarray(ds.split(s).images) for s in data.SPLITS]


def test_a_second_load_reuses_the_disk_cache_and_decodes_nothing(image_folder: Path, tmp_path: Path, caplog) -> None:
    cache = tmp_path / "cache"
    first = data.run(config(image_folder, cache), PRE, seed=0)
    assert first.decoded == 24 and isinstance(first.train.images, datacache.DiskArray)
    with caplog.at_level(logging.INFO, logger="edgetl.data"):
        again = data.run(config(image_folder, cache), PRE, seed=0)
    assert again.decoded == 0
    assert sum("reused" in r.getMessage() and "decoded none" in r.getMessage() for r in caplog.records) == 3
    assert again.content_hash == first.content_hash
    assert all(np.array_equal(a, b) for a, b in zip(pixels(first), pixels(again)))
    assert all(np.array_equal(first.split(s).labels, again.split(s).labels) for s in data.SPLITS)


def test_the_cache_key_is_the_files_bytes_so_an_edited_image_redecodes_its_split_only(
    image_folder: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = data.run(config(image_folder, cache), PRE, seed=0)
    edited = Path(first.test.sources[0])
    Image.new("RGB", (48, 48), (255, 0, 0)).save(edited)  # same name, same size on disk or not: new bytes
    again = data.run(config(image_folder, cache), PRE, seed=0)
    assert again.test.key != first.test.key and again.train.key == first.train.key
    assert again.decoded == len(first.test.labels)
    assert again.content_hash != first.content_hash
    red = np.full((32, 32, 3), (255, 0, 0))
    assert np.abs(again.test.images[0].astype(int) - red).max() <= 2  # JPEG's rounding


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_shard_is_refused_with_a_line_naming_it_and_rebuilt(
    image_folder: Path, tmp_path: Path, caplog, damage: str
) -> None:
    cache = tmp_path / "cache"
    first = data.run(config(image_folder, cache), PRE, seed=0)
    shard = first.train.images.files[0]
    assert data.run(config(image_folder, cache), PRE, seed=0).decoded == 0  # checked in full once: stamped
    before = shard.stat()
    raw = bytearray(shard.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw = raw[: len(raw) - 100]
    shard.write_bytes(bytes(raw))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime put back: the write still shows in ctime
    with caplog.at_level(logging.WARNING, logger="edgetl.datacache"):
        again = data.run(config(image_folder, cache), PRE, seed=0)
    refusals = [r.getMessage() for r in caplog.records if r.name == "edgetl.datacache"]
    assert len(refusals) == 1 and str(shard) in refusals[0] and "refused and built again" in refusals[0]
    assert ("corrupt: CRC-32" if damage == "flip" else "truncated") in refusals[0]
    assert again.decoded == len(first.train.labels)  # the train split, decoded again
    assert np.array_equal(np.asarray(again.train.images), np.asarray(first.train.images))
    assert data.run(config(image_folder, cache), PRE, seed=0).decoded == 0  # and intact from then on


def test_a_new_entry_is_not_read_back_and_a_shard_touched_later_is_read_in_full(tmp_path: Path, monkeypatch) -> None:
    rows, crcs = np.arange(40, dtype=np.float32).reshape(10, 4), []

    def build(staging: Path):
        writer = datacache.ShardWriter(staging, "rows", (4,), np.float32)
        writer.append(rows)
        real = datacache.zlib.crc32
        monkeypatch.setattr(datacache.zlib, "crc32", lambda *args: crcs.append(1) or real(*args))  # reads from here
        return {"count": 10}, [writer]

    entry = datacache.load_or_build(tmp_path / "entry", build)
    assert not entry.reused and np.array_equal(np.asarray(entry.arrays["rows"]), rows)
    assert crcs == []  # its CRC-32 came from the bytes as written: nothing read back
    assert datacache.load_or_build(tmp_path / "entry", build).reused and crcs == []
    os.utime(entry.arrays["rows"].files[0])  # a touch changes the ctime: the next load reads the shard again
    again = datacache.load_or_build(tmp_path / "entry", build)
    assert again.reused and crcs and np.array_equal(np.asarray(again.arrays["rows"]), rows)


def test_a_failed_decode_leaves_no_entry_that_looks_complete(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "china" / "broken.jpg").write_bytes(b"not an image")
    cache = tmp_path / "cache"
    with pytest.raises(data.DataError, match="broken.jpg"):
        data.run(config(image_folder, cache, on_bad_image="error"), PRE, seed=0)
    entries = [p for p in (cache / "decoded").iterdir() if p.is_dir()]
    assert all((entry / "index.json").is_file() for entry in entries)  # the failed split left nothing behind
    assert not any(p.name.endswith(".tmp") for p in (cache / "decoded").iterdir())
    skipped = data.run(config(image_folder, cache), PRE, seed=0)  # skip mode decodes and records the bad file
    assert [Path(s.path).name for s in skipped.skipped] == ["broken.jpg"]
    with pytest.raises(data.DataError, match="broken.jpg"):  # a reused entry still fails in error mode
        data.run(config(image_folder, cache, on_bad_image="error"), PRE, seed=0)


def test_a_cache_dir_that_cannot_be_written_is_an_error_naming_the_field(image_folder: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match=r"data cache .*a-file.*`data.cache_dir`"):
        data.run(config(image_folder, blocker / "cache"), PRE, seed=0)


_LOAD = """
import json, sys
from pathlib import Path
from edgetl import data
from edgetl.models import REGISTRY
from edgetl.recipe import DataConfig
pre = REGISTRY.get("efficientnet_lite0").preprocessing(32)
cfg = DataConfig(path=Path(sys.argv[1]), val_split=0.2, test_split=0.2, cache_dir=Path(sys.argv[2]))
ds = data.run(cfg, pre, seed=0, frames=True)
print(json.dumps({"decoded": ds.decoded, "hash": ds.content_hash}))
"""


def test_two_processes_filling_the_same_cache_decode_each_image_once(image_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen([sys.executable, "-c", _LOAD, str(image_folder), str(cache)], stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    # per split, one process decodes while the other waits for its lock, then reuses what it wrote
    assert sum(o["decoded"] for o in outs) == 24 and outs[0]["hash"] == outs[1]["hash"]


def test_disk_arrays_index_like_numpy_arrays_and_travel_to_other_processes(tmp_path: Path) -> None:
    rows = np.arange(7 * 2 * 3, dtype=np.float32).reshape(7, 2, 3)

    def build(staging: Path):
        writer = datacache.ShardWriter(staging, "rows", (2, 3), np.float32)
        writer.rows_per_file = 3  # three shards: reads cross shard boundaries
        writer.append(rows[:5])
        writer.append(rows[5:])
        return {}, [writer]

    array = datacache.load_or_build(tmp_path / "entry", build).arrays["rows"]
    assert len(array.files) == 3 and array.shape == (7, 2, 3)
    assert np.array_equal(array[-1], rows[-1]) and np.array_equal(array[2:6], rows[2:6])
    assert np.array_equal(array[::3], rows[::3]) and np.array_equal(np.asarray(array), rows)
    assert np.array_equal(array[np.array([6, 0, 4])], rows[[6, 0, 4]])
    assert np.array_equal(array[torch.tensor([5, 1])], rows[[5, 1]])
    assert np.array_equal(pickle.loads(pickle.dumps(array))[1:4], rows[1:4])
    assert np.array_equal(array[..., 1], rows[..., 1]) and np.array_equal(array[2:5, 0], rows[2:5, 0])
    assert np.array_equal(array[3, 1], rows[3, 1])
    with pytest.raises(IndexError):
        array[7]


def test_the_train_loader_gives_the_epoch_order_batches_alike_with_and_without_workers(
    image_folder: Path, tmp_path: Path
) -> None:
    ds = data.run(config(image_folder, tmp_path / "cache"), PRE, seed=0)
    inputs = Inputs(ds.train.images, ds.val.images, ds.test.images, 0, False, PRE, tmp_path)
    batches = list(torch.randperm(len(ds.train.labels), generator=torch.Generator().manual_seed(0)).split(5))
    handler = signal.getsignal(signal.SIGCHLD)
    inline = list(train_loader(inputs, None, batches, workers=0, pin_memory=False, seed=0))
    workers = list(train_loader(inputs, None, batches, workers=2, pin_memory=False, seed=0))
    # PyTorch's SIGCHLD handler, left behind, crashed later subprocess-heavy stages (the test_export run after this)
    assert signal.getsignal(signal.SIGCHLD) is handler
    assert [i.tolist() for _, i in inline] == [b.tolist() for b in batches] == [i.tolist() for _, i in workers]
    for (x, index), (y, _) in zip(inline, workers):
        assert x.shape == (len(index), 3, 32, 32) and torch.equal(x, y)
        expected = inputs.model_input(np.asarray(ds.train.images)[index.numpy()])
        assert torch.equal(x, expected)
    # For a CUDA device (pin_memory) the batches cross as uint8; the trainer normalizes them where the model runs
    with warnings.catch_warnings():  # without a GPU, PyTorch warns that it cannot pin
        warnings.simplefilter("ignore", UserWarning)
        pinned = list(train_loader(inputs, None, batches, workers=0, pin_memory=True, seed=0))
    for (raw, _), (x, _) in zip(pinned, inline):
        assert raw.dtype == torch.uint8 and raw.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(inputs.on_device(raw), x, rtol=0, atol=1e-6)


def test_cached_prefix_activations_are_stored_channels_last_and_continue_the_model_where_it_stopped(
    image_folder: Path, tmp_path: Path
) -> None:
    model = models.build(REGISTRY.get("efficientnet_lite0"), "pretrained", 2).eval()
    ds = data.run(config(image_folder, tmp_path / "cache"), PRE, seed=0)
    cached = prepare_split(model, ds.val.images, PRE, 4, "val", tmp_path / "cache")  # the partial strategy's
    with torch.no_grad():
        expected = model.features(torch.from_numpy(normalize(np.asarray(ds.val.images), PRE)), 0, 4)
    assert cached.shape == (expected.shape[0], *expected.shape[2:], expected.shape[1])  # (N, H, W, C) on disk
    inputs = Inputs(ds.train.images, cached, cached, 4, True, PRE, tmp_path)
    x = inputs.model_input(cached[:])
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


def test_augmenting_training_reads_train_frames_that_reach_beyond_the_eval_crop(
    image_folder: Path, tmp_path: Path
) -> None:
    from edgetl.train import augments_images

    frames = augments_images(TrainConfig(strategy="finetune"), "default")
    assert frames and not augments_images(TrainConfig(strategy="linear_probe"), "default")
    ds = data.run(config(image_folder, tmp_path / "cache"), PRE, seed=0, frames=frames)
    assert ds.train.frames.shape == (len(ds.train.labels), PRE.resize_size, PRE.resize_size, 3)
    assert ds.val.frames is None and ds.test.frames is None  # val and test: the contract crop only
    margin = (PRE.resize_size - PRE.input_size) // 2
    inner = ds.train.frames[:][:, margin : margin + PRE.input_size, margin : margin + PRE.input_size]
    # the eval crop is the frame's center (up to the resize's rounding at the crop edges)
    assert np.abs(inner.astype(int) - np.asarray(ds.train.images).astype(int)).mean() < 2.0
    assert data.run(config(image_folder, tmp_path / "cache"), PRE, seed=0).decoded == 0  # frames serve both


@pytest.mark.slow
def test_a_second_build_reuses_the_decoded_images_and_frozen_features_and_keeps_its_metrics(
    tiny_recipe: Path, tmp_path: Path, caplog
) -> None:
    recipe = load_recipe(tiny_recipe)
    first = train_model(recipe, tmp_path / "first")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgetl"):
        second = train_model(recipe, tmp_path / "second")  # another run folder: only the disk cache is shared
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("data ") and "reused" in m for m in messages) == 3
    assert any(", 0 decoded (" in m for m in messages)
    assert sum(m.startswith("frozen features") and "reused" in m for m in messages) == 3
    assert second["dataset"] == first["dataset"]
    assert second["test_accuracy"] == first["test_accuracy"]
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in first["history"]]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in second["history"]] == strip
