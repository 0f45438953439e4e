"""ResumableSampler / ResumableDataLoader: epoch-seeded order, sharding, mid-epoch skip."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from msfm.engine.sampler import ResumableDataLoader, ResumableSampler
from msfm.errors import MsfmInputError


def test_order_depends_only_on_seed_and_epoch() -> None:
    s = ResumableSampler(range(10), seed=3)
    first = list(s)
    assert sorted(first) == list(range(10))
    assert list(s) == first
    s.set_epoch(1)
    second = list(s)
    assert second != first
    assert sorted(second) == list(range(10))
    other = ResumableSampler(range(10), seed=3)
    other.set_epoch(1)
    assert list(other) == second
    assert list(ResumableSampler(range(5), shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("drop_last", "per_rank"), [(False, 4), (True, 3)])
def test_sharding(monkeypatch: pytest.MonkeyPatch, drop_last: bool, per_rank: int) -> None:
    shards = []
    for rank in range(2):
        s = ResumableSampler(range(7), seed=0, drop_last=drop_last)
        monkeypatch.setattr(s, "_world", lambda rank=rank: (2, rank))
        assert len(s) == per_rank
        assert s.num_replicas == 2
        assert s.rank == rank
        shards.append(list(s))
    assert all(len(x) == per_rank for x in shards)
    union = set(shards[0]) | set(shards[1])
    if drop_last:
        assert not set(shards[0]) & set(shards[1])
        assert len(union) == 6
    else:
        assert union == set(range(7))  # one sample repeated as padding


def test_skip_applies_to_matching_epoch_only() -> None:
    s = ResumableSampler(range(8), seed=1)
    full = list(s)
    s.skip_next(3, epoch=0)
    assert list(s) == full[3:]
    assert list(s) == full, "the skip is one-shot"
    s.skip_next(3, epoch=0)
    s.set_epoch(1)
    assert len(list(s)) == 8


def test_loader_state_round_trip() -> None:
    ds = TensorDataset(torch.arange(10))
    loader = ResumableDataLoader(ds, batch_size=3, seed=0)
    batches = [b[0].tolist() for b in loader]
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 2}

    resumed = ResumableDataLoader(ds, batch_size=3, seed=0)
    resumed.load_state_dict(state)
    assert [b[0].tolist() for b in resumed] == batches[2:]
    assert resumed.state_dict() == {"epoch": 0, "batches": 4}

    # A state saved after the last batch resumes at the start of the next epoch.
    nxt = ResumableDataLoader(ds, batch_size=3, seed=0)
    nxt.load_state_dict({"epoch": 0, "batches": 4})
    ref = ResumableDataLoader(ds, batch_size=3, seed=0)
    ref.sampler.set_epoch(1)
    assert [b[0].tolist() for b in nxt] == [b[0].tolist() for b in ref]


def test_loader_refuses_sampler() -> None:
    with pytest.raises(MsfmInputError, match="builds its own sampler"):
        ResumableDataLoader(TensorDataset(torch.arange(3)), sampler=[0, 1, 2])
