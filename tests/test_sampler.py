"""ResumableDistributedSampler: the global sample position survives a change of world size.

Ranks are simulated by one sampler per rank (num_replicas/rank given), which is exactly how
each process of a job constructs it; the multi-process path is in test_distributed.py.
"""
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dckpt.state.data import ResumableDistributedSampler, ResumableLoader

N = 60


def samplers(world, **kw):
    return [ResumableDistributedSampler(range(N), world, r, seed=3, **kw) for r in range(world)]


def draw(its, k):
    """k samples from each rank's iterator, in lockstep like a training loop."""
    return [[next(it) for _ in range(k)] for it in its]


def test_same_order_as_distributed_sampler():
    for r in range(4):
        ours = ResumableDistributedSampler(range(N + 2), 4, r, seed=3)
        theirs = DistributedSampler(range(N + 2), 4, r, seed=3)
        for epoch in (0, 1):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)


@pytest.mark.parametrize("old, new, k", [(2, 2, 7), (2, 4, 6), (4, 2, 5), (4, 1, 3), (2, 3, 6)])
def test_resume_on_another_world_size_neither_skips_nor_repeats(old, new, k):
    before = samplers(old)
    for s in before:
        s.set_epoch(1)
    taken = draw([iter(s) for s in before], k)
    states = [s.state_dict() for s in before]
    assert all(st == states[0] for st in states)  # the position is global: same on all ranks
    assert states[0]["position"] == k * old

    after = samplers(new)
    for s in after:
        s.load_state_dict(states[0])
        s.set_epoch(1)  # what a training loop does at the top of the resumed epoch
    share = len(after[0])  # len() is the share of the next iteration: the resumed one
    rest = [list(s) for s in after]
    assert all(len(x) == share for x in rest)
    seen = [i for x in taken + rest for i in x]
    assert sorted(seen) == list(range(N))  # N - k*old divides by new here: no padding
    if new == old:  # same world: exactly the uninterrupted sequence
        for r, s in enumerate(samplers(old)):
            s.set_epoch(1)
            assert taken[r] + rest[r] == list(s)


def test_padding_only_repeats_to_even_out_the_last_round():
    before = samplers(2)
    taken = draw([iter(s) for s in before], 5)
    after = samplers(4)
    for s in after:
        s.load_state_dict(before[0].state_dict())
    rest = [list(s) for s in after]  # 50 left over 4 ranks: 2 padded
    seen = [i for x in taken + rest for i in x]
    assert set(seen) == set(range(N)) and len(seen) == N + 2


def test_next_epoch_starts_from_the_beginning():
    s = samplers(2)[0]
    s.load_state_dict({**s.state_dict(), "position": 40})
    assert len(list(s)) == 10
    s.set_epoch(1)
    assert len(list(s)) == N // 2


def test_refuses_state_of_another_dataset():
    st = samplers(2)[0].state_dict()
    with pytest.raises(ValueError, match="60 samples"):
        ResumableDistributedSampler(range(N + 1), 2, 0, seed=3).load_state_dict(st)


def test_loader_counts_consumed_batches_not_prefetched_ones():
    """With workers prefetching, the sampler runs ahead of training; the loader's state
    records what training received."""
    data = torch.arange(N)
    loaders = [ResumableLoader(DataLoader(data, batch_size=3, num_workers=1, prefetch_factor=4,
                                          sampler=s)) for s in samplers(2)]
    its = [iter(ld) for ld in loaders]
    taken = [torch.cat([next(it) for _ in range(4)]).tolist() for it in its]
    state = loaders[0].state_dict()
    assert state["sampler"]["position"] == 4 * 3 * 2
    for it in its:
        it.close()

    resumed = [ResumableLoader(DataLoader(data, batch_size=3, sampler=s)) for s in samplers(4)]
    for ld in resumed:
        ld.load_state_dict(state)
    rest = [torch.cat(list(ld)).tolist() for ld in resumed]
    assert sorted(i for x in taken + rest for i in x) == list(range(N))
