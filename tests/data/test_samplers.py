"""Samplers: coverage, determinism, padding reduction, contiguity and equal DDP shards."""

from __future__ import annotations

import numpy as np
import pytest

from msfm.data import BlockShuffleSampler, LengthBucketBatchSampler
from msfm.errors import MsfmInputError


@pytest.fixture
def lengths() -> np.ndarray:
    return np.random.default_rng(0).integers(5, 400, size=1000)


def _padded_tokens(batches, lengths) -> int:
    return sum(len(b) * int(lengths[b].max()) for b in batches)


def test_length_buckets_cover_all_and_reduce_padding(lengths):
    sampler = LengthBucketBatchSampler(lengths, batch_size=32, shuffle=True, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 32
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    random_batches = np.array_split(np.random.default_rng(0).permutation(1000), 32)
    assert _padded_tokens(batches, lengths) < 0.6 * _padded_tokens(random_batches, lengths)


def test_length_buckets_deterministic_and_epoch_dependent(lengths):
    a = LengthBucketBatchSampler(lengths, batch_size=16, shuffle=True, seed=3)
    b = LengthBucketBatchSampler(lengths, batch_size=16, shuffle=True, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert len(list(a)) == len(first)


def test_length_buckets_max_tokens(lengths):
    sampler = LengthBucketBatchSampler(lengths, batch_size=64, max_tokens=4000, shuffle=False, seed=0)
    batches = list(sampler)
    assert all(len(b) * lengths[b].max() <= 4000 for b in batches)
    assert len(batches) == len(sampler)
    big = LengthBucketBatchSampler([10, 5000, 20], batch_size=8, max_tokens=100, shuffle=False, seed=0)
    assert list(big) == [[0, 2], [1]]  # a cell longer than max_tokens gets its own batch


def test_length_buckets_drop_last_and_errors():
    sampler = LengthBucketBatchSampler(np.arange(10), batch_size=4, shuffle=False, seed=0, drop_last=True)
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(sampler) == 2
    with pytest.raises(MsfmInputError, match="batch_size"):
        LengthBucketBatchSampler([1], batch_size=0)


@pytest.mark.parametrize(("n", "world_size"), [(1000, 1), (1000, 3), (7, 4), (10, 2)])
def test_block_shuffle_shards_equal_and_cover(n, world_size):
    shards = [
        list(BlockShuffleSampler(n, block_size=64, seed=5, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    assert len({len(s) for s in shards}) == 1
    assert len(shards[0]) == len(BlockShuffleSampler(n, block_size=64, seed=5, world_size=world_size))
    assert set(np.concatenate(shards).tolist()) == set(range(n))
    dropped = [
        list(BlockShuffleSampler(n, block_size=64, seed=5, rank=r, world_size=world_size, drop_last=True))
        for r in range(world_size)
    ]
    flat = np.concatenate(dropped)
    assert len(flat) == len(set(flat.tolist())) == (n // world_size) * world_size


def test_block_shuffle_is_blockwise_and_deterministic():
    sampler = BlockShuffleSampler(1000, block_size=100, seed=0, shuffle_within_block=False)
    order = np.array(list(sampler))
    assert (np.diff(order) == 1).sum() >= 1000 - 10  # only block boundaries break contiguity
    assert not np.array_equal(order, np.arange(1000))
    assert list(sampler) == list(
        BlockShuffleSampler(1000, block_size=100, seed=0, shuffle_within_block=False)
    )
    within = np.array(list(BlockShuffleSampler(1000, block_size=100, seed=0)))
    assert {int(i) // 100 for i in within[:100]} == {int(order[0]) // 100}  # a block stays together
    sampler.set_epoch(1)
    assert list(sampler) != order.tolist()


def test_block_shuffle_errors():
    with pytest.raises(MsfmInputError, match="rank"):
        BlockShuffleSampler(10, block_size=2, rank=2, world_size=2)
    with pytest.raises(MsfmInputError, match="block_size"):
        BlockShuffleSampler(10, block_size=0)
