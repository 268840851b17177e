"""The processes of a `torchrun` launch: one build, trained by several processes with DDP.

Under `torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m edgetl build ...`
every process runs the same build up to the end of training (each on its device,
`edgetl.train.device`), with PyTorch's own machinery:

- `setup` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) and
  joins the process group: NCCL on CUDA, gloo otherwise, every collective bounded by
  `EDGETL_DIST_TIMEOUT` seconds, so a rank that hangs or dies ends the others, never a hang.
- The trainer wraps the trainable step in `DistributedDataParallel` (gradients all-reduced)
  and reads its batches from `shard`, DistributedSampler's split of the epoch's global order.
- `gather_rows` computes rows (frozen features, val/test logits) on one share per rank and
  gives every rank all of them, so every rank takes the same best-epoch and early-stopping
  decision.
- Rank 0 alone writes snapshots, stage folders and everything after training; the others
  keep their copies of the stage folders in a private temporary folder and end after training.

BatchNorm: on CUDA, trainable BatchNorm layers become `SyncBatchNorm`; PyTorch's SyncBatchNorm
runs on GPUs only, so on the CPU (gloo) each rank normalizes with its own batch's statistics,
and rank 0's running statistics are the ones kept: DDP broadcasts them before every step, and
`broadcast_buffers` after every epoch, before the ranks evaluate.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn

from edgetl.cache import StageCache
from edgetl.errors import DistributedError, RecipeError
from edgetl.train.device import resolve_device

log = logging.getLogger(__name__)

TIMEOUT_ENV = "EDGETL_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600  # a collective waits this long for the slowest rank (an epoch's val pass, say)


@dataclass(frozen=True)
class Dist:
    """This process's place in a `torchrun` launch; the defaults are a plain single-process build."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None  # nccl | gloo once the process group is up

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and runs everything after training."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors live: NCCL moves only CUDA tensors."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def from_env(environ: dict[str, str] | None = None) -> Dist:
    """The launch torchrun describes in `environ` (default os.environ); a single process without it.

    >>> from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}).is_main
    False
    """
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    return Dist(int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0")), local_world)


def setup(device_setting: str) -> Dist:
    """Join torchrun's process group when launched by it (NCCL for CUDA training, gloo otherwise).

    Raises RecipeError for a device that cannot serve every rank, DistributedError when the
    others do not join within the timeout.
    """
    dist = from_env()
    if not dist.enabled:
        return dist
    device = resolve_device(device_setting, dist.local_rank, launched=True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        try:
            torch_dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(
                f"could not join the process group ({_first_line(exc)}); "
                "check that every node runs the same torchrun command with the same --rdzv-endpoint."
            ) from exc
    dist = Dist(dist.rank, dist.world_size, dist.local_rank, dist.local_world_size, backend)
    log.info("distributed: rank %d of %d (%s, %s)", dist.rank, dist.world_size, backend, device)
    return dist


def shutdown(dist: Dist) -> None:
    """Leave the process group after a last barrier: rank 0 goes on alone to export and validate."""
    if dist.enabled and torch_dist.is_initialized():
        with peer_errors(dist):
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def timeout_seconds() -> int:
    """Seconds a collective may wait for the other ranks (`EDGETL_DIST_TIMEOUT`, default 600)."""
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    if not text.isdigit() or int(text) < 1:
        raise RecipeError(f"{TIMEOUT_ENV} must be a whole number of seconds ≥ 1; got {text!r}.")
    return int(text)


@contextlib.contextmanager
def peer_errors(dist: Dist) -> Iterator[None]:
    """Turn a collective's failure (a peer closed its connection, a timeout) into one clear DistributedError."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        if not dist.enabled or not (isinstance(exc, torch_dist.DistError) or _is_comm_failure(text)):
            raise
        raise DistributedError(
            f"lost the other training processes ({_first_line(exc)}): another rank died, or stalled for over "
            f"{timeout_seconds()} s ({TIMEOUT_ENV}). Its own log says why; "
            "fix that and relaunch the same torchrun command with --resume to continue from the last finished epoch."
        ) from exc


def _is_comm_failure(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in ("gloo", "nccl", "connection closed", "timed out"))


def _first_line(exc: BaseException) -> str:
    """The library's own words, without its source location or advice: "Connection reset by peer"."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)  # gloo's "[.../pair.cc:545] "
    return line.split(". ")[0].rstrip(".")[:300]


class TrainStep(nn.Module):
    """The trainable forward pass as one module, so DDP sees one forward per step and syncs every parameter
    that trains (the model's and the loss terms')."""

    def __init__(self, model: nn.Module, terms: list[nn.Module], start: int) -> None:
        super().__init__()
        self.model, self.terms, self.start = model, nn.ModuleList(terms), start

    def forward(self, x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features (B, F) of the whole batch, and logits (count, classes) of its first `count` rows (the
        labelled ones; DANN's target images follow them)."""
        features = self.model.features(x, self.start)
        return features, self.model.head(self.model.dropout(features[:count]))


def wrap(step: TrainStep, dist: Dist, device: torch.device) -> nn.Module:
    """`step` in DistributedDataParallel under torchrun (SyncBatchNorm on CUDA); as it is otherwise."""
    if not dist.enabled:
        return step
    if device.type == "cuda":
        step = nn.SyncBatchNorm.convert_sync_batchnorm(step)
    return nn.parallel.DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_buffers(module: nn.Module, dist: Dist) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP broadcasts them before each training
    forward, so after an epoch's last step every rank still holds its own: without this, each rank's share
    of the val logits would come from a model slightly different from the one rank 0 keeps."""
    if not dist.enabled:
        return
    with peer_errors(dist):
        for buffer in module.buffers():
            torch_dist.broadcast(buffer, src=0)


def threads_per_process(dist: Dist, requested: int | None) -> int:
    """`train.threads`, or this machine's cores shared by the processes on it."""
    return requested or max(1, (os.cpu_count() or 1) // dist.local_world_size)


def shard(order: torch.Tensor, dist: Dist) -> torch.Tensor:
    """This rank's part of an epoch's global index order, split as `DistributedSampler` splits it: padded
    (repeating its start) to a multiple of the world size, then every world_size-th index from the rank's.

    Batches of b consecutive indices of each rank's shard together make the global batch
    order[k·b·W : (k+1)·b·W], the batch one process with batch size b·W takes.

    >>> shard(torch.arange(5), Dist(1, 2)).tolist()
    [1, 3, 0]
    """
    if not dist.enabled:
        return order
    repeats = -(-dist.world_size // max(len(order), 1))  # ceil: pad even an order shorter than the world
    padded = torch.cat([order, order.repeat(repeats)[: -len(order) % dist.world_size]])
    return padded[dist.rank :: dist.world_size]


def rank_draw(high: int, count: int, generator: torch.Generator, dist: Dist) -> torch.Tensor:
    """This rank's `count` random integers in [0, high) (DANN's target-image picks), drawn from `generator`, the
    same stream on every rank: all ranks draw the global batch's `count × world_size` and each keeps its share,
    so the ranks pick different rows and the generator (which also orders the epochs) advances as it does in
    one process with the global batch.

    >>> rank_draw(10, 2, torch.Generator().manual_seed(0), Dist(1, 2)).shape
    torch.Size([2])
    """
    return shard(torch.randint(high, (count * dist.world_size,), generator=generator), dist)


def gather_rows(compute: Callable[[object], torch.Tensor], items, dist: Dist) -> torch.Tensor:
    """`compute(items)` with the work split: each rank computes a contiguous share of `items` and every rank
    gets all rows, in order (CPU tensor). Under one process, just `compute(items)`.

    Raises DistributedError when another rank is gone.
    """
    if not dist.enabled or len(items) < dist.world_size:
        return compute(items)
    bounds = [len(items) * r // dist.world_size for r in range(dist.world_size + 1)]
    part = compute(items[bounds[dist.rank] : bounds[dist.rank + 1]]).contiguous()  # (n_r, ...)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    padded = torch.zeros((longest, *part.shape[1:]), dtype=part.dtype, device=dist.comm_device)
    padded[: len(part)] = part.to(dist.comm_device)
    parts = [torch.empty_like(padded) for _ in range(dist.world_size)]
    with peer_errors(dist):
        torch_dist.all_gather(parts, padded)
    rows = [p[: b - a] for p, a, b in zip(parts, bounds, bounds[1:])]
    return torch.cat(rows).cpu()


def sum_across(values: list[float], dist: Dist) -> list[float]:
    """Element-wise sums of `values` over the ranks (the epoch's loss totals)."""
    if not dist.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=dist.comm_device)
    with peer_errors(dist):
        torch_dist.all_reduce(tensor)
    return tensor.tolist()


def from_main(value: object, dist: Dist) -> object:
    """Rank 0's `value` on every rank (its snapshot, its decision to reuse a stage)."""
    if not dist.enabled:
        return value
    box = [value]
    with peer_errors(dist):
        torch_dist.broadcast_object_list(box, src=0, device=dist.comm_device)
    return box[0]


def all_objects(value: object, dist: Dist) -> list[object]:
    """Every rank's `value`, by rank (each rank's random state, for the snapshot)."""
    if not dist.enabled:
        return [value]
    values: list[object] = [None] * dist.world_size
    with peer_errors(dist):
        torch_dist.all_gather_object(values, value)
    return values


class RankCache(StageCache):
    """The stage cache of a distributed build: rank 0's decision to reuse or build holds on every rank.

    Rank 0 keeps the run folder's stages; every other rank trains along (the collectives need
    it) into a private temporary folder, or receives the files of a stage rank 0 reused, so
    later stages (a student after its teacher) find the same files on every node.
    """

    def __init__(self, root: Path, force: bool, dist: Dist, shared: bool = False) -> None:
        self.dist = dist
        self.private = None if dist.is_main else Path(tempfile.mkdtemp(prefix=f"edgetl-rank{dist.rank}-"))
        super().__init__(root if dist.is_main else self.private, force, shared=shared and dist.is_main)

    def run(self, stage: str, stage_key: str, make: Callable[[Path], None], label: str | None = None) -> Path:
        if not self.dist.enabled:  # after training, rank 0 alone: a plain stage cache
            return super().run(stage, stage_key, make, label)
        final = self.root / f"{stage}-{stage_key}"
        reused = from_main(final.is_dir() and not self.force, self.dist)  # rank 0's folder decides
        if not reused:
            if not self.dist.is_main:
                shutil.rmtree(final, ignore_errors=True)  # train alongside rank 0, whatever this rank kept
            return super().run(stage, stage_key, make, label)
        # stage folders of training (train, teacher, adabn) hold plain files only
        files = {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()} if self.dist.is_main else None
        files = from_main(files, self.dist)
        if self.dist.is_main:
            return super().run(stage, stage_key, make, label)
        final.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (final / name).write_bytes(content)
        return final

    def close(self) -> None:
        """After training: rank 0 goes on with a plain stage cache; another rank's private copies are removed."""
        self.dist = Dist()
        if self.private is not None:
            shutil.rmtree(self.private, ignore_errors=True)
