"""torch.distributed plumbing (mmn/distributed.py) with 2 gloo processes on 127.0.0.1.

The stage-level byte-identity tests (2 torchrun ranks per sharded stage) are in
test_pipeline_e2e.py; here: the batch split itself, and `ablate.mode: mean`, whose fill
is a float64 sum over ranks (equal to one process up to rounding, not bit for bit).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.multiprocessing as mp

from mmn.distributed import shard_batches


def test_shard_batches_partition_the_single_process_batches():
    one = shard_batches(10, 3)
    assert one == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    for world in (1, 2, 3, 5):
        parts = [shard_batches(10, 3, (r, world)) for r in range(world)]
        assert sorted((b for p in parts for b in p), key=lambda b: b.start) == one
        assert all(p == one[r::world] for r, p in enumerate(parts))
    assert shard_batches(0, 4, (1, 2)) == []
    with pytest.raises(ValueError, match="rank"):
        shard_batches(10, 3, (2, 2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ablate_mean(shard: tuple[int, int], reduce_sum) -> pl.DataFrame:
    """ablate_images(mode="mean") on a tiny random GPT-2 and 5 seeded fake images."""
    from conftest import load_tokenizer, tiny_lm
    from helpers.fakes import FakeEncoder, captions

    from mmn.experiments.ablation import ablate_images
    from mmn.models.lm import prepare_lm
    from mmn.models.prefix_lm import ImagePrefixLM

    tok = load_tokenizer()
    ad, tok = prepare_lm(tiny_lm("gpt2", len(tok)), tok)
    torch.manual_seed(0)
    plm = ImagePrefixLM(ad, tok, torch.nn.Linear(12, ad.d_model), encoder=FakeEncoder(6, 12, 2))
    interp = torch.zeros(ad.n_layers, ad.d_mlp, dtype=torch.bool)
    interp[:, ::2] = True
    return ablate_images(captions(tok), lambda i: i, plm, interp, ks=[0, 5, 40], mode="mean",
                         max_new_tokens=2, regenerate=False, seed=0, progress=False, shard=shard,
                         reduce_sum=reduce_sum)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from mmn.distributed import all_reduce_sum, distributed, gather_frames

    with distributed() as info:
        summed = all_reduce_sum(torch.tensor([float(rank + 1)], dtype=torch.float64), info)
        part = _ablate_mean(info.shard, lambda t: all_reduce_sum(t, info))
        df = gather_frames(part, info)
    Path(out, f"sum{rank}.txt").write_text(repr(float(summed)))
    if info.is_main:
        df.write_parquet(Path(out, "merged.parquet"))


@pytest.mark.timeout(300)
def test_two_gloo_ranks_mean_ablation_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [float((tmp_path / f"sum{r}.txt").read_text()) for r in range(2)] == [3.0, 3.0]
    merged = pl.read_parquet(tmp_path / "merged.parquet").sort(["image_id", "kind", "k"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        single = _ablate_mean((0, 1), lambda t: t)
    finally:
        torch.set_num_threads(threads)  # other tests compare against fresh processes' thread count
    assert merged.select("image_id", "kind", "k", "k_effective").equals(
        single.select("image_id", "kind", "k", "k_effective"))
    # the fill is a float64 sum over ranks, cast to float32: equal up to rounding
    for col in ("p_target", "p_clean", "rel_drop"):
        diff = (merged[col] - single[col]).abs().max()
        assert diff < 1e-6, (col, diff)
    # the ablation did something at k = 40 (so the comparison above is not vacuous)
    assert (single.filter(pl.col("k") == 40)["rel_drop"].abs() > 0).any()
