"""What the trainable part of the model eats: uint8 images, or the frozen prefix's outputs computed once.

Whatever is frozen runs once per image, not once per epoch: `linear_probe` caches the pooled
features and trains the head in seconds; `partial` without augmentation caches the frozen
prefix's output. Both go to the disk cache (`edgetl.datacache`), keyed by the images' cache key,
the prefix's weights and where it stops, so a rebuild with the same data and backbone reuses them.
Training batches come through a `torch.utils.data.DataLoader` that reads each batch of the
trainer's epoch order from disk (in worker processes when there are cores to spare).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgetl import datacache
from edgetl.cache import key
from edgetl.data import Dataset, images_fingerprint
from edgetl.datacache import DiskArray, ShardWriter
from edgetl.errors import RecipeError
from edgetl.infer import in_batches
from edgetl.models import TransferModel
from edgetl.recipe import TrainConfig
from edgetl.runtime.preprocess import Preprocessing, normalize, normalize_terms

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | DiskArray


@dataclass(frozen=True)
class Inputs:
    """The three splits as the trainable stages take them, and how to turn a slice into a model input."""

    train: ArrayLike  # uint8 (N, S, S, 3) images (or (N, F, F, 3) train frames), or float32 cached activations
    val: ArrayLike
    test: ArrayLike
    start: int  # the first stage to run on them
    cached: bool
    pre: Preprocessing
    root: Path  # the disk cache

    def model_input(self, batch: np.ndarray | torch.Tensor, augmenter=None, normalized: bool = True) -> torch.Tensor:
        """A slice of one split (or of target images prepared alike) as the model input, in channels_last.
        `normalized` False: images stay uint8 (N, 3, S, S), for `on_device` to normalize where the model runs."""
        batch = torch.as_tensor(batch)
        if self.cached:  # 4-D activations are stored (N, H, W, C): the NCHW view is channels_last as it is
            return batch.permute(0, 3, 1, 2) if batch.dim() == 4 else batch
        images = batch.permute(0, 3, 1, 2)  # (N, 3, S, S) uint8
        if augmenter is not None:
            images = torch.stack([augmenter(image) for image in images])
        if not normalized:
            return images.contiguous(memory_format=torch.channels_last)
        floats = normalize(images.permute(0, 2, 3, 1).numpy(), self.pre)
        return torch.from_numpy(floats).contiguous(memory_format=torch.channels_last)

    def on_device(self, x: torch.Tensor) -> torch.Tensor:
        """A model input from `model_input(..., normalized=False)`, normalized on its device with `normalize`'s
        float32 terms (within 1e-6 of it); any other input as it is."""
        if x.dtype != torch.uint8:
            return x
        scale, shift = _normalize_terms_on(self.pre, x.device)
        return x.float() * scale + shift

    def prepare(self, model: TransferModel, images: ArrayLike, name: str) -> ArrayLike:
        """More images (DANN's target domain) in the form of the splits: cached like them, or as they are."""
        return prepare_split(model, images, self.pre, self.start, name, self.root) if self.cached else images


@functools.lru_cache(maxsize=8)
def _normalize_terms_on(pre: Preprocessing, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`normalize`'s terms as (1, 3, 1, 1) tensors on `device`, made once: a copy from pageable host memory
    on every step would make the host wait for the GPU's queue."""
    scale, shift = (torch.from_numpy(t).to(device).view(1, 3, 1, 1) for t in normalize_terms(pre))
    return scale, shift


class TrainBatches(torch.utils.data.Dataset):
    """The train split as a DataLoader dataset whose items are whole batches: `[index]`, a (B,) tensor of
    positions, reads those rows from disk and gives (model input, index)."""

    def __init__(self, inputs: Inputs, augmenter=None, normalized: bool = True) -> None:
        self.inputs, self.augmenter, self.normalized = inputs, augmenter, normalized

    def __len__(self) -> int:
        return len(self.inputs.train)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs.model_input(self.inputs.train[index.numpy()], self.augmenter, self.normalized), index


def train_loader(
    inputs: Inputs, augmenter, batches: Sequence[torch.Tensor], workers: int | None, pin_memory: bool, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's (model input, index) batches, in the trainer's order, read, augmented and normalized by a
    `torch.utils.data.DataLoader` with `workers` processes (None: `default_workers()`; 0: in this process),
    `pin_memory` for a CUDA device. For a CUDA device, image batches stay uint8 until `Inputs.on_device`
    normalizes them there: a quarter of float32's bytes through the workers' shared memory, the pinned
    copies and the host-to-device copy.

    A new loader per epoch, not persistent workers: each epoch's workers are seeded from `seed`
    (the run's seed and the epoch), so `--resume` augments as an uninterrupted run does. The
    loader's own generator leaves torch's global one alone: with 0 workers, augmentation and
    dropout draw from it exactly as the loop did before the DataLoader.
    """
    workers = default_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(
        TrainBatches(inputs, augmenter, normalized=not pin_memory),
        sampler=batches,
        batch_size=None,  # the sampler's items are whole batches: one disk read per batch
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(seed),
    )
    with _sigchld_restored():
        yield from loader


@contextmanager
def _sigchld_restored() -> Iterator[None]:
    """Put back the SIGCHLD handler that a DataLoader with workers installs in this process and never removes.

    With PyTorch's handler left in place, a subprocess that ended later in the build (the PyTorch
    latency probe during validation) crashed the build with a corrupted heap (SIGSEGV in malloc,
    torch 2.14.1; reproduced with a plain DataLoader). The loader still notices a dead worker
    through its queue timeouts. Signal handlers can only be set from the main thread (a sweep
    trial runs in another, and PyTorch then installs none).
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGCHLD) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGCHLD, previous)


def default_workers(processes: int = 1) -> int:
    """Each of `processes` training processes' share of the cores beyond two, at most 8: on a 2-core machine a
    worker would take a core from the model's threads."""
    return max(0, min(8, (os.cpu_count() or 1) // processes - 2))


def caches_inputs(config: TrainConfig, augment: str) -> bool:
    """Whether training runs on cached frozen-prefix outputs (fixed inputs: teacher logits can be cached too)."""
    return config.strategy == "linear_probe" or (config.strategy == "partial" and augment == "none")


def augments_images(config: TrainConfig, augment: str) -> bool:
    """Whether training augments images, and so reads the train split's larger frames."""
    return augment != "none" and not caches_inputs(config, augment)


def frozen_stage_count(model: TransferModel, config: TrainConfig) -> int:
    """How many leading stages (stem, blocks, neck) the strategy freezes. Raises RecipeError for a too-large
    `train.unfreeze`."""
    stage_count = len(model.stages)  # stem + blocks + neck
    if config.strategy == "linear_probe":
        return stage_count
    if config.strategy == "finetune":
        return 0
    if config.unfreeze > model.num_blocks:
        raise RecipeError(
            f"`train.unfreeze` is {config.unfreeze}, but this backbone has {model.num_blocks} stages; "
            f"use 1..{model.num_blocks}, or strategy finetune to train everything."
        )
    return 1 + model.num_blocks - config.unfreeze


def prepare_inputs(
    model: TransferModel,
    dataset: Dataset,
    pre: Preprocessing,
    stop: int | None,
    root: Path,
    augment: bool,
    gather: Callable | None = None,
) -> Inputs:
    """The splits as images (`stop` None; the train frames when `augment` and the split has them), or as the
    outputs of the model's first `stop` stages, cached on disk under `root`.

    `gather(compute, images)` spreads the frozen prefix's work under torchrun: each rank computes (and caches)
    a share of the images and every rank gets all the outputs, in memory (`edgetl.train.distributed.gather_rows`).
    """
    splits = [dataset.train, dataset.val, dataset.test]
    if stop is None:
        train = dataset.train.frames if augment and dataset.train.frames is not None else dataset.train.images
        return Inputs(train, dataset.val.images, dataset.test.images, start=0, cached=False, pre=pre, root=root)

    def outputs(images: ArrayLike, name: str) -> ArrayLike:
        if gather is None:
            return prepare_split(model, images, pre, stop, name, root)
        return gather(lambda part: torch.from_numpy(prepare_split(model, part, pre, stop, name, root)[:]), images)

    cached = [outputs(split.images, name) for split, name in zip(splits, SPLIT_NAMES)]
    return Inputs(*cached, start=stop, cached=True, pre=pre, root=root)


SPLIT_NAMES = ("train", "val", "test")


def prepare_split(
    model: TransferModel, images: ArrayLike, pre: Preprocessing, stop: int, name: str, root: Path
) -> DiskArray:
    """The frozen prefix's outputs for uint8 images, computed once on the model's device: on disk under `root`,
    keyed by the images, the prefix's weights and `stop`. 4-D activations are stored channels-last, (N, H, W, C),
    so that training reads them as the channels_last model input without a copy per batch."""
    model.eval()
    device = next(model.parameters()).device

    def prefix(batch: np.ndarray) -> torch.Tensor:
        out = model.features(torch.from_numpy(normalize(batch, pre)).to(device), 0, stop).cpu()
        return out.permute(0, 2, 3, 1) if out.dim() == 4 else out

    # the device is in the key: a GPU's convolutions (TF32, other kernels) are not the CPU FP32 reference
    weights = module_digest(model.stages[:stop])
    folder = root / "features" / key(images_fingerprint(images), weights, stop, device.type, "nhwc")
    return cached_outputs(prefix, images, folder, f"frozen features {name}")


def cached_outputs(run: Callable[[np.ndarray], torch.Tensor], images: ArrayLike, folder: Path, what: str) -> DiskArray:
    """`run`'s float32 outputs over `images` in eval batches, from the disk cache entry `folder` (made on a miss).

    Raises OutputError when the cache folder cannot be written.
    """

    def build(staging: Path) -> tuple[dict, list[ShardWriter]]:
        writer: list[ShardWriter] = []

        def write(batch: np.ndarray) -> None:
            out = run(batch).float().numpy()
            if not writer:
                writer.append(ShardWriter(staging, "outputs", out.shape[1:], np.float32))
            writer[0].append(out)

        in_batches(write, images, description=what)
        return {"count": len(images)}, writer

    entry = datacache.load_or_build(folder, build)
    if entry.reused:
        log.info("%s: reused %s", what, folder)
    return entry.arrays["outputs"]


def module_digest(module: torch.nn.Module) -> str:
    """A short hash of a module's weights and buffers (names and values): what cached outputs depend on."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def augmenter(augment: str, size: int):
    """The train-time augmentation of `data.augment` for `size`-pixel crops; None for `none`.

    It crops the train frames (the whole center square at the resize size, `edgetl.data`): 60-100%
    of the frame's area, so a crop reaches beyond the eval crop (77% of the frame at crop_pct 0.875)
    while its mean area (80%) keeps objects near the scale the eval crop shows them at."""
    if augment == "none":
        return None
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if augment == "strong":
        steps.append(v2.TrivialAugmentWide())
    return v2.Compose(steps)
