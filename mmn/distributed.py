"""Sharding per-image stages over processes with torch.distributed (torchrun).

``torchrun --standalone --nproc-per-node N -m stages.attribute`` starts N ranks; each
takes every N-th batch of images (so batch shapes match a one-process run), results are
gathered on rank 0, which sorts, checks and writes exactly what one process would have
written (bit for bit on CPU when every rank uses the same thread count as the single
run: torchrun sets ``OMP_NUM_THREADS=1`` unless told otherwise). Backend: NCCL when CUDA is
available (each rank on ``cuda:LOCAL_RANK``), gloo on CPU. Without torchrun's
environment (``WORLD_SIZE`` unset) everything runs in one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import polars as pl
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """``(rank, world)``, the form the library functions take."""
        return self.rank, self.world


def shard_batches(n: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> list[range]:
    """This rank's batches of ``range(n)``.

    Batches are cut exactly as in one process (``batch_size`` consecutive items) and
    batch i goes to rank ``i % world``, so every batch has the same items, padding and
    shapes as in a one-process run: merged results are bit-identical.
    """
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard {shard}: rank must be in 0..world-1")
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)][rank::world]


@contextmanager
def distributed() -> Iterator[DistInfo]:
    """Initialise the process group from torchrun's environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield DistInfo()
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    try:
        yield DistInfo(dist.get_rank(), dist.get_world_size(), local)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks (returned on every rank, on ``t``'s device). Sums in the
    order of the backend, so pass float64 when the result must match one process to
    float32 precision."""
    if info.world == 1:
        return t
    dev = torch.device("cuda", info.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t.to(dev).clone()
    dist.all_reduce(buf)
    return buf.to(t.device)


def share_mask_from_main(compute: Callable[[], torch.Tensor], shape: tuple[int, ...],
                         info: DistInfo) -> torch.Tensor:
    """A boolean mask of ``shape`` computed by ``compute()`` on the main rank only (e.g. one fp32
    CPU copy of the LM, not one per rank) and shared with every rank. A mask of another shape
    raises :class:`~mmn.errors.StageError`."""
    from mmn.errors import StageError

    if info.is_main:
        mask = compute()
        if tuple(mask.shape) != tuple(shape):
            raise StageError(f"mask of shape {tuple(mask.shape)} computed on the main rank; expected {tuple(shape)}")
    else:
        mask = torch.zeros(shape, dtype=torch.bool)
    if info.world > 1:
        mask = all_reduce_sum(mask.to(torch.float32), info) > 0.5
    return mask


def gather_frames(df: pl.DataFrame, info: DistInfo) -> pl.DataFrame | None:
    """Concatenate every rank's frame on rank 0 (None elsewhere)."""
    if info.world == 1:
        return df
    parts: list[pl.DataFrame | None] = [None] * info.world if info.is_main else None
    dist.gather_object(df, parts, dst=0)
    if not info.is_main:
        return None
    return pl.concat(parts, how="vertical")
